"""Device profiles as data: memory, dense peak FLOP/s per precision, an MFU assumption and
the CUDA compute capability of each card the planner knows. "This machine" (`local`,
`auto`) is measured, not listed: `vitpipe.hardware.probe` builds its profile."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from vitpipe.errors import UserError

MiB, GiB, TFLOPS = 2**20, 2**30, 1e12
NATIVE_BF16 = (8, 0)  # compute capability of the first cards with bf16 tensor cores (Ampere)


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
        return self.capability is not None and tuple(self.capability) >= NATIVE_BF16


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
    """A listed profile by name ('t4', 'a100-80', ...). This machine ('local', 'auto') is
    measured by `vitpipe.hardware.probe.get_device`, which also takes every name here."""
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in DEVICES:
        raise UserError(f"unknown device {name!r}; allowed: {', '.join(device_names())} "
                        f"(aliases: {', '.join(ALIASES)})")
    return replace(DEVICES[key], mfu=mfu) if mfu is not None else DEVICES[key]


def known_profile(gpu_name: str, total_memory: int) -> Device | None:
    """The profile of a GPU that torch/NVML names `gpu_name` ("Tesla T4", "NVIDIA
    A100-SXM4-40GB", "NVIDIA L4"): its family by name, the size closest to its memory."""
    family = [d for d in DEVICES.values()
              if re.search(rf"(?<![A-Za-z0-9]){re.escape(d.name.split('-')[0])}(?![A-Za-z0-9])", gpu_name, re.IGNORECASE)]
    if not family:
        return None
    return min(family, key=lambda d: abs(d.memory_bytes - total_memory))
