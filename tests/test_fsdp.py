"""Past one device and one machine on CPU (gloo, loopback): `parallel: fsdp` shards the
training state over 2 processes and ends where DDP ends; a sharded run killed with SIGKILL
resumes bit-exact from its sharded (DCP) checkpoint, and on 4 processes through DCP's
resharding; a damaged shard is one clear error; the cost model's sharded bytes are what FSDP
holds; two torchrun agents (`nnodes: 2`, one process each) train the run one node with two
processes trains.

The runs are shared by the tests of this module (each starts 2-5 processes): one DDP run
(nproc 2), one uninterrupted FSDP run and the FSDP run that is killed twice; each test that
resumes it does so from a copy of its store."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import psutil
import pytest
import torch
from conftest import MICRO, ROOT
from test_resume import checkpoint_step, wait_for
from test_train import ENV, run_stage, stage_dir, start_stage, tsv_steps, weights

pytestmark = pytest.mark.slow  # each test trains under torchrun

# 4 micro-batches of 4 per step: two per process at nproc 2, one at nproc 4 (where the sharded run
# also resumes); long enough (a few seconds) to be killed mid-way
RECIPE = {"steps": 150, "batch_size": 16, "micro_batch": 4, "checkpoint_every": 10, "eval_every": 50, "nproc": 2}
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


def sigkill(p: subprocess.Popen) -> None:
    """torchrun's workers run in sessions of their own: SIGKILL each process of the job."""
    job = [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]
    for proc in job:
        proc.send_signal(signal.SIGKILL)
    p.communicate(timeout=60)


@pytest.fixture(scope="module")
def killed(tmp_path_factory, prepared):
    """The FSDP run of RECIPE SIGKILLed once its first checkpoint is committed, then resumed and
    SIGKILLed again past step 120: (its folder, its store, the two steps it was killed at). The
    store is left as the second kill left it; tests resume copies of it."""
    base = tmp_path_factory.mktemp("killed")
    run, store = stage_dir(base / "run", prepared, **RECIPE, parallel="fsdp"), base / "store"
    at = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VITPIPE_CHECKPOINT_DIR", str(store))
        for past in (10, 120):
            p = start_stage(run)  # becomes torchrun's agent
            assert wait_for(lambda past=past: checkpoint_step(store) >= past, p), p.communicate()[1][-3000:]
            sigkill(p)
            at.append(checkpoint_step(store))
    assert 10 <= at[0] < 120 <= at[1] < RECIPE["steps"]
    return run, store, at


def resume_copy(store, tmp_path, monkeypatch):
    """A copy of the killed run's store, set as this test's."""
    shutil.copytree(store, tmp_path / "store")
    monkeypatch.setenv("VITPIPE_CHECKPOINT_DIR", str(tmp_path / "store"))
    return tmp_path / "store"


def test_fsdp_killed_mid_run_resumes_bit_exact(runs, killed, tmp_path, monkeypatch):
    run, store, at = killed
    resume_copy(store, tmp_path, monkeypatch)
    resumed = run_stage(run)
    assert f"at step {at[1]}/{RECIPE['steps']}" in resumed.stderr, resumed.stderr[-2000:]
    assert "resharded" not in resumed.stderr
    a, b = weights(runs["fsdp"] / WEIGHTS), weights(run / WEIGHTS)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_fsdp_resumes_on_another_number_of_processes(runs, killed, prepared, tmp_path, monkeypatch):
    """The checkpoint 2 processes wrote, resumed by 4: DCP reshards it; the same run up to the
    order of the sums. Kept at the end (VITPIPE_CHECKPOINT_KEEP): the 4 processes' own folder."""
    _, store, at = killed
    store = resume_copy(store, tmp_path, monkeypatch)
    monkeypatch.setenv("VITPIPE_CHECKPOINT_KEEP", "1")
    run = stage_dir(tmp_path / "four", prepared, **{**RECIPE, "nproc": 4}, parallel="fsdp")
    resumed = run_stage(run)
    assert f"at step {at[1]}/{RECIPE['steps']}" in resumed.stderr, resumed.stderr[-2000:]
    assert (
        "the checkpoint was written by 2 processes, resumed by 4: resharded by torch.distributed.checkpoint; "
        "from here the numbers are this run's up to the order of reductions (not bit-exact)"
    ) in resumed.stderr
    assert (metrics(run)["devices"], metrics(run)["parallel"]) == (4, "fsdp")
    assert tsv_steps(run / "plots/train_scratch/seed-0/train.tsv") == list(range(1, RECIPE["steps"] + 1))
    a, b = weights(runs["fsdp"] / WEIGHTS), weights(run / WEIGHTS)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"resumed on 4 processes: final weights at most {worst:.2e} from the uninterrupted 2-process run's")
    assert 0 < worst <= 1e-4  # another order of sums: close, not equal
    (kept,) = store.glob("*/step-*.dcp")
    assert kept.name == f"step-{RECIPE['steps']:08d}.dcp"
    assert sorted(p.name for p in kept.iterdir()) == [".metadata", *(f"__{r}_0.distcp" for r in range(4)), "rest.pt"]
    rest = torch.load(kept / "rest.pt", weights_only=True)
    assert rest["finished"] and rest["world"] == 4 and rest["model"] is None


def test_a_damaged_shard_is_one_clear_error(killed, prepared, tmp_path, monkeypatch):
    _, store, _ = killed
    store = resume_copy(store, tmp_path, monkeypatch)
    (shard,) = store.glob("*/step-*.dcp/__1_0.distcp")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only its sha256 tells
    shard.write_bytes(bytes(data))
    p = start_stage(stage_dir(tmp_path / "run", prepared, **RECIPE, parallel="fsdp"))
    _, err = p.communicate(timeout=120)
    fp = shard.parent.parent.name
    assert p.returncode != 0 and err.count("vitpipe: error:") == 1, err[-3000:]
    assert (
        f"vitpipe: error: checkpoint {shard} is damaged: its content does not match the sha256 its manifest holds "
        f"(changed after it was written); remove it with `vitpipe checkpoints rm {fp}` or set train.resume: fresh"
        in err
    ), err[-3000:]
    # rank 1 stops quietly (told by rank 0, not left waiting), and torchrun's agent adds
    # nothing: no ChildFailedError traceback, no error log burying the line
    assert "Traceback" not in err and "ChildFailedError" not in err and p.returncode == 2, err[-3000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_of_one_process_train_what_one_node_of_two_trains(runs, prepared, tmp_path):
    """Two clones, the same stage command on each, one shared checkpoint store: two torchrun
    agents meet at a c10d rendezvous on 127.0.0.1 and train the DDP run of `runs`."""
    env = {
        **os.environ,
        **ENV,
        "VITPIPE_RDZV_ENDPOINT": f"127.0.0.1:{free_port()}",
        "OMP_NUM_THREADS": "1",
        "VITPIPE_CHECKPOINT_DIR": str(tmp_path / "shared-store"),
    }
    nodes = [stage_dir(tmp_path / f"node{i}", prepared, **{**RECIPE, "nproc": 1, "nnodes": 2}) for i in (0, 1)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "stages/train_scratch.py"), "0"],
            cwd=n,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in nodes
    ]
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


def test_out_of_memory_advice_offers_sharding():
    """No GPU needed: the advice is the cost model's, for a T4's profile. ViT-g/14 fits no T4
    whole, even at micro-batch 1 in half precision: shard it over the fewest that fit, or over
    the run's own processes. ViT-H/14 fits replicated: under DDP sharding is one more option."""
    from vitpipe.costmodel import sharding
    from vitpipe.costmodel.devices import get_device
    from vitpipe.models import model_config
    from vitpipe.params import TrainParams
    from vitpipe.training.oom import oom_message

    t4, cuda = get_device("t4"), torch.device("cuda", 0)

    def advice(arch, world, parallel):
        r = TrainParams(batch_size=512, micro_batch=64, precision="fp32", parallel=parallel)
        return oom_message(r, "train", {"spec": {"arch": arch}, "image_size": 224}, 1000, cuda, world=world, profile=t4)

    giant = model_config({"arch": "vit_giant_patch14_224"}, 1000, 224)
    micro = sharding.largest_micro_batch(giant, 512, t4, 2)
    assert micro and advice("vit_giant_patch14_224", 1, "none").endswith(
        f"nothing fits, even micro_batch 1; or train.parallel: fsdp over 2 processes (train.nproc x nnodes = 2), "
        f"train.micro_batch: {micro}"
    )
    assert advice("vit_giant_patch14_224", 4, "ddp").endswith(
        f"train.parallel: fsdp, train.micro_batch: {sharding.largest_micro_batch(giant, 512, t4, 4)} "
        f"(the training state sharded over the run's 4 processes)"
    )
    h14 = advice("vit_h14", 2, "ddp")
    assert (
        "train.precision: fp32, train.micro_batch: " in h14 and "; or train.parallel: fsdp, train.micro_batch: " in h14
    )
    assert "parallel" not in advice("vit_h14", 1, "none")  # fits one device whole: nothing to shard over
