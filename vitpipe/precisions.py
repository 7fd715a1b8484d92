"""The precisions vitpipe knows, in one table: what params.yaml accepts, the dtype autocast
runs matmuls in, the bytes of one element, whether training scales the loss, and which
dense peak of a device profile the time model uses. params, training, the planner and the
compute model read it here; a new precision (fp8) is one row.

What a precision means on a given device (`precision: auto`, bf16 only where native) is
decided in vitpipe.hardware.precision.resolve. The bottom layer: no torch at import."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Precision:
    name: str  # the word in params.yaml and in a device profile's peak_tflops
    autocast: str | None  # torch dtype autocast runs matmuls in (None: no autocast, fp32)
    bytes: int  # one matmul input/output element
    grad_scaler: bool  # the loss is scaled (fp16: small gradients underflow otherwise)
    peak: str  # the device profile's peak_tflops key its matmuls run at
    trains: bool  # a training precision; tf32 is a setting of the compute model only

    def torch_dtype(self):
        """The autocast dtype as a torch.dtype (None for fp32 and tf32)."""
        if self.autocast is None:
            return None
        import torch

        return getattr(torch, self.autocast)


TABLE = (
    Precision("fp32", None, 4, grad_scaler=False, peak="fp32", trains=True),
    Precision("tf32", None, 4, grad_scaler=False, peak="tf32", trains=False),
    Precision("bf16", "bfloat16", 2, grad_scaler=False, peak="bf16", trains=True),
    Precision("fp16", "float16", 2, grad_scaler=True, peak="fp16", trains=True),
)
BY_NAME = {p.name: p for p in TABLE}
AUTO = "auto"  # training: the precision the device runs natively (hardware.precision)
TRAINING = (*(p.name for p in TABLE if p.trains), AUTO)  # train/pretrain/finetune.precision
MODELLED = tuple(p.name for p in TABLE)  # profile.precision; a device profile's peaks
HALF = tuple(p.name for p in TABLE if p.autocast)  # autocast precisions


def get(name: str) -> Precision:
    """The row of a resolved precision (not `auto`); KeyError for an unknown name."""
    return BY_NAME[name]


def element_bytes(name: str) -> int:
    """Bytes of a matmul input/output element at `name` (half under autocast)."""
    return BY_NAME[name].bytes
