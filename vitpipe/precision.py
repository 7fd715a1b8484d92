"""Which precision a run really uses: `precision: auto`, and bf16 only where it is native.

    fp32   full fp32 everywhere.
    bf16   autocast to bfloat16. Needs compute capability >= 8.0 (Ampere: A100, A10, L4,
           H100, ...) on CUDA. Older cards (T4, V100, P100) have no bf16 units: torch would
           run it emulated, slower than fp16 and for no gain, so asking for it there is a
           param error that offers fp16 or auto instead.
    fp16   autocast to float16 with a grad scaler (overflowing steps are skipped).
    auto   bf16 on a CUDA card with native bf16; fp16 (with its grad scaler) on an older
           CUDA card; fp32 on the CPU. One preset then runs at full speed on any GPU.

Why `auto` is fp32 on the CPU. autocast to bf16 does run on the CPU, and on a CPU with
bf16 instructions (AVX512-BF16, AMX) it is faster: on this repository's 2-core AMD EPYC
with AVX512-BF16, a training step of a 4-block, dim-192 ViT at 32 px, batch 32, one thread,
took 0.14 s in bf16 and 0.27 s in fp32. On CPUs without those instructions bf16 cannot be
expected to gain anything (no bf16 arithmetic to use). But the CPU configurations are the
reference ones: the embedded default pipeline whose metrics are committed and compared
with `dvc metrics diff`, and the tests. If `auto` followed the CPU's instruction set, the
same params.yaml would give other numbers (and another checkpoint fingerprint) on another
CPU. So `auto` keeps the CPU at fp32; set `precision: bf16` to use a CPU's bf16 units.
An explicit bf16 or fp16 on the CPU is honoured as before (useful for tests).
"""

from __future__ import annotations

from vitpipe.errors import ParamError

CHOICES = ("fp32", "bf16", "fp16", "auto")
NATIVE_BF16 = (8, 0)  # compute capability of the first cards with bf16 tensor cores (Ampere)


def _device(device):
    import torch

    return device if isinstance(device, torch.device) else torch.device(device)


def cuda_capability(device) -> tuple[int, int]:
    import torch

    major, minor = torch.cuda.get_device_capability(_device(device))
    return int(major), int(minor)


def native_bf16(device) -> bool:
    """True on a CUDA device with bf16 tensor cores (compute capability >= 8.0)."""
    device = _device(device)
    return device.type == "cuda" and cuda_capability(device) >= NATIVE_BF16


def resolve(requested: str, device, key: str) -> str:
    """The precision a run on `device` uses for `requested` (fp32 | bf16 | fp16 | auto):
    fp32, bf16 or fp16. `key` names the param in errors (e.g. "finetune.precision").

    Raises ParamError for an unknown value, and for bf16 on a CUDA card without native
    bf16 (compute capability < 8.0), naming the card and offering fp16 or auto."""
    if requested not in CHOICES:
        raise ParamError(key, requested, "one of: " + ", ".join(CHOICES))
    device = _device(device)
    if device.type != "cuda":
        return "fp32" if requested == "auto" else requested
    native = native_bf16(device)
    if requested == "auto":
        return "bf16" if native else "fp16"
    if requested == "bf16" and not native:
        import torch

        major, minor = cuda_capability(device)
        name = torch.cuda.get_device_name(device)
        raise ParamError(key, "bf16", f"bf16 needs compute capability {NATIVE_BF16[0]}.{NATIVE_BF16[1]} or newer and "
                                      f"this GPU ({name}, compute capability {major}.{minor}) has no native bf16; "
                                      f"use fp16 (with its grad scaler) or auto")
    return requested
