"""How many images a second the input producer makes, against what the training step eats.

The producer of `vitpipe.training.input_pipeline` for one micro-batch: gather its images from
a uint8 store in RAM, shift and flip them in uint8 (`Split.images`), and (`--float`, the CPU
path) convert and normalise them to float32; on a GPU the conversion runs on the device and
the host stops at uint8 in a pinned buffer. One producer thread, its gather and its shift and
flip spread over 1 and 2 threads (`augment_threads`; the copies release the GIL), for `--rounds` rounds;
prints the median images/s per configuration and, in the same run, the factor against the
planner's prediction for the training step (default ViT-B/16, bf16, H100: what the producer
must stay well ahead of, the issue's target being 4x).

    python benchmarks/input_producer.py                        # 224 px, micro-batch 256
    python benchmarks/input_producer.py --size 32 --micro-batch 32 --rounds 9
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from vitpipe.data.prepared_store import Split
from vitpipe.plan import plan_model
from vitpipe.training.input_pipeline import augmentation_generator


def synthetic_store(n: int, size: int) -> Split:
    rng = np.random.default_rng(0)
    return Split(
        rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, 10, n), [0.5] * 3, [0.25] * 3
    )


def make(data: Split, step: int, micro_batch: int, to_float: bool, threads: int) -> None:
    idx = np.random.default_rng(step).choice(len(data), micro_batch, replace=False)
    x, _ = data.images(idx, True, augmentation_generator(0, step), threads=threads)
    if to_float:
        data.normalise(x)


def images_per_s(data: Split, micro_batch: int, threads: int, batches: int, to_float: bool) -> float:
    """One producer thread making `batches` micro-batches, each shifted and flipped by `threads`
    threads (as InputPipeline does); torch at one thread."""
    start = time.perf_counter()
    for step in range(batches):
        make(data, step, micro_batch, to_float, threads)
    return batches * micro_batch / (time.perf_counter() - start)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--micro-batch", type=int, default=256)
    ap.add_argument("--store", type=int, default=1024, help="images in the synthetic store")
    ap.add_argument("--batches", type=int, default=6, help="micro-batches per thread per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--model", default="vit_b16")
    ap.add_argument("--device", default="h100")
    ap.add_argument("--precision", default="bf16")
    args = ap.parse_args(argv)
    data = synthetic_store(args.store, args.size)
    step = plan_model(args.model, args.size, args.micro_batch, args.device, args.precision)["train_img_per_s"]
    print(
        f"producer at {args.size} px, micro-batch {args.micro_batch}, median of {args.rounds} rounds; planner: "
        f"{args.model} {args.precision} on {args.device} trains {step:,.0f} img/s"
    )
    configs = [(threads, to_float) for to_float in (False, True) for threads in (1, 2)]
    rates = {c: [] for c in configs}
    torch.set_num_threads(1)
    for _ in range(args.rounds):  # alternating: a busy moment falls on every configuration alike
        for threads, to_float in configs:
            rates[threads, to_float].append(images_per_s(data, args.micro_batch, threads, args.batches, to_float))
    for (threads, to_float), r in rates.items():
        med = statistics.median(r)
        print(
            f"  {'uint8 (GPU host path)' if not to_float else 'float32 (CPU path)':22} {threads} thread(s): "
            f"{med:8,.0f} img/s ({med / threads:,.0f} per thread), {med / step:.2f}x the step"
        )


if __name__ == "__main__":
    main()
