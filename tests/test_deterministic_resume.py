"""`deterministic: true` on the CPU: a run SIGKILLed after a checkpoint and run again ends on
the very weights of a run that was never interrupted, with deterministic kernels switched on
in both (not warn-only: torch would raise for an op without one)."""

import signal

import pytest
from test_resume import checkpoint_step, wait_for
from test_train import assert_identical, run_stage, stage_dir, start_stage, weights

RUN = {"steps": 40, "checkpoint_every": 5, "eval_every": 40, "deterministic": True}


@pytest.mark.slow
def test_a_deterministic_run_killed_and_resumed_is_bit_exact(tmp_path, prepared, monkeypatch):
    monkeypatch.setenv("VITPIPE_CHECKPOINT_DIR", str(tmp_path / "store-uninterrupted"))
    reference = stage_dir(tmp_path / "uninterrupted", prepared, **RUN)
    run_stage(reference)

    store = tmp_path / "store-killed"  # its own store: the finished run above is not restored here
    monkeypatch.setenv("VITPIPE_CHECKPOINT_DIR", str(store))
    d = stage_dir(tmp_path / "killed", prepared, **RUN)
    p = start_stage(d)
    assert wait_for(lambda: checkpoint_step(store) >= 5, p), "it finished before a checkpoint: make RUN longer"
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert 5 <= checkpoint_step(store) < RUN["steps"]
    final = run_stage(d)
    assert "resuming from" in final.stderr, final.stderr[-2000:]
    assert_identical(
        weights(reference / "models/scratch/seed-0/model.pt"), weights(d / "models/scratch/seed-0/model.pt")
    )
