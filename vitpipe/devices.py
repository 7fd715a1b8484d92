"""Device profiles (memory, peak FLOP/s per precision, an MFU assumption) and the
measurements that stand in for a profile on "this machine": a matmul peak and an MFU
calibrated from a few real training steps of a small ViT."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field, replace

from vitpipe.errors import UserError

MiB, GiB, TFLOPS = 2**20, 2**30, 1e12


@dataclass(frozen=True)
class Device:
    name: str
    label: str
    memory_bytes: int            # what the allocator can hand out (nvidia-smi total)
    peak_flops: dict             # precision -> dense FLOP/s (no sparsity)
    mfu: float                   # model FLOPs utilisation assumed for a ViT training step
    reserve_bytes: int = 0       # never available to tensors: CUDA context, cuDNN/cuBLAS handles
    notes: str = ""
    measured: dict = field(default_factory=dict)
    capability: tuple | None = None   # CUDA compute capability (major, minor); None: a CPU

    def peak(self, precision: str) -> float:
        return self.peak_flops[precision]

    @property
    def native_bf16(self) -> bool:
        """bf16 tensor-core units: compute capability >= 8.0 (Ampere and later)."""
        from vitpipe.precision import NATIVE_BF16

        return self.capability is not None and tuple(self.capability) >= NATIVE_BF16


def native_precision(dev: Device) -> str:
    """What `precision: auto` means on `dev`: bf16 where the GPU has bf16 units, fp16 (with a
    grad scaler) on older GPUs (T4, V100), fp32 on a CPU."""
    if dev.capability is None:
        return "fp32"
    return "bf16" if dev.native_bf16 else "fp16"


def resolve_precision(requested: str, dev: Device) -> tuple[str, str]:
    """(precision to run with on `dev`, why it differs from `requested` or ""). `auto` picks
    the native one; bf16 on a GPU without bf16 units (it would run emulated, at fp32 speed or
    worse) becomes fp16."""
    if requested == "auto":
        return native_precision(dev), f"auto = {native_precision(dev)} on {dev.label}"
    if requested == "bf16" and dev.capability is not None and not dev.native_bf16:
        return "fp16", f"{dev.label} has no bf16 units: fp16 with a grad scaler instead of emulated bf16"
    return requested, ""


def _gpu(name, label, mem_mib, fp32, tf32, bf16, fp16, mfu=0.35, notes="", capability=None):
    # PyTorch keeps fp32 matmuls in full fp32 unless asked (allow_tf32=False), so the
    # `fp32` precision uses the fp32 peak; `tf32` is the opt-in. Devices without bf16
    # units run bf16 at about their fp32 rate.
    peaks = {"fp32": fp32, "tf32": tf32 or fp32, "bf16": bf16 or fp32, "fp16": fp16}
    return Device(name, label, mem_mib * MiB, {k: v * TFLOPS for k, v in peaks.items()}, mfu,
                  reserve_bytes=600 * MiB, notes=notes, capability=capability)


# Vendor datasheet dense peaks (TFLOP/s); memory as nvidia-smi reports it.
# The T4's MFU is the reference report's own measurement: ViT-B/32 fp32 at 39 img/s
# x 26.3 GFLOP/img (train) = 1.03 TFLOP/s of 8.1 -> 0.13. Others: a typical ViT step.
DEVICES = {
    "t4": _gpu("t4", "Tesla T4 16GB", 15109, 8.1, None, None, 65, mfu=0.13,
               notes="Turing: no bf16/tf32 units", capability=(7, 5)),
    "v100-16": _gpu("v100-16", "V100 16GB", 16160, 15.7, None, None, 125, mfu=0.3, capability=(7, 0)),
    "v100-32": _gpu("v100-32", "V100 32GB", 32510, 15.7, None, None, 125, mfu=0.3, capability=(7, 0)),
    "a100-40": _gpu("a100-40", "A100 40GB", 40536, 19.5, 156, 312, 312, mfu=0.4, capability=(8, 0)),
    "a100-80": _gpu("a100-80", "A100 80GB", 81251, 19.5, 156, 312, 312, mfu=0.4, capability=(8, 0)),
    "h100-80": _gpu("h100-80", "H100 SXM 80GB", 81559, 67, 495, 989, 989, mfu=0.35, capability=(9, 0)),
    "h200": _gpu("h200", "H200 141GB", 143771, 67, 495, 989, 989, mfu=0.35, capability=(9, 0)),
    "l4": _gpu("l4", "L4 24GB", 23034, 30.3, 60, 121, 121, mfu=0.35, capability=(8, 9)),
}
ALIASES = {"v100": "v100-16", "a100": "a100-40", "h100": "h100-80", "this": "local", "cpu": "local"}
LOCAL = ("local", "cpu", "this")


def device_names() -> list[str]:
    return [*DEVICES, "local", "auto"]


def get_device(name: str, mfu: float | None = None) -> Device:
    """A profile by name ('t4', 'a100-80', ..., 'local' = this machine, measured;
    'auto' = this machine's GPU as its known profile, see `current_device`)."""
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key == "auto":
        dev = current_device()
    elif key == "local":
        dev = local_device()
    elif key in DEVICES:
        dev = DEVICES[key]
    else:
        raise UserError(f"unknown device {name!r}; allowed: {', '.join(device_names())} "
                        f"(aliases: {', '.join(ALIASES)})")
    return replace(dev, mfu=mfu) if mfu is not None else dev


# ---------------------------------------------------------------------------------------
# This machine


_LOCAL_CACHE: dict = {}


def known_profile(gpu_name: str, total_memory: int) -> Device | None:
    """The profile of a GPU that torch/NVML names `gpu_name` ("Tesla T4", "NVIDIA
    A100-SXM4-40GB", "NVIDIA L4"): its family by name, the size closest to its memory."""
    family = [d for d in DEVICES.values()
              if re.search(rf"(?<![A-Za-z0-9]){re.escape(d.name.split('-')[0])}(?![A-Za-z0-9])", gpu_name, re.IGNORECASE)]
    if not family:
        return None
    return min(family, key=lambda d: abs(d.memory_bytes - total_memory))


def current_device(index: int = 0) -> Device:
    """`--device auto`: this machine's GPU `index` as torch sees it, with its real name,
    memory and compute capability, and the peaks and MFU of the known profile of its family
    (a T4, an A100 40 or 80 GB, ...). A GPU with no known profile gets measured peaks
    (`local_device`); no GPU at all gives the local CPU profile."""
    import torch

    if not torch.cuda.is_available():
        return local_device()
    props = torch.cuda.get_device_properties(index)
    capability = tuple(torch.cuda.get_device_capability(index))
    known = known_profile(props.name, props.total_memory)
    if known is None:
        return replace(local_device(), capability=capability)
    return replace(known, label=f"{props.name} (this GPU)", memory_bytes=props.total_memory,
                   capability=capability, notes=f"profile {known.name}; {known.notes}".rstrip("; "))


def local_device() -> Device:
    """This machine as a profile: a CUDA GPU if there is one, else the CPU with its available
    RAM. Peaks are measured (a matmul benchmark), so they are what torch really gets here."""
    if "dev" in _LOCAL_CACHE:
        return _LOCAL_CACHE["dev"]
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        fp32 = measure_matmul_flops("cuda", torch.float32)
        half = measure_matmul_flops("cuda", torch.bfloat16)
        dev = Device("local", f"{props.name} (this machine)", props.total_memory,
                     {"fp32": fp32, "tf32": fp32, "bf16": half, "fp16": half}, mfu=0.35,
                     reserve_bytes=600 * MiB, measured={"matmul_fp32": fp32, "matmul_bf16": half},
                     capability=tuple(torch.cuda.get_device_capability(0)))
    else:
        import psutil

        fp32 = measure_matmul_flops("cpu", torch.float32)
        # no autocast speed-up is assumed on a CPU without bf16 matrix units
        dev = Device("local", f"CPU x{torch.get_num_threads()} threads (this machine)",
                     psutil.virtual_memory().available,
                     {"fp32": fp32, "tf32": fp32, "bf16": fp32, "fp16": fp32}, mfu=0.3,
                     reserve_bytes=512 * MiB, measured={"matmul_fp32": fp32})
    _LOCAL_CACHE["dev"] = dev
    return dev


def measure_matmul_flops(device: str = "cpu", dtype=None, n: int = 1024, seconds: float = 0.3) -> float:
    """Best FLOP/s of an n x n matmul over ~`seconds`: the practical peak on this machine."""
    import torch

    dtype = dtype or torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    warm = time.perf_counter()
    while time.perf_counter() - warm < seconds / 3:   # threads and clocks spin up first
        a @ b
    sync()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


# A small ViT that trains in ~0.1-0.5 s per step on two CPU cores
CALIBRATION_SPEC = {"arch": "vit", "patch": 4, "dim": 192, "depth": 4, "heads": 3, "mlp_ratio": 4.0}


def calibrate_mfu(spec: dict | None = None, image_size: int = 32, batch: int = 32,
                  steps: int = 3, num_classes: int = 10, device: str | None = None,
                  peak_flops: float | None = None, budget_s: float = 2.0) -> dict:
    """Train `spec` for a few steps here and compare the FLOP/s it achieved (analytic train
    FLOPs x img/s) with the measured matmul peak: the MFU this machine reaches on a ViT.
    Times up to `steps` steps, fewer if they take over `budget_s` (a busy machine).
    Returns {mfu, img_per_s, achieved_flops, peak_flops, ...}."""
    import torch

    from vitpipe import compute
    from vitpipe.models import build_model, model_config

    spec = spec or CALIBRATION_SPEC
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_model(spec, num_classes, image_size).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()                       # first step allocates optimizer state and warms kernels
    sync()
    t, done = time.perf_counter(), 0
    while done < steps and (done == 0 or time.perf_counter() - t < budget_s):
        step()
        sync()
        done += 1
    seconds = time.perf_counter() - t
    img_per_s = done * batch / seconds
    cfg = model_config(spec, num_classes, image_size)
    train_flops = compute.flops(cfg)["train"]
    achieved = img_per_s * train_flops
    peak = peak_flops or measure_matmul_flops(device, torch.float32)
    return {"mfu": achieved / peak, "img_per_s": img_per_s, "achieved_flops": achieved,
            "peak_flops": peak, "train_flops_per_image": train_flops, "batch": batch,
            "steps": done, "seconds": seconds, "device": device,
            "threads": torch.get_num_threads() if device == "cpu" else None,
            "spec": dict(spec), "image_size": image_size}


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
