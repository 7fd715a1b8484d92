"""Multi-node runs that go wrong end in one `vitpipe: error:` line, in bounded time, on CPU
(gloo, loopback): a node that never joins (train.rdzv_timeout_s), a peer killed mid-run
(train.collective_timeout_s), an endpoint that is not host:port. And nodes that spell the same
command differently still meet; the SLURM variables come before MASTER_ADDR."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import ROOT
from test_fsdp import free_port
from test_resume import checkpoint_step, wait_for
from test_train import ENV, stage_dir

from vitpipe.training import distributed

pytestmark = pytest.mark.slow  # each test starts torchrun nodes

SCRIPT = ROOT / "stages" / "train_scratch.py"
LAUNCHERS = (
    "VITPIPE_RDZV_ENDPOINT",
    "VITPIPE_RDZV_ID",
    "SKYPILOT_NODE_IPS",
    "SKYPILOT_TASK_ID",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_JOB_NODELIST",
    "SLURM_JOB_ID",
    "PET_RDZV_ID",
)


def node_env(tmp_path, endpoint: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHERS}
    return env | ENV | {"VITPIPE_RDZV_ENDPOINT": endpoint, "VITPIPE_CHECKPOINT_DIR": str(tmp_path / "shared-store")}


def start_node(cwd, env, script=SCRIPT) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(script), "0"], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def listening(port: int) -> bool:
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in psutil.net_connections("tcp"))


def errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if "vitpipe: error:" in line]


def test_a_node_that_never_joins_ends_in_one_line_within_the_join_timeout(prepared, tmp_path):
    run = stage_dir(tmp_path / "alone", prepared, steps=6, nproc=1, nnodes=2, rdzv_timeout_s=5)
    start = time.monotonic()
    p = start_node(run, node_env(tmp_path, f"127.0.0.1:{free_port()}"))
    _, err = p.communicate(timeout=120)
    took = time.monotonic() - start
    assert p.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert "for all 2 nodes to join, at most 5 s" in err  # it says it waits, while it waits
    assert errors(err) == [
        "vitpipe: error: not every node joined within 5 s (the section's rdzv_timeout_s): start "
        "the same stage on every node, with the same VITPIPE_RDZV_ENDPOINT, or raise the timeout"
    ]
    assert took < 60, took  # the join timeout, torch's import and the agent's shutdown; not 600 s


@pytest.mark.slow
@pytest.mark.parametrize("store_host", ["survivor", "killed"])
def test_a_peer_killed_mid_run_ends_the_other_node_in_one_line(prepared, tmp_path, store_host):
    """The rendezvous store lives in the agent of the node that bound the endpoint first (the one
    started first here). When that node is the one killed, the survivor's agent loses its store
    too: it must leave the report to its worker, not add a line of its own (it did, under load)."""
    train = {
        "steps": 2000,
        "batch_size": 16,
        "micro_batch": 8,
        "checkpoint_every": 10,
        "eval_every": 1000,
        "nproc": 1,
        "nnodes": 2,
        "collective_timeout_s": 30,
    }
    port = free_port()
    env = node_env(tmp_path, f"127.0.0.1:{port}")
    first, second = (0, 1) if store_host == "survivor" else (1, 0)
    nodes = {first: start_node(stage_dir(tmp_path / f"node{first}", prepared, **train), env)}
    assert wait_for(lambda: listening(port), nodes[first], timeout=120)  # it hosts the store
    nodes[second] = start_node(stage_dir(tmp_path / f"node{second}", prepared, **train), env)
    assert wait_for(lambda: checkpoint_step(tmp_path / "shared-store") >= 10, nodes[0], timeout=180)
    lost = [psutil.Process(nodes[1].pid), *psutil.Process(nodes[1].pid).children(recursive=True)]
    start = time.monotonic()
    for proc in lost:  # the whole node: its agent and its worker, like a machine that is gone
        proc.send_signal(signal.SIGKILL)
    nodes[1].communicate(timeout=60)
    _, err = nodes[0].communicate(timeout=180)
    took = time.monotonic() - start
    assert nodes[0].returncode == 2 and "Traceback" not in err, err[-3000:]
    (line,) = errors(err)
    assert "another process of the run stopped answering during training" in line, line
    assert "Run the stage again on every node to resume from the last checkpoint" in line
    assert took < 30 + 60, took  # within the collective timeout (gloo sees the closed connection at once)


def test_nodes_that_spell_the_command_differently_meet(prepared, tmp_path):
    env = node_env(tmp_path, f"127.0.0.1:{free_port()}")
    train = {"steps": 4, "batch_size": 16, "micro_batch": 8, "nproc": 1, "nnodes": 2, "rdzv_timeout_s": 120}
    dirs = [stage_dir(tmp_path / f"node{i}", prepared, **train) for i in (0, 1)]
    spellings = [SCRIPT, os.path.relpath(SCRIPT, dirs[1])]  # an absolute and a relative path
    nodes = [start_node(d, env, script) for d, script in zip(dirs, spellings)]
    errs = [p.communicate(timeout=300)[1] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(e[-2000:] for e in errs)
    assert sum((d / "models/scratch/seed-0/model.pt").exists() for d in dirs) == 1  # rank 0 wrote it


def test_an_endpoint_that_is_not_host_port_is_one_line_before_anything_starts(prepared, tmp_path):
    run = stage_dir(tmp_path / "bad", prepared, nproc=1, nnodes=2)
    p = start_node(run, node_env(tmp_path, "127.0.0.1:29x00"))
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "Traceback" not in err and "waiting" not in err, err[-3000:]
    assert errors(err) == [
        "vitpipe: error: rendezvous endpoint '127.0.0.1:29x00' (from VITPIPE_RDZV_ENDPOINT or the "
        "launcher's variables) is not host:port with a port in 1..65535; set "
        "VITPIPE_RDZV_ENDPOINT=host:port, e.g. 10.0.0.1:29500"
    ]


def test_slurm_comes_before_master_addr_with_a_port_from_the_job_id(monkeypatch):
    for var in LAUNCHERS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "10.9.9.9")  # inherited, not this job's
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-09,12]")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    assert distributed.rendezvous_endpoint() == f"gpu07:{15000 + 123456 % 20000}"
    monkeypatch.setenv("SLURM_JOB_ID", "123457")
    assert distributed.rendezvous_endpoint() == f"gpu07:{15000 + 123457 % 20000}"  # another job, another port
    assert distributed.rendezvous_id() == "123457"


def test_the_rendezvous_id_does_not_depend_on_how_the_script_is_spelled(monkeypatch):
    for var in LAUNCHERS:
        monkeypatch.delenv(var, raising=False)
    ids = set()
    for script in ("/work/x/stages/train_scratch.py", "stages/train_scratch.py", "./stages/../stages/train_scratch.py"):
        monkeypatch.setattr(sys, "argv", [script, "0"])
        ids.add(distributed.rendezvous_id())
    assert len(ids) == 1
    monkeypatch.setattr(sys, "argv", ["stages/train_scratch.py", "1"])  # another seed: another job
    assert distributed.rendezvous_id() not in ids
