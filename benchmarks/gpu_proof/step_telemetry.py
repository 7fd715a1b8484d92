"""Step 5: NVML utilisation, memory and power in the metrics JSON a short fit writes."""

from __future__ import annotations

import json

from gpu_proof.common import (
    Ctx,
    Recorder,
    call_fit,
    need_device,
    profile_of,
    recipe_for,
    resolve_precision,
    synthetic_split,
)

NVML_KEYS = ("mean_gpu_util_pct", "peak_gpu_mem_used_mb", "gpu_mem_total_mb", "mean_gpu_power_w", "peak_gpu_power_w")


def run(rec: Recorder, ctx: Ctx):
    import torch

    from vitpipe.costmodel import compute
    from vitpipe.models import build_model, model_config

    dev = need_device(rec, ctx)
    c = ctx.cfg
    spec, size, classes, batch = c["spec"], c["size"], c["classes"], c["batch"]
    prec = resolve_precision("auto", dev)
    steps = c.get("steps")
    if steps is None:  # long enough for a few 1 s samples: the compute model's time at the profile's MFU
        profile = profile_of(dev)
        img_s = compute.throughput(
            compute.flops(model_config(spec, classes, size))["train"], profile, prec, profile.mfu
        )
        steps = max(20, min(400, int(c["seconds"] * img_s / batch)))
    try:
        import pynvml  # noqa: F401

        rec.set(pynvml=True)
    except ImportError:
        rec.set(pynvml=False)
    torch.manual_seed(0)
    folder = ctx.work / "fit"
    rec.running(f"fit {steps} steps")
    call_fit(
        build_model(spec, classes, size),
        synthetic_split(max(256, 2 * batch), size, classes),
        recipe_for(batch_size=batch, micro_batch=batch, steps=steps, precision=prec),
        folder,
        spec,
        size,
        classes,
        "gpu_proof telemetry",
        weights=False,
    )
    metrics = json.loads((folder / "metrics.json").read_text())  # what the stage wrote, not what fit returned
    rec.set(steps=steps, precision=prec, metrics=metrics)
    rec.check(
        "the metrics JSON has the process RSS", metrics.get("peak_rss_mb", 0) > 0, f"{metrics.get('peak_rss_mb')} MB"
    )
    if dev.type != "cuda":
        rec.check("no GPU keys without a GPU", not any(k in metrics for k in NVML_KEYS), "")
        rec.headline(f"CPU: peak RSS {metrics['peak_rss_mb']:.0f} MB; no NVML keys (as it should be)")
        rec.skip("no CUDA")
    missing = [k for k in NVML_KEYS if k not in metrics]
    rec.check(
        "NVML utilisation, memory and power are in the metrics",
        not missing,
        "missing: " + ", ".join(missing) if missing else "all there",
    )
    rec.check("the GPU was busy", metrics.get("mean_gpu_util_pct", 0) > 0, f"{metrics.get('mean_gpu_util_pct')} %")
    rec.check("power was read", metrics.get("mean_gpu_power_w", 0) > 0, f"{metrics.get('mean_gpu_power_w')} W")
    total = torch.cuda.get_device_properties(dev).total_memory / 2**20
    rec.check(
        "NVML's total memory is this card's",
        abs(metrics.get("gpu_mem_total_mb", 0) - total) < 0.1 * total,
        f"NVML {metrics.get('gpu_mem_total_mb')} MB, torch {total:.0f} MB",
    )
    rec.check(
        "NVML's used memory covers the allocator's peak",
        metrics.get("peak_gpu_mem_used_mb", 0) >= metrics.get("peak_cuda_allocated_mb", float("inf")),
        f"NVML {metrics.get('peak_gpu_mem_used_mb')} MB >= allocator {metrics.get('peak_cuda_allocated_mb')} MB",
    )
    rec.headline(
        f"mean GPU util {metrics.get('mean_gpu_util_pct')} %, peak GPU memory {metrics.get('peak_gpu_mem_used_mb')} "
        f"of {metrics.get('gpu_mem_total_mb')} MB, mean power {metrics.get('mean_gpu_power_w')} W "
        f"(peak {metrics.get('peak_gpu_power_w')} W) over {metrics.get('wall_time_s')} s"
    )
