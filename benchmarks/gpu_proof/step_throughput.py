"""Step 2: a bare loop against fit itself, in alternating repeats, compile off and on; MFU
against the datasheet peak and against the bf16 matmul peak measured here."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

from gpu_proof.common import (
    Ctx,
    Recorder,
    amp_dtype,
    call_fit,
    fmt,
    free_memory,
    input_pool,
    model_label,
    need_device,
    profile_of,
    read_tsv,
    recipe_for,
    resolve_precision,
    stats,
    sync,
    synthetic_split,
)


def matmul_peak(dev, dtype, n: int, repeats: int, inner: int = 10) -> list[float]:
    """FLOP/s of an n x n matmul: `repeats` timings of `inner` back-to-back matmuls, each
    synchronised before and after; the warm-up synchronised too (clocks and cuBLAS's
    heuristics settle before the first timing)."""
    import torch

    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(dev)
    rates = []
    for _ in range(repeats):
        sync(dev)
        t = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync(dev)
        rates.append(2 * n**3 * inner / (time.perf_counter() - t))
    del a, b
    return rates


class BareLoop:
    """The minimal loop on fixed tensors already on the device (same model, batch,
    micro-batches, precision, label smoothing, clip and AdamW as fit), built once and timed
    in rounds."""

    def __init__(self, spec, size, classes, r, dev, compile_: bool):
        import torch

        from vitpipe.models import build_model
        from vitpipe.training.recipe import prepare_model

        torch.manual_seed(0)
        self.model = build_model(spec, classes, size)
        prepare_model(self.model, r, "train")  # the same network: fused attention on
        self.model.to(dev).train()
        self.net = torch.compile(self.model) if compile_ else self.model
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=r.lr, weight_decay=r.weight_decay)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=r.precision == "fp16")  # a no-op unless fp16
        self.r, self.dev, self.dtype = r, dev, amp_dtype(r.precision)
        self.accum = r.batch_size // r.micro_batch
        self.xs = input_pool(r.micro_batch, size, dev)  # distinct batches, cycled through
        self.y = torch.randint(0, classes, (r.micro_batch,), device=dev)
        self.n = 0

    def step(self):
        import torch
        import torch.nn.functional as F

        r, scaler = self.r, self.scaler
        for _ in range(self.accum):
            x, self.n = self.xs[self.n % len(self.xs)], self.n + 1
            with torch.autocast(self.dev.type, dtype=self.dtype, enabled=self.dtype is not None):
                loss = F.cross_entropy(self.net(x), self.y, label_smoothing=r.label_smoothing)
            scaler.scale(loss / self.accum).backward()
        scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), r.grad_clip or float("inf"))
        scaler.step(self.opt)
        scaler.update()
        self.opt.zero_grad(set_to_none=True)

    def timed(self, warmup: int, steps: int) -> tuple[float, float]:
        """(img/s over `steps` after `warmup` steps, the warm-up's seconds)"""
        t = time.perf_counter()
        for _ in range(warmup):
            self.step()
        sync(self.dev)
        warm = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(steps):
            self.step()
        sync(self.dev)
        return self.r.batch_size * steps / (time.perf_counter() - t), warm


def fit_round(spec, size, classes, r, steps, warmup, folder: Path) -> dict:
    """fit itself (uint8 store, prefetching input pipeline, telemetry, step log; no
    evaluation, no periodic checkpoint): img/s from its own step log after `warmup` steps,
    the warm-up's seconds, and the host data time per step."""
    import torch

    from vitpipe.models import build_model

    torch.manual_seed(0)
    data = synthetic_split(max(4 * r.batch_size, 256), size, classes)
    metrics = call_fit(
        build_model(spec, classes, size),
        data,
        dataclasses.replace(r, steps=warmup + steps),
        folder,
        spec,
        size,
        classes,
        "gpu_proof throughput",
        weights=False,
    )
    rows = read_tsv(folder / "plots" / "train.tsv")
    timed = [row for row in rows if int(row["step"]) > warmup]
    rates = [float(row["img_per_s"]) for row in timed]  # per sync window, training time only
    img_s = len(rates) / sum(1 / v for v in rates) if rates and all(v > 0 for v in rates) else 0.0
    warm_s = sum(r.batch_size / float(row["img_per_s"]) for row in rows if int(row["step"]) <= warmup)
    return {
        "img_s": img_s,
        "warm_s": warm_s,
        "metrics": metrics,
        "data_ms": stats([float(row["data_ms"]) for row in timed])["median"],
        "data_wait_ms": stats([float(row["data_wait_ms"]) for row in timed])["median"],
    }


def run(rec: Recorder, ctx: Ctx):
    import torch

    from vitpipe.costmodel import compute
    from vitpipe.models import model_config

    dev = need_device(rec, ctx)
    c = ctx.cfg
    spec, size, classes = c["spec"], c["size"], c["classes"]
    prec = resolve_precision("auto", dev)  # bf16 where native, fp16 on an older card, fp32 on the CPU
    batch, profile, cfg = c["batch"], profile_of(dev), model_config(spec, classes, size)
    if profile is not None:  # the largest power-of-two batch <= c["batch"] the compute model fits here
        while batch > 8 and not compute.plan(cfg, batch, profile, precision=prec)["fits"]:
            batch //= 2
    r = recipe_for(batch_size=batch, micro_batch=batch, precision=prec)
    flops = compute.flops(cfg)["train"]
    rec.running("matmul peak")
    peak_dtype = amp_dtype("bf16" if dev.type == "cuda" and prec == "bf16" else prec) or torch.float32
    peaks = stats(matmul_peak(dev, peak_dtype, c["matmul_n"], c["matmul_repeats"]))
    peak_measured, peak_profile = peaks["median"], profile.peak_flops.get(prec) if profile is not None else None
    rec.set(
        model=model_label(spec, size),
        image_size=size,
        precision=prec,
        batch=batch,
        warmup=c["warmup"],
        steps=c["steps"],
        repeats=c["repeats"],
        device=str(dev),
        train_gflops_per_image=flops / 1e9,
        profile_label=profile.label if profile else None,
        peak_profile_tflops=peak_profile / 1e12 if peak_profile else None,
        peak_measured_tflops=peak_measured / 1e12 if peak_measured else None,
        peak_measured_tflops_spread={k: (v / 1e12 if k != "n" and v else v) for k, v in peaks.items()},
        runs=[],
    )
    rec.check(
        "measured matmul peak is positive",
        bool(peak_measured and peak_measured > 0),
        f"{fmt(peak_measured and peak_measured / 1e12, '.2f')} TFLOP/s (median of {peaks['n']})",
    )

    def mfu(img_s, peak):
        return img_s * flops / peak if img_s and peak else None

    runs = []
    for compile_ in (False, True):
        if compile_ not in c["compile"]:
            runs.append(
                {
                    "compile": compile_,
                    "skipped": "skipped: no CUDA (compile is measured on the GPU only)",
                    "ratio": None,
                }
            )
            continue
        run_ = measure(rec, ctx, spec, size, classes, dataclasses.replace(r, compile=compile_), dev)
        run_.update(
            bare_mfu_profile=mfu(run_["bare_img_s"], peak_profile),
            bare_mfu_measured=mfu(run_["bare_img_s"], peak_measured),
            pipeline_mfu_profile=mfu(run_["pipeline_img_s"], peak_profile),
            pipeline_mfu_measured=mfu(run_["pipeline_img_s"], peak_measured),
        )
        runs.append(run_)
        rec.set(runs=runs)
        ok = all(v and math.isfinite(v) and v > 0 for v in (run_["bare_img_s"], run_["pipeline_img_s"]))
        rec.check(
            f"both loops ran {c['repeats']} times, compile {'on' if compile_ else 'off'}",
            ok,
            f"bare {run_['bare_img_s']:.1f}, fit {run_['pipeline_img_s']:.1f} img/s (medians)",
        )
    done = [x for x in runs if not x.get("skipped")]
    rec.headline(
        "; ".join(
            f"compile {'on' if x['compile'] else 'off'}: fit {x['pipeline_img_s']:.1f} img/s, MFU "
            f"{fmt(x['pipeline_mfu_measured'], '.1%')} of measured / {fmt(x['pipeline_mfu_profile'], '.1%')} of datasheet "
            f"peak, fit/bare {x['ratio']:.3f} ({fmt(x['ratio_rounds']['min'], '.3f')}-{fmt(x['ratio_rounds']['max'], '.3f')}),"
            f" data {fmt(x['data_ms']['median'], '.2f')} ms/step"
            for x in done
        )
    )


def measure(rec: Recorder, ctx: Ctx, spec, size, classes, r, dev) -> dict:
    """`repeats` rounds of bare then fit; medians with min-max."""
    c = ctx.cfg
    tag = f"compile {'on' if r.compile else 'off'}"
    rec.running(f"bare loop, {tag}: build")
    bare = BareLoop(spec, size, classes, r, dev, r.compile)
    bare_rates, fit_rates, data_ms, wait_ms, ratios = [], [], [], [], []
    bare_warm = fit_warm = metrics = None
    for i in range(c["repeats"]):
        rec.running(f"bare loop, {tag}, round {i + 1}")
        img_s, warm = bare.timed(c["warmup"] if i == 0 else 3, c["steps"])
        bare_rates.append(img_s)
        bare_warm = warm if bare_warm is None else bare_warm
        rec.running(f"fit, {tag}, round {i + 1}")
        f = fit_round(spec, size, classes, r, c["steps"], c["warmup"], ctx.work / f"fit-{tag.replace(' ', '-')}-{i}")
        free_memory()
        fit_rates.append(f["img_s"])
        data_ms.append(f["data_ms"])
        wait_ms.append(f["data_wait_ms"])
        ratios.append(f["img_s"] / img_s if img_s else None)
        fit_warm = f["warm_s"] if fit_warm is None else fit_warm
        metrics = metrics or f["metrics"]
    del bare
    free_memory()
    b, p = stats(bare_rates), stats(fit_rates)
    return {
        "compile": r.compile,
        "bare_img_s": b["median"],
        "pipeline_img_s": p["median"],
        "ratio": p["median"] / b["median"] if b["median"] else None,
        "ratio_rounds": stats(ratios),
        "bare_spread": b,
        "pipeline_spread": p,
        "data_ms": stats(data_ms),
        "data_wait_ms": stats(wait_ms),
        "bare_rounds": bare_rates,
        "pipeline_rounds": fit_rates,
        "bare_warmup_s": bare_warm,
        "pipeline_warmup_s": fit_warm,
        "fit_metrics": {
            k: metrics.get(k)
            for k in (
                "img_per_s",
                "wall_time_s",
                "peak_cuda_allocated_mb",
                "mean_gpu_util_pct",
                "attention",
                "precision",
            )
        },
    }
