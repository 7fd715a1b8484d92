"""What the pipeline costs on top of the bare training step.

Runs, in one process, on the same model, batch, micro-batch, precision and threads:
  bare      the GPU proof's BareLoop: a plain timm forward / backward / clip / AdamW step on tensors in memory:
            a pool of distinct batches, larger than a CPU's last-level cache, cycled through (one
            batch repeated would stay in cache, which no epoch over a dataset does: on the dry
            run's model that alone made the bare loop about 2% faster)
  pipeline  vitpipe.training.loop.fit: data loading and augmentation from a uint8 store, telemetry
            thread, step log, progress bar, checkpoints every `checkpoint_every` steps, uploaded to
            a checkpoint mirror (a temp folder unless --mirror says otherwise)
alternating them for several rounds (the machine may be busy), and prints the median over the
rounds of each round's step-rate ratio (pipeline / bare; 1.0 = no overhead; target >= 0.97), with the host time
the input pipeline spent making each step's batches and how long a step waited for them.
It does so at two configurations: the default one (model/train of ./params.yaml, --threads)
and the small model of gpu_proof's CPU dry run as its throughput step runs it (one thread,
no periodic checkpoint). On an NVIDIA GPU it then reports ViT-B/16 at
224 px, bf16: img/s and MFU (the compute model's FLOPs over measured time and the
device's peak).

    python benchmarks/train_throughput.py                  # both configurations, 5 rounds each
    python benchmarks/train_throughput.py --steps 300 --rounds 7 --threads 2 --only default
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from gpu_proof.common import MODES, call_fit, read_tsv, synthetic_split  # the GPU proof's dry run and helpers
from gpu_proof.step_throughput import BareLoop

from vitpipe import model_specs, params
from vitpipe.models import build_model
from vitpipe.params import TrainParams

DEFAULT_SPEC = {"arch": "vit", "patch": 4, "dim": 96, "depth": 4, "heads": 3, "mlp_ratio": 2.0}
# gpu_proof's CPU dry run: its throughput step's model and batch
DRY_RUN = MODES["dry"]["throughput"]
DRY_RUN_SPEC, DRY_RUN_SIZE, DRY_RUN_BATCH = DRY_RUN["spec"], DRY_RUN["size"], DRY_RUN["batch"]
CLASSES = 10


def bare_seconds_per_step(spec, size, r: TrainParams, steps: int, warmup: int, device) -> float:
    """The minimal loop, the GPU proof's: same math per step (micro-batches, label smoothing,
    clip, AdamW), on a pool of distinct batches already in memory."""
    img_s, _ = BareLoop(spec, size, CLASSES, r, device, compile_=False).timed(warmup, steps)
    return r.batch_size / img_s


def pipeline_seconds_per_step(spec, size, r: TrainParams, steps: int, warmup: int) -> tuple[float, dict]:
    """fit() as the stages call it, its progress bar running (no validation split: the bare
    loop has none either)."""
    torch.manual_seed(0)
    model = build_model(spec, CLASSES, size)
    data = synthetic_split(max(2048, 4 * r.batch_size), size, CLASSES)
    with tempfile.TemporaryDirectory() as tmp:
        with contextlib.redirect_stderr(io.StringIO()):  # the progress bar runs, its terminal output is dropped
            metrics = call_fit(
                model,
                data,
                replace(r, steps=warmup + steps, resume="fresh"),
                Path(tmp),
                spec,
                size,
                CLASSES,
                "benchmark",
                weights=False,
                quiet=False,
            )
        rows = read_tsv(Path(tmp) / "plots" / "train.tsv")
    elapsed = {int(row["step"]): float(row["elapsed_s"]) for row in rows}
    timed = [row for row in rows if int(row["step"]) > warmup]
    metrics["data_ms"] = statistics.median(float(row["data_ms"]) for row in timed)
    metrics["data_wait_ms"] = statistics.median(float(row["data_wait_ms"]) for row in timed)
    # steady state, from the step log's own clock: steps warmup+1 .. warmup+steps
    return (elapsed[warmup + steps] - elapsed[warmup]) / steps, metrics


def compare(spec, size, r: TrainParams, steps: int, warmup: int, rounds: int, device) -> float:
    """Alternate bare and pipeline `rounds` times; the ratio of the median step rates."""
    bare, pipe, data_ms, wait_ms = [], [], [], []
    for i in range(rounds):
        bare.append(bare_seconds_per_step(spec, size, r, steps, warmup, device))
        sec, metrics = pipeline_seconds_per_step(spec, size, r, steps, warmup)
        pipe.append(sec)
        data_ms.append(metrics["data_ms"])
        wait_ms.append(metrics["data_wait_ms"])
        print(
            f"  round {i + 1}: bare {r.batch_size / bare[-1]:8.1f} img/s   pipeline {r.batch_size / pipe[-1]:8.1f} img/s"
            f"   ratio {bare[-1] / pipe[-1]:.3f}   data {data_ms[-1]:.2f} ms/step (waited {wait_ms[-1]:.2f})",
            flush=True,
        )
    # each round's two loops run back to back: their ratio is immune to the machine's drift
    # between rounds, which the ratio of the two medians is not (it is printed beside it)
    ratios = [b / p for b, p in zip(bare, pipe)]
    ratio = statistics.median(ratios)
    print(
        f"  median: bare {r.batch_size / statistics.median(bare):.1f} img/s, pipeline "
        f"{r.batch_size / statistics.median(pipe):.1f} img/s -> ratio {ratio:.3f}, the median round's (rounds "
        f"{min(ratios):.3f}-{max(ratios):.3f}; ratio of the medians "
        f"{statistics.median(bare) / statistics.median(pipe):.3f}); host data time "
        f"{statistics.median(data_ms):.2f} ms/step, waited {statistics.median(wait_ms):.2f} ms/step "
        f"({1e3 * statistics.median(pipe):.1f} ms/step in all)"
    )
    return ratio


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml", help="model: and train: come from here (default ./params.yaml)")
    ap.add_argument("--steps", type=int, default=200, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5, help="alternating bare/pipeline rounds (median of them)")
    ap.add_argument("--only", choices=("default", "dry-run"), help="one configuration only")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-gpu-b16", action="store_true", help="skip the ViT-B/16 bf16 GPU measurement")
    ap.add_argument(
        "--mirror",
        default="temp",
        help="checkpoint mirror during the pipeline runs: 'temp' (a temp folder, the default), "
        "'none', or any VITPIPE_CHECKPOINT_MIRROR value",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    mirror_tmp = tempfile.TemporaryDirectory()
    if args.mirror != "none":  # uploads run in the background: they must not slow training
        os.environ["VITPIPE_CHECKPOINT_MIRROR"] = mirror_tmp.name if args.mirror == "temp" else args.mirror
    else:
        os.environ.pop("VITPIPE_CHECKPOINT_MIRROR", None)

    doc = params.read_yaml(args.params) if Path(args.params).exists() else {}
    size = (doc.get("data") or {}).get("image_size", 32)
    spec = model_specs.model_spec(doc, size) if "model" in doc else DEFAULT_SPEC
    r = params.train_params(doc, "train") if "train" in doc else TrainParams(batch_size=64, micro_batch=64)
    r = replace(r, nproc=1, compile=False)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # the dry run's throughput step: one thread per step process, no periodic checkpoint
    dry = replace(r, batch_size=DRY_RUN_BATCH, micro_batch=DRY_RUN_BATCH, checkpoint_every=10**6)
    configs = {"default": (spec, size, r, args.threads), "dry-run": (DRY_RUN_SPEC, DRY_RUN_SIZE, dry, 1)}
    results = {}
    for name, (spec_, size_, r_, threads) in configs.items():
        if args.only and name != args.only:
            continue
        torch.set_num_threads(threads)
        print(
            f"\n{name}: device {device.type}, {torch.get_num_threads()} threads; model {spec_} at {size_}px; batch "
            f"{r_.batch_size} (micro {r_.micro_batch}), {r_.precision}, checkpoint every {r_.checkpoint_every} steps; "
            f"{args.rounds} rounds x {args.steps} steps; checkpoint mirror: "
            f"{os.environ.get('VITPIPE_CHECKPOINT_MIRROR', 'none')}",
            flush=True,
        )
        results[name] = compare(spec_, size_, r_, args.steps, args.warmup, args.rounds, device)
    print()
    for name, ratio in results.items():
        print(f"pipeline / bare step rate, {name} config: {ratio:.3f} (target >= 0.97)")

    if device.type == "cuda" and not args.no_gpu_b16:
        from vitpipe.costmodel import compute
        from vitpipe.hardware.probe import profile_of as device_profile
        from vitpipe.models import model_config

        b16, b16_size = {"arch": "vit_b16"}, 224
        rb = replace(r, batch_size=128, micro_batch=128, precision="bf16", checkpoint_every=100)
        print(f"\nViT-B/16 at {b16_size}px, bf16, batch {rb.batch_size}:")
        ratio_b16 = compare(b16, b16_size, rb, 50, 10, 1, device)
        sec, _ = pipeline_seconds_per_step(b16, b16_size, rb, 50, 10)
        img_s = rb.batch_size / sec
        profile = device_profile(device)
        flops = compute.flops(model_config(b16, CLASSES, b16_size))["train"]
        peak = profile.peak_flops.get("bf16")
        mfu = (
            f"{flops * img_s / peak:.3f} of {profile.label}'s {peak / 1e12:.0f} TFLOP/s bf16"
            if peak
            else "n/a (unknown peak)"
        )
        print(
            f"ViT-B/16 bf16: {img_s:.1f} img/s, {flops * img_s / 1e12:.1f} TFLOP/s achieved, MFU {mfu}; "
            f"pipeline/bare {ratio_b16:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
