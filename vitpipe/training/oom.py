"""Out of device memory: what the cost model plans for this device instead, as one line: a
smaller micro-batch, half precision or activation checkpointing (vitpipe.costmodel.compute),
and sharding the training state (`parallel: fsdp`, vitpipe.costmodel.sharding) where the
run has several processes or where nothing fits one device whole."""

from __future__ import annotations

import torch

from vitpipe.costmodel import compute
from vitpipe.costmodel import sharding as cost_sharding
from vitpipe.hardware import precision, probe
from vitpipe.models import family_of_config, model_config
from vitpipe.params import TrainParams


def oom_message(
    recipe: TrainParams,
    section: str,
    run_config: dict,
    num_classes: int,
    device: torch.device,
    world: int = 1,
    profile=None,
) -> str:
    """CUDA ran out of memory: what the compute model plans for this device instead."""
    msg = f"CUDA out of memory at micro_batch={recipe.micro_batch} (batch_size={recipe.batch_size})"
    generic = (
        f"lower {section}.micro_batch (batch_size is kept by gradient accumulation), or set {section}.precision: bf16 "
        f"or {section}.activation_checkpointing: true"
    )
    try:
        profile = profile or probe.profile_of(device)
        cfg = model_config(run_config["spec"], num_classes, run_config["image_size"])
        per_device = recipe.batch_size // world
        where = f"{profile.label} ({profile.memory_bytes / 2**30:.1f} GiB)"
        advice, fits_whole = [], False  # fits_whole: some setting fits one device with the whole state
        options = [(recipe.precision, recipe.activation_checkpointing)]
        if recipe.precision == "fp32":  # the half precision this card runs natively
            options.append((precision.native(profile), recipe.activation_checkpointing))
        if not recipe.activation_checkpointing and family_of_config(cfg).checkpointing:
            options.append((options[-1][0], True))
        for prec, ckpt in options:
            p = compute.plan(cfg, per_device, profile, precision=prec, optimizer=recipe.optimizer, checkpointing=ckpt)
            micro = p["micro_batch"]
            if (prec, ckpt) == options[0] and micro >= recipe.micro_batch:
                # the model's estimate is optimistic here: suggest the next smaller micro-batch
                micro = max([k for k in range(1, recipe.micro_batch) if per_device % k == 0], default=0)
            setting = f"{section}.precision: {prec}" + (f", {section}.activation_checkpointing: true" if ckpt else "")
            fits_whole = fits_whole or bool(micro)
            if micro:
                advice.append(f"{setting}, {section}.micro_batch: {micro} ({per_device // micro} accumulation steps)")
            else:
                advice.append(f"{setting}: nothing fits, even micro_batch 1")
            if micro and (prec, ckpt) == options[0]:
                break  # the current settings fit with a smaller micro-batch: that is the advice
        shard = sharded_advice(cfg, recipe, section, profile, world, fits_whole)
        if shard:
            advice.append(shard)
        return f"{msg}; the compute model's plan for batch {per_device} per device on {where}: " + "; or ".join(advice)
    except Exception:
        return f"{msg}; {generic}"


def sharded_advice(cfg, recipe: TrainParams, section: str, profile, world: int, fits_whole: bool) -> str | None:
    """`parallel: fsdp` at the run's precision, as the cost model plans it: over the run's own
    processes when it has several and sharding fits them; when nothing fits one device whole
    (`fits_whole` False), over the fewest processes that do fit (more than the run has, if it
    is sharded already). None: nothing to say."""
    kw = {
        "precision": recipe.precision,
        "optimizer": recipe.optimizer,
        "checkpointing": recipe.activation_checkpointing,
    }
    if world > 1 and recipe.parallel != "fsdp":
        micro = cost_sharding.largest_micro_batch(cfg, recipe.batch_size, profile, world, **kw)
        if micro:
            return (
                f"{section}.parallel: fsdp, {section}.micro_batch: {micro} (the training state sharded over "
                f"the run's {world} processes)"
            )
    if fits_whole:
        return None
    for n in range(world + 1 if recipe.parallel == "fsdp" else 2, 65):
        micro = cost_sharding.largest_micro_batch(cfg, recipe.batch_size, profile, n, **kw)
        if micro:
            return (
                f"{section}.parallel: fsdp over {n} processes ({section}.nproc x nnodes = {n}), "
                f"{section}.micro_batch: {micro}"
            )
    return None
