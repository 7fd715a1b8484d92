"""One process or many: torchrun's environment read into a `Dist`, the device each process
trains on, and the relaunch that turns a stage command into a torchrun job (nproc > 1 on one
machine; nnodes > 1: one agent per machine, meeting at a c10d rendezvous)."""

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


ENV_RDZV = "VITPIPE_RDZV_ENDPOINT"   # host:port of the c10d rendezvous: a property of the cluster, not of the run
ENV_RDZV_ID = "VITPIPE_RDZV_ID"     # the job's name at that endpoint (default: the launcher's job id, or the stage)
RDZV_PORT = 29500


def rendezvous_endpoint() -> str | None:
    """host:port where the nodes of a multi-node run meet: VITPIPE_RDZV_ENDPOINT, else what the
    common launchers set: SkyPilot (SKYPILOT_NODE_IPS: the first node), Kubernetes PyTorchJob
    (MASTER_ADDR/MASTER_PORT: the master pod), SLURM (the first host of SLURM_JOB_NODELIST)."""
    if os.environ.get(ENV_RDZV):
        return os.environ[ENV_RDZV]
    if os.environ.get("SKYPILOT_NODE_IPS"):
        return f"{os.environ['SKYPILOT_NODE_IPS'].split()[0]}:{RDZV_PORT}"
    if os.environ.get("MASTER_ADDR"):
        return f"{os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT', RDZV_PORT)}"
    if os.environ.get("SLURM_JOB_NODELIST"):
        return f"{first_slurm_host(os.environ['SLURM_JOB_NODELIST'])}:{RDZV_PORT}"
    return None


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[07-09,12],cpu1" -> "gpu07" (what
    `scontrol show hostnames | head -1` prints, without needing scontrol)."""
    import re

    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise UserError(f"SLURM_JOB_NODELIST={nodelist!r} is not a node list; set {ENV_RDZV}=host:port")
    prefix, ranges = m.group(1), m.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def rendezvous_id() -> str:
    """The same on every node of one job: the launcher's job id, else the stage command."""
    import hashlib

    for var in (ENV_RDZV_ID, "SLURM_JOB_ID", "SKYPILOT_TASK_ID", "PET_RDZV_ID"):
        if os.environ.get(var):
            return os.environ[var]
    return "vitpipe-" + hashlib.sha256(" ".join(sys.argv).encode()).hexdigest()[:12]


def torchrun_args(nproc: int, nnodes: int) -> list[str]:
    """One node: --standalone. Several: every node runs the same command and they meet at the
    c10d rendezvous (no node ranks to hand out; torchrun numbers the nodes as they join)."""
    if nnodes == 1:
        return ["--standalone", f"--nproc_per_node={nproc}"]
    endpoint = rendezvous_endpoint()
    if not endpoint:
        raise UserError(f"nnodes={nnodes}: the nodes need a place to meet; set {ENV_RDZV}=host:port (the first "
                        f"node's address and a free port) on every node, or launch under SLURM, SkyPilot or a "
                        f"Kubernetes PyTorchJob")
    if ":" not in endpoint:
        raise UserError(f"{ENV_RDZV}={endpoint!r}: expected host:port, e.g. 10.0.0.1:{RDZV_PORT}")
    return [f"--nnodes={nnodes}", f"--nproc_per_node={nproc}", "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}",
            f"--rdzv-id={rendezvous_id()}"]


def relaunch(nproc: int, nnodes: int = 1) -> None:
    """With nproc x nnodes > 1, run this very stage under torchrun (one process per device, on
    each of nnodes machines; this process becomes their agent and exits with the job); the
    stage command in dvc.yaml stays the same for any number of processes and machines. Already
    under torchrun (LOCAL_RANK set), it only prepares the process.

    Either way it seeds every RNG first: this torch seeds itself randomly at import, and the
    model a stage builds next must be the same in every run, or a killed run could never be
    resumed bit-for-bit (fit fingerprints the starting weights)."""
    seed_everything(0)
    if nproc * nnodes <= 1 or "LOCAL_RANK" in os.environ:
        return
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise UserError(f"nproc={nproc} processes, but this machine has {torch.cuda.device_count()} GPU(s); "
                        f"lower the section's nproc")
    # torchrun would set 1 thread per process, with a warning; on CPU share the cores instead
    os.environ["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS") or str(max(1, cpu_count() // nproc))
    sys.exit(torchrun([*torchrun_args(nproc, nnodes), sys.argv[0], *sys.argv[1:]]))


def torchrun(args: list[str]) -> int:
    """torchrun's launcher in this process, which becomes the job's agent; the job's exit code.
    A failed worker has said why itself: one `vitpipe: error:` line (exit code 2), or its own
    traceback. torchrun's ChildFailedError traceback and error log would only bury that line,
    so they are left out; for a worker that crashed (a signal, another exit code) one line says
    which rank and how. A SIGTERM or SIGINT is passed to the workers, which checkpoint and say
    so; the agent then exits 128 + the signal, as a killed process does."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(parse_args(args))
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        if code != 2:
            how = f"was killed by {failure.signal_name()}" if code < 0 else f"exited with code {code}"
            print(f"vitpipe: error: training process {rank} {how}; its output is above", file=sys.stderr)
        return code if code > 0 else 128 - code
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every GPU)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
