"""Past one device and one machine on CPU (gloo, loopback): `parallel: fsdp` shards the
training state over 2 processes and ends where DDP ends; a sharded run killed with SIGKILL
resumes bit-exact; the cost model's sharded bytes are what FSDP holds; two torchrun agents
(`nnodes: 2`, one process each) train the run one node with two processes trains.

The runs are shared by the tests of this module (each starts 2-3 processes): one DDP run
(nproc 2), one uninterrupted FSDP run and the FSDP run that is killed and resumed."""

import json
import os
import signal
import socket
import subprocess
import sys

import psutil
import pytest
import torch
from conftest import MICRO, ROOT
from test_resume import checkpoint_step, wait_for
from test_train import ENV, run_stage, stage_dir, start_stage, weights

# 2 micro-batches of 8 per step: one per process; long enough (a few seconds) to be killed mid-way
RECIPE = {"steps": 150, "batch_size": 16, "micro_batch": 8, "checkpoint_every": 10, "eval_every": 50, "nproc": 2}
WEIGHTS = "models/scratch/seed-0/model.pt"
METRICS = "metrics/train_scratch/seed-0.json"


def metrics(run) -> dict:
    return json.loads((run / METRICS).read_text())


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return tmp_path_factory.mktemp("fsdp-store")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prepared, store):
    """The DDP (`parallel: auto`) and the uninterrupted FSDP run of RECIPE, each under torchrun
    with 2 processes."""
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VITPIPE_CHECKPOINT_DIR", str(store))  # the autouse store fixture is per test; these are per module
        # `auto` for the DDP run: the micro ViT fits any device whole, so auto must pick ddp
        for name, parallel in (("ddp", "auto"), ("fsdp", "fsdp")):
            out[name] = stage_dir(tmp_path_factory.mktemp(name), prepared, **RECIPE, parallel=parallel)
            run_stage(out[name])
    return out


def test_fsdp_holds_half_the_state_and_ends_where_ddp_ends(runs):
    ddp, fsdp = metrics(runs["ddp"]), metrics(runs["fsdp"])
    assert (ddp["parallel"], fsdp["parallel"], fsdp["devices"]) == ("ddp", "fsdp", 2)
    ratio = fsdp["state_bytes_per_process"] / ddp["state_bytes_per_process"]
    # not exactly 1/2: FSDP splits each tensor along dim 0, and pos_embed / cls_token (dim 0 of
    # size 1) live whole on rank 0; the metric is the largest process's
    assert 0.5 <= ratio < 0.56, (ddp["state_bytes_per_process"], fsdp["state_bytes_per_process"])
    a, b = weights(runs["ddp"] / WEIGHTS), weights(runs["fsdp"] / WEIGHTS)
    assert a.keys() == b.keys()
    # the same sums in another order (reduce-scatter vs all-reduce), 150 AdamW steps: about 2e-4 apart
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-3), (k, (a[k] - b[k]).abs().max())
    assert fsdp["val_acc"] == pytest.approx(ddp["val_acc"], abs=0.02)


def test_planner_sharded_state_is_what_fsdp_holds(runs):
    from vitpipe.costmodel import sharding
    from vitpipe.models import model_config

    cfg = model_config(MICRO["model"], 10, MICRO["data"]["image_size"])
    ddp, fsdp = metrics(runs["ddp"]), metrics(runs["fsdp"])
    # DDP: the whole state, plus AdamW's step counters (one scalar per tensor) the model omits
    assert sharding.state_bytes(cfg, 1) == pytest.approx(ddp["state_bytes_per_process"], rel=0.005)
    # FSDP: 1/2 of it; the uneven dim-0 split puts a few % more on rank 0
    assert sharding.state_bytes(cfg, 2) == pytest.approx(fsdp["state_bytes_per_process"], rel=0.08)


def test_fsdp_killed_mid_run_resumes_bit_exact(runs, prepared, tmp_path, monkeypatch):
    run = stage_dir(tmp_path / "killed", prepared, **RECIPE, parallel="fsdp")
    monkeypatch.setenv("VITPIPE_CHECKPOINT_DIR", str(tmp_path / "store"))
    p = start_stage(run)  # execs torchrun
    assert wait_for(lambda: checkpoint_step(tmp_path / "store") >= 10, p), p.communicate()[1][-3000:]
    # torchrun's workers run in sessions of their own: SIGKILL each process of the job
    job = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
    for proc in job:
        proc.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)
    killed_at = checkpoint_step(tmp_path / "store")
    assert 10 <= killed_at < RECIPE["steps"]
    resumed = run_stage(run)
    assert f"at step {killed_at}/{RECIPE['steps']}" in resumed.stderr, resumed.stderr[-2000:]
    a, b = weights(runs["fsdp"] / WEIGHTS), weights(run / WEIGHTS)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_of_one_process_train_what_one_node_of_two_trains(runs, prepared, tmp_path):
    """Two clones, the same stage command on each, one shared checkpoint store: two torchrun
    agents meet at a c10d rendezvous on 127.0.0.1 and train the DDP run of `runs`."""
    env = {**os.environ, **ENV, "VITPIPE_RDZV_ENDPOINT": f"127.0.0.1:{free_port()}", "OMP_NUM_THREADS": "1",
           "VITPIPE_CHECKPOINT_DIR": str(tmp_path / "shared-store")}
    nodes = [stage_dir(tmp_path / f"node{i}", prepared, **{**RECIPE, "nproc": 1, "nnodes": 2}) for i in (0, 1)]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "stages/train_scratch.py"), "0"], cwd=n, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in nodes]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(e[-2000:] for e in errs)
    written = [n for n in nodes if (n / WEIGHTS).exists()]
    assert len(written) == 1  # rank 0 writes, on whichever node it landed
    assert metrics(written[0])["devices"] == 2
    a, b = weights(runs["ddp"] / WEIGHTS), weights(written[0] / WEIGHTS)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-5), (k, (a[k] - b[k]).abs().max())


def test_nnodes_without_an_endpoint_is_one_clear_line(prepared, tmp_path, monkeypatch):
    for var in ("VITPIPE_RDZV_ENDPOINT", "SKYPILOT_NODE_IPS", "MASTER_ADDR", "SLURM_JOB_NODELIST"):
        monkeypatch.delenv(var, raising=False)
    run = stage_dir(tmp_path / "alone", prepared, **{**RECIPE, "nproc": 1, "nnodes": 2})
    p = start_stage(run)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "VITPIPE_RDZV_ENDPOINT=host:port" in err and "Traceback" not in err, err[-2000:]
