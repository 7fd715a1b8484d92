"""Step 7: bf16 only where native (compute capability >= 8.0), `auto`, fp16 with its grad
scaler; fit resolves `auto` and refuses bf16 on a card without it (vitpipe.hardware.precision)."""

from __future__ import annotations

import math
import time

from gpu_proof.common import (
    Ctx,
    Recorder,
    call_fit,
    device_of,
    recipe_for,
    synthetic_split,
)


def run(rec: Recorder, ctx: Ctx):
    import torch

    from vitpipe import params
    from vitpipe.errors import ParamError
    from vitpipe.hardware import precision
    from vitpipe.models import build_model

    c = ctx.cfg
    spec, size, batch = c["spec"], c["size"], c["batch"]
    dev = device_of(ctx)
    rec.set(params_accept_auto="auto" in getattr(params, "PRECISIONS", ()))

    def fit_runs(prec: str, steps: int, name: str) -> dict:
        torch.manual_seed(0)
        return call_fit(
            build_model(spec, 10, size),
            synthetic_split(max(64, 2 * batch), size, 10),
            recipe_for(batch_size=batch, micro_batch=batch, steps=steps, precision=prec),
            ctx.work / name,
            spec,
            size,
            10,
            f"gpu_proof precision {prec}",
            weights=False,
        )

    def fit_accepts_auto() -> tuple[bool, str]:
        try:
            m = fit_runs("auto", 2, "auto")
            return True, f"fit trained 2 steps with precision auto ({m.get('precision', 'resolved inside fit')})"
        except Exception as e:  # noqa: BLE001
            return False, f"{type(e).__name__}: {e}"[:300]

    def fit_refuses_bf16() -> str | None:
        try:
            fit_runs("bf16", 2, f"bf16-{time.monotonic_ns()}")
        except ParamError as e:
            return str(e)
        return None

    if dev.type != "cuda":
        auto = precision.resolve("auto", dev, "train.precision")
        rec.check("auto is fp32 on the CPU", auto == "fp32", auto)
        integrated, how = fit_accepts_auto()
        rec.set(cpu_auto=auto, fit_accepts_auto=integrated, fit_auto_detail=how)
        rec.headline(f"CPU: auto -> {auto}; fit accepts precision auto: {'yes' if integrated else 'not yet'}")
        rec.skip("no CUDA")
    name = torch.cuda.get_device_name(dev)
    cap = torch.cuda.get_device_capability(dev)
    native = cap >= (8, 0)
    auto = precision.resolve("auto", dev, "train.precision")
    rec.set(gpu=name, capability=f"{cap[0]}.{cap[1]}", native_bf16=native, auto=auto)
    rec.check(
        "auto picks bf16 where native, fp16 otherwise", auto == ("bf16" if native else "fp16"), f"{cap} -> {auto}"
    )
    try:
        precision.resolve("bf16", dev, "train.precision")
        refused = None
    except ParamError as e:
        refused = str(e)
    if native:
        rec.check("bf16 is accepted on this card", refused is None, refused or "accepted")
    else:
        rec.check(
            "bf16 is refused on this card, offering fp16 or auto",
            bool(refused) and name in refused and "use fp16 (with its grad scaler) or auto" in refused,
            refused or "accepted",
        )
    # what a card without bf16 would say, on this card (a T4, compute capability 7.5)
    real = torch.cuda.get_device_capability, torch.cuda.get_device_name
    torch.cuda.get_device_capability, torch.cuda.get_device_name = (lambda d=None: (7, 5)), (lambda d=None: "Tesla T4")
    try:
        sim_auto = precision.resolve("auto", dev, "train.precision")
        try:
            precision.resolve("bf16", dev, "train.precision")
            sim_msg = None
        except ParamError as e:
            sim_msg = str(e)
    finally:
        torch.cuda.get_device_capability, torch.cuda.get_device_name = real
    rec.set(simulated_t4={"auto": sim_auto, "bf16": sim_msg})
    rec.check(
        "on a T4 (simulated) auto is fp16 and bf16 is refused", sim_auto == "fp16" and bool(sim_msg), sim_msg or ""
    )
    # and the training loop itself: precision bf16 on a card without it must stop, not run emulated
    if not native:
        fit_refusal = fit_refuses_bf16()
    else:
        torch.cuda.get_device_capability, torch.cuda.get_device_name = (
            (lambda d=None: (7, 5)),
            (lambda d=None: "Tesla T4"),
        )
        try:
            fit_refusal = fit_refuses_bf16()
        finally:
            torch.cuda.get_device_capability, torch.cuda.get_device_name = real
    rec.set(fit_bf16_refusal=fit_refusal)
    rec.check(
        f"fit refuses precision bf16 on a{'' if not native else ' (simulated)'} card without native bf16",
        bool(fit_refusal) and "use fp16" in fit_refusal,
        fit_refusal or "fit trained in bf16 (emulated)",
    )
    rec.running("fp16 with the grad scaler on this card")
    m = fit_runs("fp16", c["steps"], "fp16")
    rec.set(fp16_metrics={k: m.get(k) for k in ("train_loss", "skipped_steps", "img_per_s")})
    rec.check(
        "fp16 with its grad scaler trains on this card",
        math.isfinite(m.get("train_loss", float("nan"))),
        f"loss {m.get('train_loss')}, {m.get('skipped_steps')} steps skipped by the scaler",
    )
    integrated, how = fit_accepts_auto()
    rec.set(fit_accepts_auto=integrated, fit_auto_detail=how)
    rec.check("fit resolves precision: auto", integrated, how)
    rec.headline(
        f"{name} ({cap[0]}.{cap[1]}): auto -> {auto}; bf16 {'accepted' if native else 'refused'}; "
        f"simulated T4: auto -> {sim_auto}, bf16 refused; fp16 + scaler loss {m.get('train_loss')}; "
        f"fit resolves auto: {'yes' if integrated else 'no'}"
    )
