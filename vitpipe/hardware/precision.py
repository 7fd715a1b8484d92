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

from vitpipe.costmodel.devices import NATIVE_BF16, Device
from vitpipe.errors import ParamError
from vitpipe.precisions import TRAINING as CHOICES


def _device(device):
    import torch

    return device if isinstance(device, torch.device) else torch.device(device)


def cuda_capability(device) -> tuple[int, int]:
    import torch

    major, minor = torch.cuda.get_device_capability(_device(device))
    return int(major), int(minor)


def capability(device) -> tuple[int, int] | None:
    """The CUDA compute capability of `device` (a torch device, its name, or a cost-model
    profile); None for a CPU."""
    if isinstance(device, Device):
        return tuple(device.capability) if device.capability is not None else None
    device = _device(device)
    return cuda_capability(device) if device.type == "cuda" else None


def _name(device) -> str:
    if isinstance(device, Device):
        return device.label
    import torch

    return torch.cuda.get_device_name(_device(device))


def native_bf16(device) -> bool:
    """True on a CUDA device with bf16 tensor cores (compute capability >= 8.0)."""
    cap = capability(device)
    return cap is not None and cap >= NATIVE_BF16


def native(device) -> str:
    """What `precision: auto` means on `device`."""
    if capability(device) is None:
        return "fp32"
    return "bf16" if native_bf16(device) else "fp16"


def resolve(requested: str, device, key: str) -> str:
    """The precision a run on `device` (a torch device or a cost-model profile) uses for
    `requested` (fp32 | bf16 | fp16 | auto): fp32, bf16 or fp16. `key` names the param in
    errors (e.g. "finetune.precision"). Training, the planner, the out-of-memory advice and
    the GPU proof all decide here.

    Raises ParamError for an unknown value, and for bf16 on a CUDA card without native
    bf16 (compute capability < 8.0), naming the card and offering fp16 or auto."""
    if requested not in CHOICES:
        raise ParamError(key, requested, "one of: " + ", ".join(CHOICES))
    if requested == "auto":
        return native(device)
    cap = capability(device)
    if requested == "bf16" and cap is not None and cap < NATIVE_BF16:
        raise ParamError(
            key,
            "bf16",
            f"bf16 needs compute capability {NATIVE_BF16[0]}.{NATIVE_BF16[1]} or newer and "
            f"this GPU ({_name(device)}, compute capability {cap[0]}.{cap[1]}) has no native "
            f"bf16; use fp16 (with its grad scaler) or auto",
        )
    return requested
