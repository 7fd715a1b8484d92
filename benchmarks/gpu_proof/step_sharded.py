"""Step 7: the sharded path on the one device a lease has. `parallel: fsdp` is forced onto a
process group of one (NCCL on a GPU, gloo in the dry run; sharding.resolve shards onto a
group its caller started), so FSDP2, torch.distributed.checkpoint and the collectives run
as a multi-GPU job runs them:

  vit     fp32, deterministic: sharded, a DCP checkpoint, SIGKILL, resume, compare with the
          uninterrupted sharded run: bit-exact required (as step 6, through the sharded store)
  resnet  a ResNet under FSDP (on CUDA its input channels-last, its weights contiguous
          shards): trains, every parameter a shard, the loss finite
  compile ViT units compiled one by one before they are sharded (GPU only: inductor on two
          CPU cores takes minutes): trains, the loss finite, its warm-up and img/s

Each line is written as soon as it is measured."""

from __future__ import annotations

import math
import os
import time

from gpu_proof.common import Ctx, Recorder, call_fit, need_device, one_process_group, recipe_for, synthetic_split
from gpu_proof.step_resume import resume_line


def run(rec: Recorder, ctx: Ctx):
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # as the deterministic key does, before any cuBLAS call
    dev = need_device(rec, ctx)
    cfg = ctx.cfg
    rec.set(spec=cfg["spec"], image_size=cfg["size"], steps=cfg["steps"], checkpoint_every=cfg["checkpoint_every"])
    vit = resume_line(rec, ctx, "fsdp-fp32", "fp32", deterministic=True, parallel="fsdp")
    rec.set(vit=vit)
    rec.check(
        "FSDP fp32 deterministic: the resumed sharded run's final weights are bit-exact",
        bool(vit.get("bit_exact")),
        vit.get("verdict", ""),
    )
    rec.check("the sharded run's checkpoint is a DCP folder", vit.get("checkpoint") == "DCP folder", "")
    resnet = sharded_fit(rec, ctx, dev, "resnet", cfg["resnet"]["spec"], cfg["resnet"], compile_=False)
    compiled = (
        sharded_fit(rec, ctx, dev, "compile", cfg["spec"], cfg["compile"], compile_=True)
        if cfg["compile"]
        else {"verdict": "skipped: measured on the GPU only (inductor on two CPU cores takes minutes)"}
    )
    rec.set(compile=compiled)
    rec.headline(
        f"ViT fp32 sharded resume: {vit.get('verdict')}; ResNet under FSDP: {resnet['verdict']}; "
        f"compile per unit: {compiled['verdict']}"
    )


def sharded_fit(rec: Recorder, ctx: Ctx, dev, key: str, spec: dict, c: dict, compile_: bool) -> dict:
    """A short fit under FSDP on the group of one: it trains, its parameters are shards."""
    import torch

    from vitpipe.models import build_model

    size, classes = ctx.cfg["size"], ctx.cfg["classes"]
    rec.running(f"{key}: a {c['steps']}-step fit under FSDP{' with compile per unit' if compile_ else ''}")
    torch.manual_seed(0)
    model = build_model(spec, classes, size)
    r = recipe_for(
        batch_size=c["batch"],
        micro_batch=c["batch"],
        steps=c["steps"],
        precision="bf16" if dev.type == "cuda" else "fp32",
        parallel="fsdp",
        compile=compile_,
    )
    t = time.perf_counter()
    with one_process_group(dev):
        metrics = call_fit(
            model,
            synthetic_split(max(2 * c["batch"], 64), size, classes),
            r,
            ctx.work / f"{key}-fit",
            spec,
            size,
            classes,
            f"gpu_proof sharded {key}",
        )
    line = {
        "spec": spec,
        "batch": c["batch"],
        "steps": c["steps"],
        "precision": r.precision,
        "parallel": metrics.get("parallel"),
        "train_loss": metrics.get("train_loss"),
        "img_per_s": metrics.get("img_per_s"),
        "seconds": time.perf_counter() - t,
        "sharded_params": all(type(p).__name__ == "DTensor" for p in model.parameters()),
    }
    ok = line["sharded_params"] and math.isfinite(line["train_loss"] or math.nan)
    line["verdict"] = (
        f"trained {c['steps']} steps, loss {line['train_loss']:.3f}, {line['img_per_s']:.0f} img/s" if ok else "failed"
    )
    rec.set(**{key: line})
    rec.check(
        f"{key}: trains under FSDP with every parameter a shard",
        ok,
        f"parallel {line['parallel']}, loss {line['train_loss']}, DTensor parameters {line['sharded_params']}",
    )
    return line
