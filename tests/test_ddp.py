"""DistributedDataParallel on CPU: `train.nproc: 2` re-runs the stage under torchrun with the
gloo backend. Two processes with the same global batch match one process (float
tolerance), and a SIGTERM to the agent (a preempted job) checkpoints and resumes under DDP."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from test_resume import checkpoint_step, wait_for
from test_train import run_stage, stage_dir, start_stage, tsv_steps, weights  # noqa: F401

pytestmark = pytest.mark.slow  # each test trains under torchrun

# batch 16 = 2 micro-batches of 8: one per process under DDP, accumulated in one process
RECIPE = {"steps": 120, "batch_size": 16, "micro_batch": 8, "checkpoint_every": 10, "eval_every": 60}


def test_two_processes_match_one_and_resume_after_sigterm(tmp_path, prepared, checkpoint_store, monkeypatch):
    single = stage_dir(tmp_path / "single", prepared, **RECIPE)
    run_stage(single)

    ddp = stage_dir(tmp_path / "ddp", prepared, **RECIPE, nproc=2)
    ckpt = checkpoint_store
    p = start_stage(ddp)  # the stage becomes torchrun's agent: p.pid is the agent
    assert wait_for(lambda: checkpoint_step(ckpt) >= 10, p), p.communicate()[1][-3000:]
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "stopped by signal" in err, err[-3000:]
    stopped_at = checkpoint_step(ckpt)
    assert 10 <= stopped_at < RECIPE["steps"]

    monkeypatch.setenv("VITPIPE_CHECKPOINT_KEEP", "1")
    resumed = run_stage(ddp)
    assert f"resuming from local store {checkpoint_store}/" in resumed.stderr
    assert f"at step {stopped_at}/" in resumed.stderr
    assert resumed.stderr.count("resuming from") == 1  # rank 0 only speaks
    a, b = weights(single / "models/scratch/seed-0/model.pt"), weights(ddp / "models/scratch/seed-0/model.pt")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
    assert tsv_steps(ddp / "plots/train_scratch/seed-0/train.tsv") == list(range(1, RECIPE["steps"] + 1))
    (ck,) = [torch.load(f, weights_only=True) for f in checkpoint_store.glob("*/step-*.pt")]
    assert ck["finished"] and len(ck["rng"]) == 2  # every process's RNG state (kept: VITPIPE_CHECKPOINT_KEEP)
    import json

    m = json.loads((ddp / "metrics/train_scratch/seed-0.json").read_text())
    assert m["devices"] == 2 and m["img_per_s_per_device"] == pytest.approx(m["img_per_s"] / 2, rel=0.01)


WORKER = """
import os, signal, sys, time
rank = int(os.environ["RANK"])
if rank == 1:
    if sys.argv[1] == "crash":
        os.kill(os.getpid(), signal.SIGKILL)  # the OOM killer, say
    print("vitpipe: error: what went wrong and the fix", file=sys.stderr)
    sys.exit(2)
time.sleep(30)  # rank 0 is still training when rank 1 goes: torchrun stops it
"""


@pytest.mark.parametrize("how", ["crash", "error"])
def test_a_failed_worker_is_one_line_not_torchruns_traceback(tmp_path, how):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    agent = (
        "import sys; from vitpipe.training.distributed import torchrun; "
        f"sys.exit(torchrun(['--standalone', '--nproc_per_node=2', {str(script)!r}, {how!r}]))"
    )
    p = subprocess.run(
        [sys.executable, "-c", agent],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # as relaunch sets it
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    if how == "error":  # the worker's own line, and nothing after it
        assert (p.returncode, lines) == (2, ["vitpipe: error: what went wrong and the fix"]), p.stderr
    else:
        assert (p.returncode, lines) == (
            137,
            ["vitpipe: error: training process 1 was killed by SIGKILL; its output is above"],
        ), p.stderr
