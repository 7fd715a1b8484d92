"""Exact resume through the real stage script and through `dvc repro`: SIGKILL at random
moments (between checkpoint writes and during them), run again, and the final weights are
bit-identical to a run that was never interrupted."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import run, store_steps
from test_train import ENV, assert_identical, run_stage, stage_dir, start_stage, tsv_steps, weights  # noqa: F401

pytestmark = pytest.mark.slow  # each test trains and kills real stage processes

# Long enough to be killed mid-way (~25 ms a step here), with a checkpoint every 3 steps so
# that kills land during writes too.
LONG = {"steps": 150, "checkpoint_every": 3, "eval_every": 50}


def checkpoint_step(store: Path) -> int:
    """The newest step in the checkpoint store, -1 when there is none."""
    return max(store_steps(store), default=-1)


def wait_for(cond, proc, timeout=120.0, poll=0.002):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise AssertionError("timed out")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prepared):
    """The uninterrupted run's final weights."""
    d = stage_dir(tmp_path_factory.mktemp("reference"), prepared, **LONG)
    run_stage(d)
    return weights(d / "models/scratch/seed-0/model.pt")


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path, prepared, reference, checkpoint_store):
    d = stage_dir(tmp_path / "run", prepared, **LONG)
    ckpt = checkpoint_store
    rng = random.Random(1234)
    killed, mid_write, resumed_at = 0, 0, []
    for attempt in range(4):
        p = start_stage(d)
        before = checkpoint_step(ckpt)
        wait_for(lambda: checkpoint_step(ckpt) > before, p)  # it made progress
        if attempt % 2 == 0:  # during a write: as soon as a checkpoint's temp file shows up
            wait_for(lambda: any(ckpt.glob("*/.step-*")), p, poll=0.0005)
        else:  # between writes: at a random moment
            time.sleep(rng.uniform(0.0, 0.3))
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            killed += 1
        _, err = p.communicate()
        mid_write += any(ckpt.glob("*/.step-*"))  # SIGKILL leaves the temp file behind
        if "resuming from" in err:
            resumed_at.append(int(err.split(" at step ")[1].split("/")[0]))
    assert killed >= 3, "the runs finished before they could be killed: make LONG longer"
    assert mid_write >= 1
    final = run_stage(d)
    assert "resuming from" in final.stderr
    resumed_at.append(int(final.stderr.split(" at step ")[1].split("/")[0]))
    assert resumed_at == sorted(resumed_at) and resumed_at[-1] > 0  # each run went on from the last
    assert_identical(reference, weights(d / "models/scratch/seed-0/model.pt"))
    assert tsv_steps(d / "plots/train_scratch/seed-0/train.tsv") == list(range(1, LONG["steps"] + 1))
    assert tsv_steps(d / "plots/train_scratch/seed-0/eval.tsv") == [50, 100, 150]
    assert not list(ckpt.glob("*/*step-*"))  # no litter from killed writes, no checkpoint of the finished run


@pytest.mark.slow
def test_dvc_repro_killed_mid_stage_resumes(project, prepared, reference, checkpoint_store):
    repo = project
    doc = yaml.safe_load((repo / "params.yaml").read_text())
    doc["train"].update(LONG)
    (repo / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    dvc = [sys.executable, "-m", "dvc"]
    env = {**ENV, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    run(dvc + ["repro", "preprocess"], repo, env=env)
    ckpt = checkpoint_store
    p = subprocess.Popen(
        dvc + ["repro", "train_scratch@0"],
        cwd=repo,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    wait_for(lambda: checkpoint_step(ckpt) >= 30, p)
    os.killpg(p.pid, signal.SIGKILL)  # dvc and the stage it runs, like a lost runtime
    p.communicate()
    step = checkpoint_step(ckpt)
    assert 30 <= step < LONG["steps"]
    # DVC's own lock records the dead pid; the next dvc command sees it is dead and goes on
    again = run(dvc + ["repro", "train_scratch@0"], repo, env=env)
    out = again.stdout + again.stderr
    assert "Running stage 'train_scratch@0'" in out
    assert f"resuming from local store {checkpoint_store}/" in out and f"at step {step}/{LONG['steps']}" in out
    assert_identical(reference, weights(repo / "models/scratch/seed-0/model.pt"))
    status = run(dvc + ["status", "train_scratch@0"], repo, env=env)
    assert "changed" not in status.stdout
