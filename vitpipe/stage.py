"""What every stage script shares: one-line errors and the torchrun relaunch."""

from __future__ import annotations

import os
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
    fix = {errno.ENOSPC: "free some disk space", errno.EDQUOT: "free some quota", errno.EFBIG: "free some disk space "
           "or raise the file-size limit", errno.EROFS: "write to a writable filesystem", errno.EACCES: "make it writable",
           errno.EPERM: "make it writable"}.get(e.errno, "check the path")
    return f"cannot write{where}: {e.strerror or e} ({errno.errorcode.get(e.errno, 'OSError')}); {fix}, then run the stage again"


def relaunch_distributed(nproc: int) -> None:
    """With nproc > 1, re-exec this very stage under torchrun (one process per device);
    the stage command in dvc.yaml stays the same for any number of processes. Already under
    torchrun (LOCAL_RANK set: a multi-node launch), it only prepares the process.

    Either way it seeds every RNG first: this torch seeds itself randomly at import, and the
    model a stage builds next must be the same in every run, or a killed run could never be
    resumed bit-for-bit (fit fingerprints the starting weights)."""
    seed_everything(0)
    if nproc <= 1 or "LOCAL_RANK" in os.environ:
        return
    import torch

    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise UserError(f"nproc={nproc} processes, but this machine has {torch.cuda.device_count()} GPU(s); "
                        f"lower the section's nproc")
    # torchrun would set 1 thread per process, with a warning; on CPU share the cores instead
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, cores // nproc))
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            sys.argv[0], *sys.argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, args, {**os.environ, "OMP_NUM_THREADS": threads})


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every GPU)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
