"""The time model on this machine: predicted training img/s against measured.

For each of three networks (the default model of ./params.yaml at its own image size, batch and
micro-batch; a ResNet-18 at 32 px; a ViT-S/16 at 224 px) it
  measures  vitpipe's training step as the GPU proof's BareLoop runs it (the model from the
            registry with vitpipe's own preparation, fused attention on; micro-batches,
            label smoothing, grad-norm clip, AdamW; fp32; a pool of distinct batches in memory):
            `--rounds` timings of `--steps` steps each after `--warmup` steps, and takes the median;
  predicts  the same step with the time model (vitpipe.costmodel.compute.timing ->
            costmodel.steptime) on this machine's profile (vitpipe.hardware.probe.local_device:
            its measured fp32 matmul peak and copy bandwidth, its threads as the SMs), with
            the split of the predicted time (compute-bound / memory-bound / launches);
and prints them side by side with the ratio predicted / measured. The probe runs first, on the
same threads, so both see the same machine. Nothing is fitted here: it is a check of the model.

    python benchmarks/time_model_cpu.py                       # ~1-2 min on 2 cores
    python benchmarks/time_model_cpu.py --rounds 7 --steps 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_proof, as train_throughput.py imports it
from gpu_proof.step_throughput import BareLoop  # noqa: E402

from vitpipe import model_specs, params  # noqa: E402
from vitpipe.costmodel import compute  # noqa: E402
from vitpipe.hardware import probe  # noqa: E402
from vitpipe.models import describe, model_config  # noqa: E402

CLASSES = 10
ROOT = Path(__file__).resolve().parents[1]


def cases(doc: dict) -> list[tuple[dict, int, object]]:
    """(spec, image size, train recipe) for the default model and two others, all fp32 AdamW
    as the default recipe; the others with batches that take ~0.1-1 s a step on two cores."""
    size = params.data_params(doc).image_size
    r = replace(params.train_params(doc, "train"), precision="fp32", optimizer="adamw")
    return [
        (model_specs.model_spec(doc, size), size, r),
        ({"arch": "resnet18"}, 32, replace(r, batch_size=64, micro_batch=64)),
        ({"arch": "vit_s16"}, 224, replace(r, batch_size=8, micro_batch=8)),
    ]


def cpu_name() -> str:
    try:
        line = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("model name"))
        return line.split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def measure(spec, size, r, rounds: int, steps: int, warmup: int) -> list[float]:
    loop = BareLoop(spec, size, CLASSES, r, torch.device("cpu"), compile_=False)
    loop.timed(warmup, 0)
    return [loop.timed(0, steps)[0] for _ in range(rounds)]


def predict(spec, size, r, dev) -> dict:
    cfg = model_config(spec, CLASSES, size)
    return compute.timing(cfg, r.batch_size, r.micro_batch, dev, "fp32", "adamw", "sdpa")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="timings per model (the median is reported)")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per timing")
    ap.add_argument("--warmup", type=int, default=2, help="steps before the first timing")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"), help="where the default model comes from")
    a = ap.parse_args(argv)

    dev = probe.local_device()
    m = dev.measured
    print(
        f"machine: {cpu_name()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; measured fp32 matmul peak {m['matmul_fp32'] / 1e9:,.0f} GFLOP/s, "
        f"copy bandwidth {m['bandwidth'] / 1e9:,.1f} GB/s"
    )
    head = f"{'model':<34} {'batch':>9} {'measured img/s':>15} {'predicted':>10} {'pred/meas':>9}  predicted split"
    print(head)
    ratios = []
    for spec, size, r in cases(params.read_yaml(a.params)):
        rates = measure(spec, size, r, a.rounds, a.steps, a.warmup)
        measured = statistics.median(rates)
        p = predict(spec, size, r, dev)
        s = p["time_split"]
        ratios.append(p["train_img_per_s"] / measured)
        name = describe(spec, size) + ("" if "px" in describe(spec, size) else f" @{size}px")
        print(
            f"{name:<34} {f'{r.micro_batch}x{r.batch_size // r.micro_batch}':>9} "
            f"{measured:>15,.1f} {p['train_img_per_s']:>10,.1f} {ratios[-1]:>9.2f}  "
            f"{s['compute_s']:.0%}/{s['memory_s']:.0%}/{s['overhead_s']:.0%} "
            f"(timings {min(rates):,.1f}..{max(rates):,.1f})"
        )
    print(f"ratio predicted / measured: {', '.join(f'{x:.2f}' for x in ratios)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
