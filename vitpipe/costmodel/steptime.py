"""How long a training step (forward + backward + optimizer update) or an inference pass
takes on a device, built from the operations the step executes (`models.step_ops`):

- matrix multiplications and convolutions (as implicit GEMMs) at the device's tensor-core
  rate for the precision, times an efficiency that follows their shape: the output is cut into
  TILE x TILE tiles (tile quantisation), the tiles run in waves over the SMs (wave
  quantisation), and a short reduction dimension k spends a larger share in the tile's
  prologue and epilogue (k / (k + K_OVERHEAD)); never faster than their operands' bytes at
  memory bandwidth (a roofline);
- memory-bound work (norms, activations, softmax, residual adds, autocast's casts, layout
  copies, the optimizer update) at memory bandwidth;
- attention by the kernel the device would run: `sdpa` (a fused kernel: its FLOPs at the
  tensor-core rate, backward 2.5x forward for the recompute, no t x t tensor in memory) or
  `eager` (the math form: two batched matmuls and the t x t scores written, scaled,
  softmaxed in fp32 and cast, forward and backward);
- depthwise convolutions on the CUDA cores (the fp32 rate);
- a fixed cost per kernel launched.

The few global constants below were fitted ONCE, to timm's RTX 3090 AMP training table
(`calibration/rtx3090_train_amp.csv`, tests/test_time_model.py) and nothing else; none is
per model and none per card: a card enters only through its datasheet (devices.yaml).
A CPU is timed by the same arithmetic with its measured matmul peak and bandwidth
(`hardware.probe.local_device`) and its cores as the SMs.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from vitpipe.models import registry
from vitpipe.models.step_ops import step_ops

# --- the global constants (each fitted to the RTX 3090 table, with its plausible range) ----
# The share of the datasheet tensor peak that a large, well-shaped cuBLAS GEMM sustains
# (cuBLAS reaches 0.8-0.9 of peak on big squares; NVIDIA's "Matrix multiplication background"
# guide).
GEMM_EFFICIENCY = 1.0
# Output tile of a tensor-core GEMM: 128 x 128 is cuBLAS/CUTLASS's tile for large problems.
TILE = 128
# k at which a tile spends as long in its prologue/epilogue as in its main loop: a GEMM with
# k = K_OVERHEAD runs at half speed (CUTLASS streams k in chunks of 32-64).
K_OVERHEAD = 48
# The share of the datasheet bandwidth that elementwise and reduction kernels sustain
# (STREAM-like copies reach 0.8-0.9).
MEMORY_EFFICIENCY = 0.90
# the shortest k slice cuBLAS gives one tile when it splits a long reduction over the SMs
SPLIT_K_MIN = 256
# Seconds per kernel launched in eager PyTorch: the gap between dependent kernels
# (launch latency, 3-6 us on CUDA).
LAUNCH_S = 4e-6
# fused attention's backward recomputes the scores: 2.5x the forward's FLOPs (FlashAttention-2)
SDPA_BACKWARD = 2.5
# a depthwise convolution (CUDA cores) reaches this share of the fp32 peak
DEPTHWISE_EFFICIENCY = 0.10
# NCHW tensors (timm's benchmark, vitpipe's ResNets) reach cuDNN's tensor-core kernels through
# layout transposes: this many read+write passes over a convolution's input and output, per
# forward (twice in backward: data and weight gradients)
NCHW_PASSES = 1
OPTIMIZER_BYTES = {"sgd": 20, "adamw": 28}  # fp32 bytes read + written per parameter per step
OPTIMIZER_KERNELS = 3  # per parameter tensor (the update, moments)

CALIBRATION = Path(__file__).parent / "calibration" / "rtx3090_train_amp.csv"

CONSTANTS = {
    "GEMM_EFFICIENCY": GEMM_EFFICIENCY,
    "TILE": TILE,
    "K_OVERHEAD": K_OVERHEAD,
    "MEMORY_EFFICIENCY": MEMORY_EFFICIENCY,
    "LAUNCH_S": LAUNCH_S,
    "SDPA_BACKWARD": SDPA_BACKWARD,
    "DEPTHWISE_EFFICIENCY": DEPTHWISE_EFFICIENCY,
    "NCHW_PASSES": NCHW_PASSES,
}


def gemm_efficiency(m: int, n: int, k: int, sms: int, batch: int = 1, tile: int = TILE) -> float:
    """The share of the tensor peak an (m x k) @ (k x n) GEMM reaches: tile and wave
    quantisation over `sms` SMs, and the prologue/epilogue share of a short k. A GEMM with
    fewer output tiles than SMs and a long k (a weight gradient) is split along k (split-K,
    as cuBLAS does) into as many slices as fill the SMs, each at least SPLIT_K_MIN long.
    `batch` independent products (batched matmul) share the waves."""
    tiles = batch * math.ceil(m / tile) * math.ceil(n / tile)
    split = max(1, min(sms // tiles, k // SPLIT_K_MIN))
    waves = math.ceil(tiles * split / sms)
    quantised = batch * m * n * split / (waves * sms * tile * tile)
    k_slice = k / split
    return GEMM_EFFICIENCY * quantised * k_slice / (k_slice + K_OVERHEAD)


class _Clock:
    """Sums a step's time by kind: compute-bound, memory-bound, overhead (launches)."""

    def __init__(self, device, precision):
        self.device, self.a = device, registry.element_bytes(precision)
        self.peak = device.peak(precision)
        self.simt = device.peak("fp32")
        self.bw = device.bandwidth * MEMORY_EFFICIENCY
        self.split = {"compute": 0.0, "memory": 0.0, "overhead": 0.0}
        self.kernels = 0

    def gemm(self, m, n, k, count=1, batch=1):
        """`count` GEMMs, each `batch` independent (m x k) @ (k x n) products."""
        flops = 2 * m * n * k * batch
        eff = gemm_efficiency(m, n, k, self.device.sm_count, batch) if self.device.kind == "cuda" else GEMM_EFFICIENCY
        t_compute = flops / (self.peak * max(eff, 1e-3))
        t_memory = self.a * batch * (m * k + k * n + m * n) / self.bw
        key = "compute" if t_compute >= t_memory else "memory"
        self.split[key] += count * max(t_compute, t_memory)
        self.kernels += count

    def memory(self, nbytes, kernels=1):
        self.split["memory"] += nbytes / self.bw
        self.kernels += kernels

    def flops_simt(self, flops, nbytes, kernels=1):
        t_compute, t_memory = flops / (self.simt * DEPTHWISE_EFFICIENCY), nbytes / self.bw
        self.split["compute" if t_compute >= t_memory else "memory"] += max(t_compute, t_memory)
        self.kernels += kernels


def _attention(clock: _Clock, op, batch, attention, backward):
    h, t, hd, n = op["heads"], op["tokens"], op["head_dim"], op["count"]
    a, rows = clock.a, batch * h
    if attention == "sdpa":
        flops = 4 * t * t * hd * rows
        eff = gemm_efficiency(t, t, hd, clock.device.sm_count, rows) if clock.device.kind == "cuda" else GEMM_EFFICIENCY
        passes = 1 + (SDPA_BACKWARD if backward else 0)
        clock.split["compute"] += n * passes * flops / (clock.peak * max(eff, 1e-3))
        clock.memory(n * passes * 4 * a * batch * t * h * hd, kernels=0)
        clock.kernels += n * (1 + (2 if backward else 0))
        return
    cast = a + 4 if a < 4 else 0
    s = rows * t * t  # score elements
    clock.gemm(t, t, hd, count=n, batch=rows)  # q k^T
    clock.gemm(t, hd, t, count=n, batch=rows)  # p v
    clock.memory(n * (2 * a + 2 * cast + 8) * s, kernels=n * (3 + (2 if cast else 0)))
    if backward:
        for m_, n_, k_ in ((t, t, hd), (t, hd, t)):  # two gradients for each product
            clock.gemm(m_, k_, n_, count=n, batch=rows)
            clock.gemm(k_, n_, m_, count=n, batch=rows)
        clock.memory(n * (2 * a + 2 * cast + 12) * s, kernels=n * (3 + (2 if cast else 0)))


def step_time(
    cfg,
    batch: int,
    device,
    precision: str = "fp16",
    attention: str = "eager",
    optimizer: str = "sgd",
    train: bool = True,
    checkpointing: bool = False,
) -> dict:
    """Seconds for one training step (or inference pass, `train=False`) of `batch` images:
    {seconds, img_per_s, compute_s, memory_s, overhead_s, kernels}."""
    clock = _Clock(device, precision)
    plan = step_ops(cfg, clock.a)
    for op in plan["ops"]:
        for backward in (False, True) if train else (False,):
            if backward and checkpointing and op.get("what") not in ("patch embed", "head"):
                _forward(clock, op, batch, attention)  # the recompute
            (_backward if backward else _forward)(clock, op, batch, attention)
    if train:
        _update(clock, cfg, plan, optimizer)
    clock.split["overhead"] = clock.kernels * LAUNCH_S
    seconds = sum(clock.split.values())
    return {
        "seconds": seconds,
        "img_per_s": batch / seconds,
        "compute_s": clock.split["compute"],
        "memory_s": clock.split["memory"],
        "overhead_s": clock.split["overhead"],
        "kernels": clock.kernels,
    }


def _update(clock, cfg, plan, optimizer):
    """Once per optimizer step: the update over every parameter and, under autocast, the
    weights' half copies (made in forward, their gradients cast back) and the scaler's unscale."""
    n = registry_params(cfg)
    half = clock.a < 4
    cast = (6 + 6) * plan["cast_params"] if half else 0
    clock.memory(
        OPTIMIZER_BYTES[optimizer] * n + cast + (8 * n if half else 0), kernels=OPTIMIZER_KERNELS * plan["tensors"]
    )


def update_time(cfg, device, precision: str = "fp16", optimizer: str = "sgd") -> dict:
    """The part of `step_time` spent once per optimizer step, not per micro-batch."""
    clock = _Clock(device, precision)
    _update(clock, cfg, step_ops(cfg, clock.a), optimizer)
    clock.split["overhead"] = clock.kernels * LAUNCH_S
    return {
        "seconds": sum(clock.split.values()),
        "compute_s": 0.0,
        "memory_s": clock.split["memory"],
        "overhead_s": clock.split["overhead"],
    }


def registry_params(cfg) -> int:
    return sum(registry.family_of_config(cfg).param_counts(cfg).values())


def _forward(clock, op, batch, attention):
    kind = op["op"]
    if kind == "gemm":
        clock.gemm(batch * op["m"], op["n"], op["k"], op["count"])
        if op.get("nchw") and clock.device.kind == "cuda":  # NCHW <-> NHWC around the kernel
            clock.memory(NCHW_PASSES * 2 * clock.a * batch * op["nchw"] * op["count"], 0)
    elif kind == "mem":
        clock.memory(batch * op["fwd"] * op["count"], op["kf"] * op["count"])
    elif kind == "dwconv":
        e = batch * op["channels"] * op["pixels"]
        clock.flops_simt(op["count"] * 2 * op["k"] ** 2 * e, op["count"] * 2 * clock.a * e, op["count"])
    elif kind == "attention":
        _attention(clock, op, batch, attention, backward=False)


def _backward(clock, op, batch, attention):
    kind = op["op"]
    if kind == "gemm":
        m = batch * op["m"]
        if not op["first"]:
            clock.gemm(m, op["k"], op["n"], op["count"])  # input gradient
        clock.gemm(op["n"], op["k"], m, op["count"])  # weight gradient: reduces over m
        if op.get("nchw") and clock.device.kind == "cuda":
            clock.memory(2 * NCHW_PASSES * 2 * clock.a * batch * op["nchw"] * op["count"], 0)
    elif kind == "mem":
        clock.memory(batch * op["bwd"] * op["count"], op["kb"] * op["count"])
    elif kind == "dwconv":
        e = batch * op["channels"] * op["pixels"]
        clock.flops_simt(op["count"] * 4 * op["k"] ** 2 * e, op["count"] * 4 * clock.a * e, 2 * op["count"])
    elif kind == "attention":
        _attention(clock, op, batch, attention, backward=True)


def calibration_errors() -> list[dict]:
    """Each row of the RTX 3090 table (the fit's only data) with the prediction and the
    relative error: the run as timm's benchmark made it (AMP fp16, eager attention, SGD)."""
    from vitpipe.costmodel.devices import get_device
    from vitpipe.models import model_config

    dev, out = get_device("rtx3090"), []
    for r in csv.DictReader(line for line in CALIBRATION.open() if not line.startswith("#")):
        cfg = model_config({"arch": r["vitpipe_arch"]}, 1000, int(r["train_img_size"]))
        p = step_time(cfg, int(r["train_batch_size"]), dev, "fp16", "eager", "sgd")
        measured = float(r["train_samples_per_sec"])
        out.append(
            {
                "model": r["model"],
                "batch": int(r["train_batch_size"]),
                "image_size": int(r["train_img_size"]),
                "measured": measured,
                "predicted": p["img_per_s"],
                "error": p["img_per_s"] / measured - 1,
            }
        )
    return out
