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


def setup_distributed(collective_timeout_s: float = 600) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is one process. The process's
    GPU is set, and named (device_id), before the group starts: NCCL then binds each process to
    its own GPU at once instead of guessing. A collective that waits longer than
    `collective_timeout_s` for a peer (dead, stuck, or never there) fails the run
    (`lost_peer_message`) instead of hanging it."""
    from datetime import timedelta

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        timeout = timedelta(seconds=collective_timeout_s)
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", timeout=timeout, device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return Dist(dist.get_rank(), world, local_rank)


def pick_device(d: Dist) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


def is_lost_peer(e: BaseException) -> bool:
    """A collective that failed because another process of the job is gone or stuck: the
    backend's own error (NCCL), a closed or reset connection (gloo), or the timeout."""
    import torch.distributed as dist

    text = str(e)
    return (
        isinstance(e, dist.DistError)
        or "Connection closed by peer" in text
        or "Connection reset by peer" in text
        or ("Timed out" in text and "gloo" in text.lower())
    )


def lost_peer_message(rank: int, section: str, timeout_s: float, e: BaseException) -> str:
    first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    return (
        f"training process {rank}: another process of the run stopped answering during training (dead, "
        f"stuck, or its node lost: {first}); every process stops. Run the stage again on every node to resume "
        f"from the last checkpoint (a collective waits at most {section}.collective_timeout_s={timeout_s:g} s)"
    )


ENV_RDZV = "VITPIPE_RDZV_ENDPOINT"  # host:port of the c10d rendezvous: a property of the cluster, not of the run
ENV_RDZV_ID = "VITPIPE_RDZV_ID"  # the job's name at that endpoint (default: the launcher's job id, or the stage)
RDZV_PORT = 29500


def rendezvous_endpoint() -> str | None:
    """host:port where the nodes of a multi-node run meet: VITPIPE_RDZV_ENDPOINT, else what the
    common launchers set: SkyPilot (SKYPILOT_NODE_IPS: the first node), SLURM (the first host of
    SLURM_JOB_NODELIST, a port taken from the job id, so two jobs sharing a first node do not
    collide), Kubernetes PyTorchJob (MASTER_ADDR/MASTER_PORT: the master pod). SLURM before
    MASTER_ADDR: a SLURM job may inherit a MASTER_ADDR that is not its own."""
    if os.environ.get(ENV_RDZV):
        return os.environ[ENV_RDZV]
    if os.environ.get("SKYPILOT_NODE_IPS"):
        return f"{os.environ['SKYPILOT_NODE_IPS'].split()[0]}:{RDZV_PORT}"
    if os.environ.get("SLURM_JOB_NODELIST"):
        return f"{first_slurm_host(os.environ['SLURM_JOB_NODELIST'])}:{slurm_port(os.environ.get('SLURM_JOB_ID', ''))}"
    if os.environ.get("MASTER_ADDR"):
        return f"{os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT', RDZV_PORT)}"
    return None


def slurm_port(job_id: str) -> int:
    """A port in 15000..34999 from the SLURM job id (RDZV_PORT without one)."""
    return 15000 + int(job_id) % 20000 if job_id.isdigit() else RDZV_PORT


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[07-09,12],cpu1" -> "gpu07" (what
    `scontrol show hostnames | head -1` prints, without needing scontrol)."""
    import re

    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise UserError(f"SLURM_JOB_NODELIST={nodelist!r} is not a node list; set {ENV_RDZV}=host:port")
    prefix, ranges = m.group(1), m.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def checked_endpoint(endpoint: str) -> str:
    """host:port, or one line naming what is wrong with it (before any process starts)."""
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(
            f"rendezvous endpoint {endpoint!r} (from {ENV_RDZV} or the launcher's variables) is not "
            f"host:port with a port in 1..65535; set {ENV_RDZV}=host:port, e.g. 10.0.0.1:{RDZV_PORT}"
        )
    return endpoint


def rendezvous_id() -> str:
    """The same on every node of one job: the launcher's job id, else the stage and its arguments
    (the script's name, not its path: nodes may spell the command differently)."""
    import hashlib

    for var in (ENV_RDZV_ID, "SLURM_JOB_ID", "SKYPILOT_TASK_ID", "PET_RDZV_ID"):
        if os.environ.get(var):
            return os.environ[var]
    stage = " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])
    return "vitpipe-" + hashlib.sha256(stage.encode()).hexdigest()[:12]


RDZV_BACKEND = "vitpipe-c10d"  # torch's c10d rendezvous, a lost store left to the workers (AgentRendezvous)


class AgentRendezvous:
    """torch's c10d rendezvous handler for torchrun's agent, except for a store it can no longer
    reach once the workers run. The store lives in the agent of whichever node bound the endpoint
    first; when that node dies, the other agents' next question to it fails. The agent asks it
    every monitor interval whether new nodes wait to join (a membership change vitpipe never
    makes: nnodes is fixed, no restarts), and that failed ask ended the agent in a second error
    line beside its worker's, before or after it by timing. A lost store is a lost peer, which
    the workers already report in one line (`lost_peer_message`, within collective_timeout_s):
    so the agent answers "nobody waits", stops its heartbeats to the dead store (a C++ warning
    each), and ends with its workers' exit code."""

    def __init__(self, inner):
        self.inner = inner
        self.store_lost = False

    @classmethod
    def create(cls, params) -> AgentRendezvous:
        """The registry's creator: torch's own c10d handler, from the same parameters."""
        from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import create_backend
        from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

        backend, store = create_backend(params)
        return cls(create_handler(store, backend, params))

    def num_nodes_waiting(self) -> int:
        from torch.distributed.elastic.rendezvous import RendezvousError

        if self.store_lost:
            return 0
        try:
            return self.inner.num_nodes_waiting()
        except RendezvousError:
            self.store_lost = True
            getattr(self.inner, "_stop_heartbeats", lambda: None)()
            return 0

    def shutdown(self) -> bool:
        return False if self.store_lost else self.inner.shutdown()  # closing the rendezvous needs the store

    def get_backend(self) -> str:
        return RDZV_BACKEND

    @property
    def use_agent_store(self) -> bool:
        return self.inner.use_agent_store

    def next_rendezvous(self):
        return self.inner.next_rendezvous()

    def is_closed(self) -> bool:
        return self.inner.is_closed()

    def set_closed(self):
        return self.inner.set_closed()

    def get_run_id(self) -> str:
        return self.inner.get_run_id()


def torchrun_args(nproc: int, nnodes: int, rdzv_timeout_s: float = 600) -> list[str]:
    """One node: --standalone. Several: every node runs the same command and they meet at the
    c10d rendezvous (no node ranks to hand out; torchrun numbers the nodes as they join),
    waiting at most `rdzv_timeout_s` for all of them."""
    if nnodes == 1:
        return ["--standalone", f"--nproc_per_node={nproc}"]
    endpoint = rendezvous_endpoint()
    if not endpoint:
        raise UserError(
            f"nnodes={nnodes}: the nodes need a place to meet; set {ENV_RDZV}=host:port (the first "
            f"node's address and a free port) on every node, or launch under SLURM, SkyPilot or a "
            f"Kubernetes PyTorchJob"
        )
    return [
        f"--nnodes={nnodes}",
        f"--nproc_per_node={nproc}",
        f"--rdzv-backend={RDZV_BACKEND}",
        f"--rdzv-endpoint={checked_endpoint(endpoint)}",
        f"--rdzv-id={rendezvous_id()}",
        f"--rdzv-conf=join_timeout={int(rdzv_timeout_s)}",
        "--max-restarts=0",
    ]


def relaunch(nproc: int, nnodes: int = 1, rdzv_timeout_s: float = 600) -> None:
    """With nproc x nnodes > 1, run this very stage under torchrun (one process per device, on
    each of nnodes machines; this process becomes their agent and exits with the job); the
    stage command in dvc.yaml stays the same for any number of processes and machines. Already
    under torchrun (LOCAL_RANK set), it only prepares the process. Nodes that have not all
    joined within `rdzv_timeout_s` end the job in one line.

    Either way it seeds every RNG first: this torch seeds itself randomly at import, and the
    model a stage builds next must be the same in every run, or a killed run could never be
    resumed bit-for-bit (fit fingerprints the starting weights)."""
    seed_everything(0)
    if nproc * nnodes <= 1 or "LOCAL_RANK" in os.environ:
        return
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise UserError(
            f"nproc={nproc} processes, but this machine has {torch.cuda.device_count()} GPU(s); "
            f"lower the section's nproc"
        )
    args = torchrun_args(nproc, nnodes, rdzv_timeout_s)  # a bad endpoint: one line before anything starts
    # torchrun would set 1 thread per process, with a warning; on CPU share the cores instead
    os.environ["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS") or str(max(1, cpu_count() // nproc))
    if nnodes > 1:
        print(
            f"vitpipe: waiting at {rendezvous_endpoint()} (rendezvous {rendezvous_id()}) for all {nnodes} nodes "
            f"to join, at most {rdzv_timeout_s:g} s",
            file=sys.stderr,
            flush=True,
        )
    sys.exit(torchrun([*args, sys.argv[0], *sys.argv[1:]], rdzv_timeout_s))


def torchrun(args: list[str], rdzv_timeout_s: float = 600) -> int:
    """torchrun's launcher in this process, which becomes the job's agent; the job's exit code.
    A failed worker has said why itself: one `vitpipe: error:` line (exit code 2), or its own
    traceback. torchrun's ChildFailedError traceback and error log would only bury that line,
    so they are left out; for a worker that crashed (a signal, another exit code) one line says
    which rank and how. Nodes that never all join (RendezvousTimeoutError, or any other
    rendezvous failure) are one line and exit 2. A SIGTERM or SIGINT is passed to the workers,
    which checkpoint and say so; the agent then exits 128 + the signal, as a killed process does."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry
    from torch.distributed.elastic.rendezvous.api import RendezvousError, RendezvousTimeoutError
    from torch.distributed.run import parse_args, run

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    rendezvous_handler_registry.register(RDZV_BACKEND, AgentRendezvous.create)  # again: the same creator is fine
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
    except RendezvousTimeoutError:
        print(
            f"vitpipe: error: not every node joined within {rdzv_timeout_s:g} s (the section's rdzv_timeout_s): "
            f"start the same stage on every node, with the same {ENV_RDZV}, or raise the timeout",
            file=sys.stderr,
        )
        return 2
    except RendezvousError as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        print(
            f"vitpipe: error: the nodes could not meet ({why}); check {ENV_RDZV} (the first node's address and "
            f"a free port) on every node",
            file=sys.stderr,
        )
        return 2
    return 0


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every GPU)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
