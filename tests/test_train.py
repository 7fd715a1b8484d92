"""The one training loop: schedule, accumulation, precisions, divergence, OOM advice, signals.

Most tests call `fit` in this process on a tiny ViT and random images (fast); the helpers at
the top also serve test_resume.py and test_ddp.py, which run the real stage scripts."""

import copy
import io
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MICRO, ROOT, write_params

from vitpipe.checkpoints import format as checkpoint
from vitpipe.data.prepared_store import Split
from vitpipe.errors import ParamError, UserError
from vitpipe.models import build_model
from vitpipe.params import TrainParams
from vitpipe.training.loop import RunPaths, TrainingDiverged, TrainingJob, fit
from vitpipe.training.oom import oom_message
from vitpipe.training.recipe import lr_at
from vitpipe.training.steplog import EVAL_COLUMNS, TRAIN_COLUMNS

SPEC = {"arch": "vit", "patch": 4, "dim": 32, "depth": 1, "heads": 2, "mlp_ratio": 2.0}
# One thread: deterministic, and far faster than two threads on a shared 2-core machine.
ENV = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


# ---------------------------------------------------------------------------------------
# Shared helpers (imported by test_resume.py and test_ddp.py)


def stage_dir(path: Path, prepared: Path, **train) -> Path:
    """A folder to run stages/*.py in: micro params with `train` overrides, and the data."""
    path.mkdir(parents=True, exist_ok=True)
    doc = copy.deepcopy(MICRO)
    doc["train"].update(train)
    write_params(path / "params.yaml", doc)
    (path / "data").symlink_to(prepared)
    return path


def start_stage(cwd: Path, stage: str = "train_scratch", args=("0",), **kw) -> subprocess.Popen:
    """A training stage for seed 0 (its argv: the seed)."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "stages" / f"{stage}.py"), *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **ENV},
        **kw,
    )


def run_stage(cwd: Path, stage: str = "train_scratch", timeout: float = 300) -> subprocess.CompletedProcess:
    p = start_stage(cwd, stage)
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"{stage} exited {p.returncode}\n{err[-3000:]}"
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def weights(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def assert_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def tsv_steps(path: Path) -> list[int]:
    lines = path.read_text().splitlines()
    return [int(line.split("\t")[0]) for line in lines[1:]]


# ---------------------------------------------------------------------------------------
# In-process fits


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: fast and deterministic


def synthetic(n=96, size=16, classes=4, seed=0, hflip=True) -> Split:
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return Split(x, rng.integers(0, classes, n), [0.5] * 3, [0.25] * 3, hflip=hflip)


def recipe(**kw) -> TrainParams:
    base = dict(
        steps=8,
        batch_size=16,
        micro_batch=8,
        lr=1e-3,
        warmup_steps=2,
        checkpoint_every=4,
        eval_every=4,
        label_smoothing=0.1,
        seed=0,
    )
    return TrainParams(**(base | kw))


def train(tmp: Path, r: TrainParams, model=None, val=True, spec=SPEC, weights=True, store=None, **kw):
    """fit() with its checkpoint store in tmp/store (or `store`); weights=False: a measuring fit."""
    torch.manual_seed(0)
    model = model if model is not None else build_model(spec, 4, 16)
    paths = RunPaths(weights=tmp / "model.pt" if weights else None, metrics=tmp / "metrics.json", plots=tmp / "plots")
    metrics = fit(
        TrainingJob(
            model,
            synthetic(),
            r,
            paths,
            val=synthetic(32, seed=1) if val else None,
            run_config={"spec": spec, "image_size": 16},
            fresh_key="train.resume",
            weights_meta={"spec": spec, "num_classes": 4, "image_size": 16},
            desc="test",
            quiet=True,
            store_dir=store or tmp / "store",
            **kw,
        )
    )
    return model, metrics


def stored(store: Path) -> dict[str, list[Path]]:
    """fingerprint -> its checkpoint files in a store, oldest first."""
    return {
        run.name: sorted(run.glob("step-*.pt"))
        for run in sorted(store.glob("*"))
        if run.is_dir() and not run.name.startswith(".") and list(run.glob("step-*.pt"))
    }


def only_checkpoint(store: Path) -> dict:
    runs = stored(store)
    assert len(runs) == 1 and len(next(iter(runs.values()))) == 1, runs
    return torch.load(next(iter(runs.values()))[0], weights_only=True)


def test_lr_schedule_warmup_then_cosine():
    r = recipe(steps=100, warmup_steps=10, lr=1.0)
    assert lr_at(0, r) == pytest.approx(0.1) and lr_at(9, r) == pytest.approx(1.0)
    assert lr_at(10, r) == pytest.approx(1.0) and lr_at(55, r) == pytest.approx(0.5)
    assert lr_at(99, r) < 0.001
    lrs = [lr_at(s, r) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_fit_writes_logs_metrics_and_removes_its_checkpoints(tmp_path, monkeypatch):
    _, m = train(tmp_path, recipe())
    train_tsv, eval_tsv = (tmp_path / "plots/train.tsv"), (tmp_path / "plots/eval.tsv")
    assert train_tsv.read_text().splitlines()[0].split("\t") == list(TRAIN_COLUMNS)
    assert eval_tsv.read_text().splitlines()[0].split("\t") == list(EVAL_COLUMNS)
    assert tsv_steps(train_tsv) == list(range(1, 9)) and tsv_steps(eval_tsv) == [4, 8]
    assert m["attention"] == "sdpa" and m["steps"] == 8 and m["peak_rss_mb"] > 0 and m["img_per_s"] > 0
    assert "mean_gpu_util_pct" not in m  # no NVML here: no GPU keys, no noise
    assert stored(tmp_path / "store") == {}  # outputs written: the finished run's checkpoints are gone
    # kept on request (VITPIPE_CHECKPOINT_KEEP): the finished checkpoint holds the whole state
    # (resume: fresh trains again instead of restoring the finished run's record)
    monkeypatch.setenv("VITPIPE_CHECKPOINT_KEEP", "1")
    first = weights(tmp_path / "model.pt")
    train(tmp_path, recipe(resume="fresh"))
    ck = only_checkpoint(tmp_path / "store")
    assert ck["finished"] and ck["step"] == 8 and len(ck["log"]["train"]) == 8
    assert set(ck) >= {"model", "optimizer", "scaler", "rng", "config", "digest"}
    assert set(ck["rng"][0]) >= {"python", "numpy", "torch"}
    # a finished run is restored from its record, with the same numbers
    assert_identical(first, weights(tmp_path / "model.pt"))
    train(tmp_path, recipe())
    assert_identical(first, weights(tmp_path / "model.pt"))


def test_accumulation_matches_one_big_batch(tmp_path):
    # augmentation on: its random draws are the batch's, whatever the split (input_pipeline)
    big, _ = train(tmp_path / "a", recipe(micro_batch=16), val=False)
    accum, _ = train(tmp_path / "b", recipe(micro_batch=4), val=False)
    for (k, a), b in zip(big.state_dict().items(), accum.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4), k


def test_activation_checkpointing_same_numbers(tmp_path):
    plain, _ = train(tmp_path / "a", recipe(), val=False)
    ckpt, _ = train(tmp_path / "b", recipe(activation_checkpointing=True), val=False)
    for (k, a), b in zip(plain.state_dict().items(), ckpt.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k


def test_activation_checkpointing_unsupported_is_a_param_error(tmp_path):
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3 * 16 * 16, 4)

        def forward(self, x):
            return self.fc(x.flatten(1))

    with pytest.raises(ParamError, match="train.activation_checkpointing"):
        train(tmp_path, recipe(activation_checkpointing=True), model=Tiny())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cpu(tmp_path, precision, monkeypatch):
    monkeypatch.setenv("VITPIPE_CHECKPOINT_KEEP", "1")
    _, m = train(tmp_path, recipe(precision=precision, steps=4), val=False)
    assert np.isfinite(m["train_loss"]) and m["skipped_steps"] >= 0
    if precision == "fp16":  # the grad scaler's state is checkpointed
        assert only_checkpoint(tmp_path / "store")["scaler"]["scale"] > 0


def _poison_after(model, calls: int, make, once=False):
    """A forward hook that replaces the output (or raises) from forward call `calls` on."""
    seen = [0]

    def hook(module, args, out):
        seen[0] += 1
        return make(out) if seen[0] > calls and not (once and seen[0] > calls + 1) else out

    model.register_forward_hook(hook)
    return model


def test_nan_loss_stops_naming_step_and_last_good_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = _poison_after(build_model(SPEC, 4, 16), 2 * 6, lambda out: out * float("nan"))  # 2 micro-batches/step
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 7 \(the last good checkpoint is step 4 in "):
        train(tmp_path, recipe(steps=12), model=model, val=False)
    ck = only_checkpoint(tmp_path / "store")
    assert ck["step"] == 4 and all(torch.isfinite(v).all() for v in ck["model"].values())


def test_fp16_overflow_steps_are_skipped_not_errors(tmp_path):
    """Gradients that overflow fp16 make the scaler skip the update; training goes on."""
    torch.manual_seed(0)
    model = build_model(SPEC, 4, 16)
    model.head.weight.register_hook(
        lambda g: g * float("inf") if not hasattr(model, "_blown") and not setattr(model, "_blown", 1) else g
    )
    _, m = train(tmp_path, recipe(precision="fp16", steps=4), model=model, val=False)
    assert m["skipped_steps"] == 1 and np.isfinite(m["train_loss"])


def test_oom_is_caught_and_reported(tmp_path):
    torch.manual_seed(0)

    def oom(out):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model = _poison_after(build_model(SPEC, 4, 16), 0, oom)
    with pytest.raises(UserError, match="out of memory at micro_batch=8 .*train.micro_batch"):
        train(tmp_path, recipe(), model=model, val=False)


@pytest.mark.parametrize(
    "error",
    [
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
        "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
    ],
)
def test_library_allocation_failures_get_the_plan_message(tmp_path, error):
    """cuBLAS/cuDNN run out of memory with a plain RuntimeError: the same plan message as torch's OOM."""

    def fail(out):
        raise RuntimeError(error)

    torch.manual_seed(0)
    with pytest.raises(UserError, match="out of memory at micro_batch=8 .*train.micro_batch"):
        train(tmp_path, recipe(), model=_poison_after(build_model(SPEC, 4, 16), 0, fail), val=False)


def test_other_runtime_errors_are_not_called_out_of_memory(tmp_path):
    def fail(out):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        train(tmp_path, recipe(), model=_poison_after(build_model(SPEC, 4, 16), 0, fail), val=False)


def test_oom_message_plans_with_the_compute_model():
    from vitpipe.costmodel.devices import get_device

    r = recipe(batch_size=512, micro_batch=512, steps=10, precision="fp32")
    msg = oom_message(
        r,
        "train",
        {"spec": {"arch": "vit_b16"}, "image_size": 224},
        100,
        torch.device("cuda", 0),
        profile=get_device("t4"),
    )
    assert "compute model's plan for batch 512 per device on Tesla T4" in msg
    assert "train.precision: fp32, train.micro_batch: " in msg and "accumulation steps" in msg
    micro = int(msg.split("train.micro_batch: ")[1].split(" ")[0])
    assert 0 < micro < 512 and 512 % micro == 0
    # under DDP the plan is per device
    assert "batch 256 per device" in oom_message(
        r,
        "train",
        {"spec": {"arch": "vit_b16"}, "image_size": 224},
        100,
        torch.device("cuda", 0),
        world=2,
        profile=get_device("t4"),
    )


def test_sigterm_checkpoints_exits_and_resumes_exactly(tmp_path):
    """SIGTERM (a preempted job, a Ctrl-C) checkpoints at the next sync and exits 143; the
    re-run resumes and ends with the weights of a run never interrupted."""
    r = recipe(steps=16, checkpoint_every=100)
    reference, _ = train(tmp_path / "ref", r)
    torch.manual_seed(0)
    model = _poison_after(
        build_model(SPEC, 4, 16), 2 * 5, lambda out: os.kill(os.getpid(), signal.SIGTERM) or out, once=True
    )
    with pytest.raises(SystemExit) as e:
        train(tmp_path / "run", r, model=model)
    assert e.value.code == 128 + signal.SIGTERM
    ck = only_checkpoint(tmp_path / "run/store")
    assert not ck["finished"] and ck["step"] == 8  # the sync after step 6: the eval at 8 (LOG_EVERY=10)
    resumed, _ = train(tmp_path / "run", r)
    assert_identical(reference.state_dict(), resumed.state_dict())
    assert tsv_steps(tmp_path / "run/plots/train.tsv") == list(range(1, 17))
    assert tsv_steps(tmp_path / "run/plots/eval.tsv") == [4, 8, 12, 16]


def _interrupted(tmp: Path, r: TrainParams, spec=SPEC) -> Path:
    """Run `r` until a SIGTERM after step 5 (checkpoint at step 8); returns its checkpoint file."""
    torch.manual_seed(0)
    model = _poison_after(
        build_model(spec, 4, 16), 2 * 5, lambda out: os.kill(os.getpid(), signal.SIGTERM) or out, once=True
    )
    before = set(p for files in stored(tmp / "store").values() for p in files)
    with pytest.raises(SystemExit):
        train(tmp, r, model=model, spec=spec)
    (new,) = set(p for files in stored(tmp / "store").values() for p in files) - before
    return new


def test_runs_with_other_params_do_not_block_each_other(tmp_path):
    """A interrupted, B runs to its end, A resumes where it stopped and ends as if never
    interrupted."""
    a, b = recipe(steps=16, checkpoint_every=100), recipe(steps=16, checkpoint_every=100, lr=0.002)
    reference, _ = train(tmp_path / "ref", a)
    a_ckpt = _interrupted(tmp_path / "run", a)
    _, mb = train(tmp_path / "run", b)
    assert mb["steps"] == 16 and a_ckpt.exists()  # B neither refused nor touched A's checkpoint
    resumed, _ = train(tmp_path / "run", a)
    assert_identical(reference.state_dict(), resumed.state_dict())
    assert stored(tmp_path / "run/store") == {}


def test_damaged_checkpoints_are_refused_naming_file_and_fix(tmp_path):
    r = recipe(steps=16, checkpoint_every=4)
    ck_path = _interrupted(tmp_path, r)
    good = ck_path.read_bytes()
    fix = r"vitpipe checkpoints rm [0-9a-f]{16}` or set train.resume: fresh"
    ck_path.write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match=rf"checkpoint {ck_path} is damaged: \d+ bytes, written as \d+ bytes; .*{fix}"):
        train(tmp_path, r)
    ck_path.write_bytes(os.urandom(len(good)))
    with pytest.raises(UserError, match=rf"checkpoint {ck_path} cannot be read .*{fix}"):
        train(tmp_path, r)
    # tensors overwritten with finite noise, the file otherwise valid: its digest no longer matches
    ck = torch.load(io.BytesIO(good), weights_only=True)
    for v in ck["model"].values():
        v.copy_(torch.randn_like(v))
    torch.save(ck, ck_path)
    manifest = ck_path.with_suffix(".json")  # its size updated too: only the digest can tell
    manifest.write_text(json.dumps(json.loads(manifest.read_text()) | {"size": ck_path.stat().st_size}))
    with pytest.raises(UserError, match=rf"checkpoint {ck_path} is damaged: its content does not match .*{fix}"):
        train(tmp_path, r)
    assert ck_path.exists()  # refused, not overwritten
    # only when asked: start over
    _, m = train(tmp_path, replace(r, resume="fresh"))
    assert m["steps"] == 16 and stored(tmp_path / "store") == {}


def test_stale_checkpoint_temp_files_are_removed(tmp_path):
    ck = _interrupted(tmp_path, recipe(steps=16, checkpoint_every=4))
    litter = ck.parent / ".step-00000012.pt.abc123.pt"  # what a save killed mid-write leaves
    litter.write_bytes(b"half a checkpoint")
    train(tmp_path, recipe(steps=16, checkpoint_every=4))
    assert not litter.exists()


def test_checkpoint_fingerprint_and_rng_roundtrip():
    import random

    state = checkpoint.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoint.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
    assert checkpoint.fingerprint({"a": 1, "b": 2}) == checkpoint.fingerprint({"b": 2, "a": 1})
    assert checkpoint.tensors_digest([torch.zeros(3)]) != checkpoint.tensors_digest([torch.zeros(4)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_precisions(tmp_path, precision):
    _, m = train(tmp_path, recipe(precision=precision, steps=6))
    assert m["device"] == "cuda" and np.isfinite(m["train_loss"])
    assert m["peak_cuda_allocated_mb"] > 0 and "gpu_mem_total_mb" in m


def test_an_empty_val_split_means_no_validation(tmp_path):
    """data.split val 0 (or a tiny dataset) leaves the val split empty: train on, validate never."""
    empty = Split(np.zeros((0, 16, 16, 3), dtype=np.uint8), np.zeros(0, dtype=np.int64), [0.5] * 3, [0.25] * 3)
    torch.manual_seed(0)
    paths = RunPaths(weights=tmp_path / "model.pt", metrics=tmp_path / "metrics.json", plots=tmp_path / "plots")
    m = fit(
        TrainingJob(
            build_model(SPEC, 4, 16),
            synthetic(),
            recipe(steps=4),
            paths,
            val=empty,
            run_config={"spec": SPEC, "image_size": 16},
            fresh_key="train.resume",
            weights_meta={},
            desc="test",
            quiet=True,
            store_dir=tmp_path / "store",
        )
    )
    assert m["steps"] == 4 and "val_acc" not in m and not (tmp_path / "plots/eval.tsv").exists()


def test_a_measuring_fit_writes_no_weights_and_its_record_restores_no_stage(tmp_path):
    """RunPaths(weights=None) (the GPU proof's measuring fits): metrics and step log, no
    weights anywhere; a run of the same fingerprint that wants weights trains, not restores."""
    _, metrics = train(tmp_path / "m", recipe(steps=4), val=False, weights=False, store=tmp_path / "store")
    assert metrics["steps"] == 4 and (tmp_path / "m" / "plots" / "train.tsv").exists()
    assert not list(tmp_path.rglob("*.pt")) and not list((tmp_path / "store").rglob("weights"))
    _, again = train(tmp_path / "t", recipe(steps=4), val=False, store=tmp_path / "store")
    assert (tmp_path / "t" / "model.pt").exists() and again["train_loss"] == metrics["train_loss"]


def test_fsdp_on_one_process_only_onto_a_group_its_caller_started(monkeypatch):
    """A stage never starts a group for one process: fsdp resolves to none. The GPU proof starts
    one (gloo here, NCCL there) to run the sharded path on its one device."""
    import torch.distributed as dist

    from vitpipe.training.sharding import resolve

    assert resolve("fsdp", 1, "train") == "none"
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(29600 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        assert resolve("fsdp", 1, "train") == "fsdp" and resolve("ddp", 1, "train") == "none"
    finally:
        dist.destroy_process_group()
