"""Concurrent CPU training processes on one machine share its cores, with nothing to set.

Each torch process starts as many threads as there are cores; two of them on one machine
(`dvc queue start -j 2`, two terminals) oversubscribe it and both crawl. Each training
process therefore leaves a lease (a file named by its pid) in a machine-local folder next
to the checkpoint store, and at every host sync takes cores // (live leases) threads.

It stays out of the way when the user chose: OMP_NUM_THREADS set, VITPIPE_CORE_SHARE=0 (or
`core_share: false` in vitpipe.local.yaml), or
torch's thread count already changed from the default; and on a GPU run, or under DDP
(torchrun's processes get their share from vitpipe.training.distributed.relaunch).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vitpipe import settings
from vitpipe.hardware.probe import cpu_count


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CoreShare:
    def __init__(self, device: torch.device, folder: Path, world: int = 1):
        """`folder`: where the leases of this machine's trainings live (the trainer puts it
        beside its checkpoint store, which every training on the machine shares)."""
        self.cores = cpu_count()
        self.active = (
            device.type == "cpu"
            and world == 1
            and "OMP_NUM_THREADS" not in os.environ
            and settings.load().core_share
            and torch.get_num_threads() == self.cores
            and self.cores > 1
        )
        self.folder, self.lease, self.threads = folder, None, torch.get_num_threads()

    def __enter__(self):
        if self.active:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                self.lease = self.folder / str(os.getpid())
                self.lease.write_text("")
            except OSError:
                self.active = False  # an unwritable store is reported by the checkpoint store
        self.rebalance()
        return self

    def live(self) -> int:
        n = 0
        for f in self.folder.iterdir():
            if f.name.isdigit() and _alive(int(f.name)):
                n += 1
            elif f.name.isdigit():
                f.unlink(missing_ok=True)  # a killed process's lease
        return max(1, n)

    def rebalance(self) -> None:
        if not self.active:
            return
        try:
            share = max(1, self.cores // self.live())
        except OSError:
            return
        if share != self.threads:
            torch.set_num_threads(share)
            self.threads = share

    def __exit__(self, *exc):
        if self.lease is not None:
            self.lease.unlink(missing_ok=True)
            torch.set_num_threads(self.cores)
