"""What every stage script shares: one-line errors and exit code 2 for a user's mistake."""

from __future__ import annotations

import sys
from pathlib import Path

from vitpipe.errors import UserError

# `python stages/x.py` puts stages/ first on sys.path, where a stage named like a standard
# module (a stages/profile.py once shadowed `profile`, which torch imports) would break
# every import. Stage scripts never import one another, so their folder comes off the path.
if sys.path and sys.argv and sys.argv[0] and Path(sys.path[0] or ".").resolve() == Path(sys.argv[0]).resolve().parent:
    del sys.path[0]


def run(main) -> None:
    """Call main(argv); a UserError, or a file the machine would not let us write (read-only
    folder, full disk, quota), becomes one line on stderr and exit code 2."""
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"vitpipe: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        print(f"vitpipe: error: {os_error_line(e)}", file=sys.stderr)
        sys.exit(2)


def os_error_line(e: OSError) -> str:
    import errno

    where = f" {e.filename}" if e.filename else ""
    fix = {
        errno.ENOSPC: "free some disk space",
        errno.EDQUOT: "free some quota",
        errno.EFBIG: "free some disk space or raise the file-size limit",
        errno.EROFS: "write to a writable filesystem",
        errno.EACCES: "make it writable",
        errno.EPERM: "make it writable",
    }.get(e.errno, "check the path")
    return f"cannot write{where}: {e.strerror or e} ({errno.errorcode.get(e.errno, 'OSError')}); {fix}, then run the stage again"
