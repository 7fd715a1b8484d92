"""Step 6: resume on this device. A fit is SIGKILLed once its first checkpoint is committed,
run again (it resumes from that checkpoint), and its final weights compared with an
uninterrupted run's:

  fp32 under the recipe's `deterministic: true` (deterministic kernels, not warn-only; cuDNN
       autotuning off; cuBLAS's fixed workspace; no flash/cuDNN attention backward):
       bit-exact required; anything else is a resume that lost state
  bf16 as it trains for real (fast, non-deterministic kernels): within BF16_TOLERANCE relative
       L2 of all weights, a second line that does not decide

The killed and resumed runs are worker processes (`python -m gpu_proof.step_resume`); the
uninterrupted one runs in the step's own process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from gpu_proof.common import (
    Ctx,
    Recorder,
    call_fit,
    device_of,
    die_with_parent,
    need_device,
    one_process_group,
    recipe_for,
    synthetic_split,
    weights_diff,
)

BF16_TOLERANCE = 1e-3  # relative L2 of all weights; losing AdamW's state at the resume moves them by ~lr x steps


def train(folder: Path, cfg: dict, prec: str, deterministic: bool, parallel: str = "ddp") -> dict:
    """One fit of this step's run: the same data, init and recipe every time. `parallel: fsdp`
    shards it onto a process group of one (step_sharded)."""
    import torch

    from vitpipe.models import build_model

    spec, size, classes = cfg["spec"], cfg["size"], cfg["classes"]
    torch.manual_seed(0)
    r = recipe_for(
        batch_size=cfg["batch"],
        micro_batch=cfg["micro"],
        steps=cfg["steps"],
        precision=prec,
        checkpoint_every=cfg["checkpoint_every"],
        resume="auto",
        deterministic=deterministic,
        parallel=parallel,
    )
    group = one_process_group(device_of(None)) if parallel == "fsdp" else contextlib.nullcontext()
    with group:
        return call_fit(
            build_model(spec, classes, size),
            synthetic_split(cfg["n"], size, classes),
            r,
            folder,
            spec,
            size,
            classes,
            f"gpu_proof resume {prec} {parallel}",
        )


def final_weights(folder: Path) -> dict:
    import torch

    return torch.load(folder / "model.pt", map_location="cpu", weights_only=True)["state_dict"]


def committed(folder: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (folder / "checkpoint-store").glob("*/step-*.json"))


def worker(folder: Path, cfg: dict, prec: str, deterministic: bool, parallel: str, log) -> subprocess.Popen:
    args = json.dumps(
        {"folder": str(folder), "cfg": cfg, "prec": prec, "deterministic": deterministic, "parallel": parallel}
    )
    return subprocess.Popen(
        [sys.executable, "-m", "gpu_proof.step_resume", args],
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=die_with_parent,
    )


def run(rec: Recorder, ctx: Ctx):
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = (
        ":4096:8"  # as the key does, but before anything in this process uses cuBLAS
    )
    dev = need_device(rec, ctx)
    cfg = ctx.cfg
    rec.set(
        spec=cfg["spec"],
        image_size=cfg["size"],
        steps=cfg["steps"],
        batch=cfg["batch"],
        micro=cfg["micro"],
        checkpoint_every=cfg["checkpoint_every"],
        bf16_tolerance_rel_l2=BF16_TOLERANCE,
    )
    lines = {}
    for key, prec, deterministic in (("fp32", "fp32", True), ("bf16", "bf16", False)):
        if prec == "bf16" and dev.type == "cuda":
            from vitpipe.hardware import precision

            if precision.native(dev) != "bf16":
                lines[key] = {"verdict": "skipped: no native bf16 on this card"}
                continue
        line = resume_line(rec, ctx, key, prec, deterministic)
        lines[key] = line
        rec.set(**{key: line})
    ok = rec.check(
        "fp32 deterministic: the resumed run's final weights are bit-exact",
        bool(lines["fp32"].get("bit_exact")),
        lines["fp32"].get("verdict", ""),
    )
    # bf16 is reported, not checked: its kernels are not deterministic, the fp32 line decides
    rec.headline(
        f"fp32 deterministic: {lines['fp32'].get('verdict')}"
        + ("" if ok else " (a resume lost state)")
        + f"; bf16: {lines.get('bf16', {}).get('verdict', 'n/a')}"
    )


def resume_line(rec: Recorder, ctx: Ctx, key: str, prec: str, deterministic: bool, parallel: str = "ddp") -> dict:
    """Uninterrupted, then SIGKILLed after its first committed checkpoint and re-run: the two
    runs' final weights compared (`key`: the line's name, its folders and log)."""
    cfg = ctx.cfg
    rec.running(f"{key}: uninterrupted run")
    train(ctx.work / f"{key}-uninterrupted", cfg, prec, deterministic, parallel)
    folder = ctx.work / f"{key}-killed"
    rec.running(f"{key}: the run to be SIGKILLed")
    with open(ctx.logs / f"resume.{key}.log", "w") as log:
        p = worker(folder, cfg, prec, deterministic, parallel, log)
        while p.poll() is None and not committed(folder):
            time.sleep(0.002)
        killed = p.poll() is None
        if killed:
            p.send_signal(signal.SIGKILL)
        p.wait()
        line = {
            "killed": killed,
            "killed_at": max(committed(folder), default=None),
            # what the re-run resumes from: a sharded run's DCP folder, else one file
            "checkpoint": "DCP folder"
            if any(p.is_dir() for p in (folder / "checkpoint-store").glob("*/step-*"))
            else "one file",
        }
        if not killed:
            return {**line, "verdict": "not tested: the run finished before it could be killed"}
        line["resumed_at"] = line["killed_at"]  # fit resumes from the newest committed checkpoint
        rec.running(f"{key}: the re-run, resuming at step {line['resumed_at']}")
        q = worker(folder, cfg, prec, deterministic, parallel, log)
        if q.wait() != 0:
            return {**line, "verdict": f"the re-run exited {q.returncode} (see logs/resume.{key}.log)"}
    diff = weights_diff(final_weights(ctx.work / f"{key}-uninterrupted"), final_weights(folder))
    line.update(diff)
    if deterministic:
        line["verdict"] = "bit-exact" if diff["bit_exact"] else f"differs (rel. L2 {diff['rel_l2_diff']:.2e})"
    else:
        line["within"] = diff["rel_l2_diff"] <= BF16_TOLERANCE
        line["verdict"] = (
            f"rel. L2 {diff['rel_l2_diff']:.2e} ({'bit-exact; ' if diff['bit_exact'] else ''}"
            f"{'within' if line['within'] else 'beyond'} {BF16_TOLERANCE:.0e})"
        )
    return line


if __name__ == "__main__":  # a worker: one fit, resumed from its store when a checkpoint is there
    a = json.loads(sys.argv[1])
    train(Path(a["folder"]), a["cfg"], a["prec"], a["deterministic"], a["parallel"])
