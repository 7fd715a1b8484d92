"""Step 4: a micro-batch the compute model says needs 1.25x the card goes through fit: it must
stop with the plan message; then the planned micro-batch x accumulation trains. Without
CUDA: the plan message for the H100 profile, parsed (nothing runs)."""

from __future__ import annotations

import math
import re

from gpu_proof.common import (
    GIB,
    Ctx,
    Recorder,
    call_fit,
    device_of,
    free_memory,
    profile_of,
    recipe_for,
    synthetic_split,
)


def overflowing_batch(cfg, profile, precision="fp32") -> int:
    """The smallest power of two whose predicted need is 1.25x the device's memory."""
    from vitpipe.costmodel import compute

    n = 8
    while compute.required_bytes(compute.memory(cfg, n, precision)["peak"], profile) < 1.25 * profile.memory_bytes:
        n *= 2
    return n


def planned_micro_batch(message: str) -> int | None:
    m = re.search(r"\.micro_batch: (\d+) \(", message)
    return int(m.group(1)) if m else None


def run(rec: Recorder, ctx: Ctx):
    import torch

    from vitpipe.errors import UserError
    from vitpipe.models import build_model, model_config
    from vitpipe.training.oom import oom_message

    c = ctx.cfg
    spec, size, classes = c["spec"], c["size"], c["classes"]
    cfg = model_config(spec, classes, size)
    dev = device_of(ctx)
    if dev.type != "cuda":
        # What the harness can do without a GPU: the plan message for a profile (nothing runs)
        from vitpipe.costmodel.devices import get_device

        profile = get_device(c.get("profile", "h100-80"))
        n = overflowing_batch(cfg, profile)
        msg = oom_message(
            recipe_for(batch_size=n, micro_batch=n, steps=2, precision="fp32"),
            "train",
            {"spec": spec, "image_size": size},
            classes,
            torch.device("cuda", 0),
            profile=profile,
        )
        micro = planned_micro_batch(msg)
        rec.set(profile=profile.label, overflowing_micro_batch=n, message=msg, planned_micro_batch=micro, ran=False)
        rec.check(
            "the plan message names a micro-batch that divides the batch",
            bool(micro) and micro < n and n % micro == 0,
            f"{n} -> {micro}",
        )
        rec.headline(f"{profile.label} profile: micro_batch {n} would overflow; plan {micro} (not run: no CUDA)")
        rec.skip("no CUDA")
    profile = profile_of(dev)
    n = overflowing_batch(cfg, profile)
    data = synthetic_split(n, size, classes)
    rec.set(profile=profile.label, memory_gib=profile.memory_bytes / GIB, overflowing_micro_batch=n, ran=True)
    rec.running(f"fit at micro_batch {n}")
    torch.manual_seed(0)
    msg = None
    try:
        call_fit(
            build_model(spec, classes, size),
            data,
            recipe_for(batch_size=n, micro_batch=n, steps=2, precision="fp32"),
            ctx.work / "overflow",
            spec,
            size,
            classes,
            "gpu_proof oom",
            weights=False,
        )
    except UserError as e:
        msg = str(e)
    free_memory()
    micro = planned_micro_batch(msg or "")
    rec.set(message=msg, planned_micro_batch=micro)
    rec.check(
        "the overflowing micro-batch gives the out-of-memory plan message",
        bool(msg and "out of memory" in msg and f"micro_batch={n}" in msg),
        (msg or "no error was raised")[:300],
    )
    if not rec.check(
        "the message plans a micro-batch that divides the batch",
        bool(micro) and micro < n and n % micro == 0,
        f"{n} -> {micro}",
    ):
        return
    rec.running(f"fit at the planned micro_batch {micro}")
    torch.cuda.reset_peak_memory_stats(dev)
    torch.manual_seed(0)
    metrics = call_fit(
        build_model(spec, classes, size),
        data,
        recipe_for(batch_size=n, micro_batch=micro, steps=2, precision="fp32"),
        ctx.work / "planned",
        spec,
        size,
        classes,
        "gpu_proof oom plan",
        weights=False,
    )
    peak = torch.cuda.max_memory_allocated(dev)
    rec.set(
        planned_peak_gib=peak / GIB,
        planned_metrics={k: metrics.get(k) for k in ("train_loss", "peak_cuda_allocated_mb")},
    )
    rec.check(
        "the planned micro-batch trains without running out of memory",
        metrics.get("steps") == 2 and math.isfinite(metrics.get("train_loss", float("nan"))),
        f"2 steps of {n} as {n // micro} x {micro}; peak {peak / GIB:.1f} GiB of {profile.memory_bytes / GIB:.1f}",
    )
    rec.headline(
        f"micro_batch {n} overflowed {profile.label}: plan message given; planned {n // micro} x {micro} "
        f"ran, peak {peak / GIB:.1f} of {profile.memory_bytes / GIB:.1f} GiB"
    )
