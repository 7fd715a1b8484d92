"""Step 3: the compute model's peak against the allocator's, measured through fit itself.

On the GPU, for ViT-B/32, B/16 and B/8 at two micro-batches each: fp32/bf16/fp16 with AdamW,
bf16 with SGD (the fine-tuning optimizer), bf16 with activation checkpointing. Each case is
a 2-step fit (the second step has the optimizer state) with the peak statistics reset just
before it; the baseline is what is allocated then, with the cuBLAS workspace already made
(reported apart, outside the measurement). Reserved is reported beside allocated, and the
CUDA context against the planner's allowance for it. A line through each setting's two
micro-batches splits the error into a per-image and a fixed part.

On the CPU (dry run) the stand-in compares the saved-tensor bytes (compute.measure_saved_bytes
against compute.step_saved_total)."""

from __future__ import annotations

import copy
import itertools
import shutil

from gpu_proof.common import (
    MIB,
    TARGETS,
    Ctx,
    Recorder,
    call_fit,
    case_label,
    free_memory,
    model_label,
    need_device,
    profile_of,
    recipe_for,
    synthetic_split,
)

# (precision, optimizer, activation checkpointing) measured at each micro-batch
GPU_SETTINGS = [
    ("fp32", "adamw", False),
    ("bf16", "adamw", False),
    ("fp16", "adamw", False),
    ("bf16", "sgd", False),
    ("bf16", "adamw", True),
]
FOLDERS = itertools.count()
CPU_SETTINGS = [(p, "adamw", ck) for ck in (False, True) for p in ("fp32", "bf16")]


def run(rec: Recorder, ctx: Ctx):
    dev = need_device(rec, ctx)
    cuda = dev.type == "cuda"
    measure = (
        "torch.cuda.max_memory_allocated over a 2-step fit, less the baseline at its start"
        if cuda
        else "saved tensors of forward + loss (CPU stand-in: compute.measure_saved_bytes vs step_saved_total)"
    )
    rec.set(measure=measure, cases=[])
    baseline = cuda_baseline(dev) if cuda else None
    if baseline:
        rec.set(baseline=baseline)
    cases = []
    for spec, batches in ctx.cfg["cases"]:
        ctx.template = None  # the model, built once per spec and copied for each case
        for setting in GPU_SETTINGS if cuda else CPU_SETTINGS:
            for batch in batches:
                case = {
                    "model": model_label(spec, ctx.cfg["size"]),
                    "precision": setting[0],
                    "optimizer": setting[1],
                    "checkpointing": setting[2],
                    "batch": batch,
                }
                rec.running(case_label(case))
                (gpu_case if cuda else cpu_case)(case, spec, ctx, dev)
                cases.append(case)
                rec.set(cases=cases)
                free_memory()
    measured = [x for x in cases if x.get("error") is not None]
    worst = max(measured, key=lambda x: abs(x["error"]), default=None)
    outside = [x for x in measured if abs(x["error"]) > TARGETS["memory_error"]]
    rec.set(cases=cases, worst=worst, outside_target=len(outside), split=split_errors(measured))
    rec.check("cases measured", len(measured) >= max(1, len(cases) // 2), f"{len(measured)} of {len(cases)}")
    rec.check("every measurement is positive", all(x["measured_mib"] > 0 for x in measured), "")
    if baseline:
        rec.check(
            "the CUDA context fits the planner's allowance for it",
            baseline["cuda_context_mib"] <= baseline["planner_reserve_mib"],
            f"{baseline['cuda_context_mib']:.0f} MiB measured, {baseline['planner_reserve_mib']:.0f} MiB allowed",
        )
    if worst:
        rec.headline(
            f"{len(measured)} cases, worst error {worst['error']:+.1%} ({case_label(worst)}); "
            f"{len(outside)} outside {TARGETS['memory_error']:.0%}" + ("" if cuda else " (CPU stand-in)")
        )


def cuda_baseline(dev) -> dict:
    """The cuBLAS workspace made (and measured) before any baseline; the CUDA context."""
    import torch

    torch.zeros(1, device=dev)
    before = torch.cuda.memory_allocated(dev)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        a = torch.randn(64, 64, device=dev, dtype=dtype)
        (a @ a).sum().item()
        del a
    workspace = torch.cuda.memory_allocated(dev) - before
    free, total = torch.cuda.mem_get_info(dev)
    profile = profile_of(dev)
    return {
        "allocated_mib": torch.cuda.memory_allocated(dev) / MIB,
        "cublas_workspace_mib": workspace / MIB,
        "cuda_context_mib": (total - free - torch.cuda.memory_reserved(dev)) / MIB,
        "planner_reserve_mib": profile.reserve_bytes / MIB,
        "card_mib": total / MIB,
    }


def gpu_case(case: dict, spec: dict, ctx: Ctx, dev):
    import torch

    from vitpipe.costmodel import compute
    from vitpipe.models import build_model, model_config

    size, classes, batch = ctx.cfg["size"], ctx.cfg["classes"], case["batch"]
    prec, opt, ckpt = case["precision"], case["optimizer"], case["checkpointing"]
    profile = profile_of(dev)
    pred = compute.memory(model_config(spec, classes, size), batch, prec, opt, "sdpa", ckpt)["peak"]
    case["predicted_mib"] = pred / MIB
    if compute.required_bytes(pred, profile) > profile.memory_bytes:
        case["note"] = f"skipped: predicted not to fit {profile.label}"
        return
    if ctx.template is None:
        torch.manual_seed(0)
        ctx.template = build_model(spec, classes, size)
    model = copy.deepcopy(ctx.template)
    data = synthetic_split(max(2 * batch, 64), size, classes)
    r = recipe_for(
        batch_size=batch, micro_batch=batch, steps=2, precision=prec, optimizer=opt, activation_checkpointing=ckpt
    )
    folder = ctx.work / f"fit-{next(FOLDERS)}"
    free_memory()
    torch.cuda.synchronize(dev)
    base, base_reserved = torch.cuda.memory_allocated(dev), torch.cuda.memory_reserved(dev)
    torch.cuda.reset_peak_memory_stats(dev)  # this case's peak only
    try:
        call_fit(model, data, r, folder, spec, size, classes, "gpu_proof memory", weights=False)
    except Exception as e:  # noqa: BLE001 — an out-of-memory (the plan message) is this case's result
        case["note"] = f"{type(e).__name__}: {str(e)[:160]}"
        return
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # tmpfs: 30 fits' step logs and stores would add up
    torch.cuda.synchronize(dev)
    measured = torch.cuda.max_memory_allocated(dev) - base
    case.update(
        measured_mib=measured / MIB,
        reserved_mib=(torch.cuda.max_memory_reserved(dev) - base_reserved) / MIB,
        error=(pred - measured) / measured,
    )


def cpu_case(case: dict, spec: dict, ctx: Ctx, dev):
    import torch

    from vitpipe.costmodel import compute
    from vitpipe.models import build_model, model_config
    from vitpipe.training.recipe import prepare_model

    size, classes, batch, prec, ckpt = (
        ctx.cfg["size"],
        ctx.cfg["classes"],
        case["batch"],
        case["precision"],
        case["checkpointing"],
    )
    torch.manual_seed(0)
    model = build_model(spec, classes, size).train()
    prepare_model(model, recipe_for(activation_checkpointing=ckpt), "train")
    measured = compute.measure_saved_bytes(model, torch.randn(batch, 3, size, size), prec)
    pred = compute.step_saved_total(model_config(spec, classes, size), batch, prec, "sdpa", ckpt, device_type="cpu")
    case.update(predicted_mib=pred / MIB, measured_mib=measured / MIB, error=(pred - measured) / measured)


def split_errors(cases: list[dict]) -> list[dict]:
    """Per setting (model, precision, optimizer, checkpointing) with two micro-batches: the
    per-image slope and the fixed intercept, predicted and measured, and the error of each."""
    groups: dict[tuple, list[dict]] = {}
    for c in cases:
        groups.setdefault((c["model"], c["precision"], c["optimizer"], c["checkpointing"]), []).append(c)
    out = []
    for key, cs in groups.items():
        if len(cs) < 2:
            continue
        a, b = sorted(cs, key=lambda c: c["batch"])[:2]
        db = b["batch"] - a["batch"]
        per_p, per_m = (b["predicted_mib"] - a["predicted_mib"]) / db, (b["measured_mib"] - a["measured_mib"]) / db
        fix_p, fix_m = a["predicted_mib"] - per_p * a["batch"], a["measured_mib"] - per_m * a["batch"]
        out.append(
            {
                "setting": f"{key[0]} {key[1]} {key[2]}{' ckpt' if key[3] else ''}",
                "per_image_predicted_mib": per_p,
                "per_image_measured_mib": per_m,
                "per_image_error": (per_p - per_m) / per_m if per_m else None,
                "fixed_predicted_mib": fix_p,
                "fixed_measured_mib": fix_m,
                "fixed_error": (fix_p - fix_m) / abs(fix_m) if fix_m else None,
            }
        )
    return out
