"""What every stage script shares: one-line errors and the torchrun relaunch."""

from __future__ import annotations

import os
import sys

from vitpipe.errors import UserError


def run(main) -> None:
    """Call main(argv); a UserError becomes one line on stderr and exit code 2."""
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"vitpipe: error: {e}", file=sys.stderr)
        sys.exit(2)


def relaunch_distributed(nproc: int) -> None:
    """With nproc > 1, re-exec this very stage under torchrun (one process per device);
    the stage command in dvc.yaml stays the same for any number of processes."""
    if nproc <= 1 or "LOCAL_RANK" in os.environ:
        return
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            sys.argv[0], *sys.argv[1:]]
    sys.stdout.flush()
    os.execv(sys.executable, args)


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
