"""What every part of the harness shares: the steps and their limits, what each mode runs,
a step's Recorder, and the helpers the steps call. Imports no torch at module level: the
orchestrator reads this and never initialises CUDA."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import math
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"
SCHEMA = 2
TARGETS = {"mfu": 0.60, "pipeline_over_bare": 0.97, "memory_error": 0.10}
GIB, MIB = 2**30, 2**20


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    title: str
    gpu_limit_s: int
    dry_limit_s: int


# The GPU limits add up to the default budget, 480 s (8 min) with the probe: what one
# 10-minute call holds with room for the start and the transfers. Compile is inside
# throughput's limit. A step the budget cannot hold is skipped with its limit written.
PROBE = Step("probe", "machine and environment", 20, 30)
STEPS = [
    Step("gpu_tests", "gpu-marked tests", 45, 60),
    Step("throughput", "throughput: bare loop vs fit, MFU", 125, 90),
    Step("memory", "memory: predicted vs measured through fit", 80, 60),
    Step("oom", "OOM: the plan message, then the plan", 35, 30),
    Step("telemetry", "NVML telemetry in the metrics", 20, 30),
    Step("resume", "resume: SIGKILL, resume, compare", 60, 60),
    Step("sharded", "sharded: FSDP on one GPU, DCP resume, ResNet, compile", 70, 60),
    Step("precision", "precision: bf16 only where native", 25, 30),
]
GPU_BUDGET_S = PROBE.gpu_limit_s + sum(s.gpu_limit_s for s in STEPS)
DRY_BUDGET_S = 360

# The bare loops' distinct input batches, in all: past a CPU's last-level cache. One batch
# repeated stays in cache, which no epoch over a dataset does (on the dry run's model that
# alone made the bare loop about 2 % faster).
POOL_BYTES = 64 << 20


def input_pool(micro_batch: int, size: int, device) -> list:
    """Distinct float32 input batches for a bare loop, POOL_BYTES of them (at least 2)."""
    import torch

    count = max(2, -(-POOL_BYTES // (micro_batch * 3 * size * size * 4)))
    return [torch.randn(micro_batch, 3, size, size, device=device) for _ in range(count)]


# What each mode runs. GPU: the sizes. Dry run: tiny, so the whole harness takes ~1 min on 2 cores.
TINY = {"arch": "vit", "patch": 8, "dim": 64, "depth": 2, "heads": 2, "mlp_ratio": 2.0}
MODES = {
    "gpu": {
        "throughput": {
            "spec": {"arch": "vit_b16"},
            "size": 224,
            "classes": 100,
            "batch": 256,
            "warmup": 8,
            "steps": 20,
            "repeats": 3,
            "compile": [False, True],
            "matmul_n": 8192,
            "matmul_repeats": 25,
        },
        "memory": {
            "size": 224,
            "classes": 100,
            "cases": [
                ({"arch": "vit_b32"}, (64, 256)),
                ({"arch": "vit_b16"}, (32, 128)),
                ({"arch": "vit_b8"}, (8, 32)),
            ],
        },
        "oom": {"spec": {"arch": "vit_b16"}, "size": 224, "classes": 100},
        "telemetry": {"spec": {"arch": "vit_b16"}, "size": 224, "classes": 100, "batch": 64, "seconds": 5.0},
        "resume": {
            "spec": {"arch": "vit_s16"},
            "size": 224,
            "classes": 100,
            "n": 512,
            "steps": 24,
            "batch": 32,
            "micro": 16,
            "checkpoint_every": 8,
        },
        "sharded": {
            "spec": {"arch": "vit_s16"},
            "size": 224,
            "classes": 100,
            "n": 256,
            "steps": 16,
            "batch": 32,
            "micro": 16,
            "checkpoint_every": 8,
            "resnet": {"spec": {"arch": "resnet50"}, "batch": 64, "steps": 12},
            "compile": {"batch": 64, "steps": 12},
        },
        "precision": {"spec": {"arch": "vit_s16"}, "size": 224, "batch": 32, "steps": 20},
    },
    "dry": {
        "throughput": {
            "spec": TINY,
            "size": 32,
            "classes": 10,
            "batch": 32,
            "warmup": 5,
            "steps": 20,
            "repeats": 3,
            "compile": [False],
            "matmul_n": 256,
            "matmul_repeats": 10,
        },
        "memory": {"size": 32, "classes": 10, "cases": [(TINY, (4, 8)), ({**TINY, "patch": 4}, (2, 4))]},
        "oom": {"spec": {"arch": "vit_b16"}, "size": 224, "classes": 100, "profile": "h100-80"},
        "telemetry": {"spec": TINY, "size": 32, "classes": 10, "batch": 16, "steps": 20},
        "resume": {
            "spec": TINY,
            "size": 32,
            "classes": 10,
            "n": 256,
            "steps": 24,
            "batch": 16,
            "micro": 8,
            "checkpoint_every": 8,
        },
        "sharded": {
            "spec": TINY,
            "size": 32,
            "classes": 10,
            "n": 128,
            "steps": 12,
            "batch": 16,
            "micro": 8,
            "checkpoint_every": 4,
            "resnet": {"spec": {"arch": "resnet18"}, "batch": 16, "steps": 4},
            "compile": None,  # inductor on 2 CPU cores takes minutes: measured on the GPU only
        },
        "precision": {"spec": TINY, "size": 32, "batch": 8, "steps": 4},
    },
}


def die_with_parent():
    """preexec_fn of every process the harness starts: SIGKILL when its parent dies, even by
    SIGKILL, so no step outlives the harness holding the GPU (Linux; elsewhere a no-op)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def pythonpath(*extra: Path) -> str:
    return os.pathsep.join(filter(None, [str(ROOT), str(BENCHMARKS), *map(str, extra), os.environ.get("PYTHONPATH")]))


# ---------------------------------------------------------------------------------------
# A step's process: what it records


class Skipped(Exception):
    pass


class Recorder:
    """A step's result, rewritten (atomically) at each addition: a step killed at its time
    limit still leaves what it had measured."""

    def __init__(self, path: Path):
        self.path = path
        self.data = {"status": None, "reason": "", "headline": "", "checks": [], "results": {}, "running": ""}
        self.save()

    def save(self):
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)

    def set(self, **results):
        self.data["results"].update(results)
        self.save()

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.data["checks"].append({"name": name, "ok": bool(ok), "detail": detail})
        self.save()
        print(f"check {'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
        return bool(ok)

    def headline(self, text: str):
        self.data["headline"] = text
        self.save()

    def running(self, what: str):
        self.data["running"] = what
        self.save()
        print(f"-- {what}", flush=True)

    def skip(self, reason: str):
        raise Skipped(reason)


@dataclasses.dataclass
class Ctx:
    dry: bool
    work: Path  # this step's scratch folder
    logs: Path  # the folder archived into <out>/logs.tar.gz
    cfg: dict
    limit: float = 60.0

    @property
    def mode(self) -> str:
        return "dry" if self.dry else "gpu"


def device_of(ctx: Ctx):
    import torch

    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def need_device(rec: Recorder, ctx: Ctx):
    """The device a step runs on: CUDA, or the CPU in a dry run; without CUDA a real run skips."""
    dev = device_of(ctx)
    if dev.type != "cuda" and not ctx.dry:
        rec.skip("no CUDA")
    return dev


# ---------------------------------------------------------------------------------------
# Helpers shared by the steps


@contextlib.contextmanager
def one_process_group(dev):
    """A process group of one (NCCL on a GPU, gloo on the CPU) around a fit: with `parallel:
    fsdp` the fit shards onto it (sharding.resolve), so FSDP2, DCP and the collectives run on
    the one device a lease has."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:  # a free port on this machine for the group's store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if dev.type == "cuda":
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=dev)
    else:
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def run_paths(folder: Path, weights: bool = True):
    from vitpipe.training.loop import RunPaths

    return RunPaths(
        weights=folder / "model.pt" if weights else None, metrics=folder / "metrics.json", plots=folder / "plots"
    )


def call_fit(
    model,
    data,
    recipe,
    folder: Path,
    spec: dict,
    size: int,
    classes: int,
    desc: str,
    val=None,
    quiet: bool = True,
    weights: bool = True,
) -> dict:
    """vitpipe.training.loop.fit as the stages call it, with its checkpoints in a store under
    `folder` (`quiet=False`: with its progress bar; `weights=False`: a measuring fit, its final
    weights neither gathered, written nor copied into the store's record)."""
    from vitpipe.training.loop import TrainingJob, fit

    folder.mkdir(parents=True, exist_ok=True)
    return fit(
        TrainingJob(
            model,
            data,
            recipe,
            run_paths(folder, weights),
            val=val,
            run_config={"spec": spec, "image_size": size},
            fresh_key="train.resume",
            weights_meta={"spec": spec, "num_classes": classes, "image_size": size},
            desc=desc,
            quiet=quiet,
            store_dir=folder / "checkpoint-store",
        )
    )


def synthetic_split(n: int, size: int, classes: int, seed: int = 0):
    import numpy as np

    from vitpipe.data.prepared_store import Split

    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return Split(x, rng.integers(0, classes, n), [0.5] * 3, [0.25] * 3, hflip=True)


def recipe_for(**kw):
    from vitpipe.params import TrainParams

    base = dict(
        lr=1e-4,
        warmup_steps=1,
        weight_decay=0.05,
        label_smoothing=0.1,
        grad_clip=1.0,
        resume="fresh",
        checkpoint_every=10**6,
        eval_every=10**6,
        seed=0,
    )
    return TrainParams(**(base | kw))


def resolve_precision(requested: str, dev) -> str:
    """The one resolver (vitpipe.hardware.precision.resolve): `auto` is bf16 where native."""
    from vitpipe.hardware import precision

    return precision.resolve(requested, dev, "precision")


def amp_dtype(p: str):
    from vitpipe.training.recipe import autocast_dtype

    return autocast_dtype(p)


def sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def free_memory():
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def read_tsv(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    head = lines[0].split("\t")
    return [dict(zip(head, line.split("\t"))) for line in lines[1:] if line.strip()]


def profile_of(dev):
    """The compute model's profile of this CUDA device (None on the CPU)."""
    if dev.type != "cuda":
        return None
    from vitpipe.hardware.probe import profile_of as device_profile

    return device_profile(dev)


def model_label(spec: dict, size: int) -> str:
    if spec.get("arch") == "vit":
        return f"ViT patch {spec['patch']} dim {spec['dim']} depth {spec['depth']} at {size} px"
    from vitpipe.models import describe

    return describe(spec, size)


def case_label(c: dict) -> str:
    return (
        f"{c['model']} {c['precision']} {c.get('optimizer', 'adamw')}{' ckpt' if c['checkpointing'] else ''} "
        f"mb {c['batch']}"
    )


def fmt(v, spec=".1f", none="n/a") -> str:
    return none if v is None else format(v, spec)


def stats(values: list[float]) -> dict:
    """median with min-max: how a repeated measurement is reported."""
    import statistics

    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def weights_diff(a: dict, b: dict) -> dict:
    import torch

    exact = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    num = den = max_abs = 0.0
    for k in a:
        if not torch.is_floating_point(a[k]):
            continue
        d = a[k].double() - b[k].double()
        num += float(d.pow(2).sum())
        den += float(a[k].double().pow(2).sum())
        max_abs = max(max_abs, float(d.abs().max()) if d.numel() else 0.0)
    return {"bit_exact": exact, "max_abs_diff": max_abs, "rel_l2_diff": math.sqrt(num / den) if den else 0.0}


def child_cmd(*args: str) -> list[str]:
    return [sys.executable, str(BENCHMARKS / "gpu_proof"), *args]
