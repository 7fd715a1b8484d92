"""One process or many: torchrun's environment read into a `Dist`, the device each process
trains on, and the relaunch that turns a stage command into a torchrun job (nproc > 1)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from vitpipe.errors import UserError
from vitpipe.hardware.probe import cpu_count


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(d: Dist) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


def relaunch(nproc: int) -> None:
    """With nproc > 1, re-exec this very stage under torchrun (one process per device);
    the stage command in dvc.yaml stays the same for any number of processes. Already under
    torchrun (LOCAL_RANK set: a multi-node launch), it only prepares the process.

    Either way it seeds every RNG first: this torch seeds itself randomly at import, and the
    model a stage builds next must be the same in every run, or a killed run could never be
    resumed bit-for-bit (fit fingerprints the starting weights)."""
    seed_everything(0)
    if nproc <= 1 or "LOCAL_RANK" in os.environ:
        return
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise UserError(f"nproc={nproc} processes, but this machine has {torch.cuda.device_count()} GPU(s); "
                        f"lower the section's nproc")
    # torchrun would set 1 thread per process, with a warning; on CPU share the cores instead
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, cpu_count() // nproc))
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
