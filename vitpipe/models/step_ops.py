"""The vocabulary in which each family writes what one training step of its network executes,
per image (`Family.step_ops`, in the family's own file), as the time model
(`vitpipe.costmodel.steptime`) reads it: its matrix multiplications with their shapes, the
token mixing of attention, and the memory-bound work (norms, activations, residual adds,
autocast's casts, layout copies) in bytes moved. Written from how timm / torchvision run the
modules in eager PyTorch under autocast: the residual stream and LayerNorm outputs stay fp32,
a Linear casts its input to half, GELU and BatchNorm run in the activation dtype.

Op kinds (all per image; `count` repeats it):
- gemm: rows m (tokens or pixels), n, k; backward = input gradient (not for the first layer,
  whose input is the image) + weight gradient, each with its own shape. A convolution on NCHW
  tensors carries `nchw`: its input + output elements, which cuDNN's tensor-core kernels
  transpose to NHWC and back.
- attention: heads, tokens, head_dim; the kernel (fused SDPA or the math form) is the
  device's choice, made in the time model.
- dwconv: a depthwise k x k convolution (CUDA cores, not tensor cores): channels, pixels, k.
- mem: bytes read + written forward and backward, and the kernels that move them.
"""

from __future__ import annotations

RESIDUAL = 4  # the residual stream and LayerNorm outputs stay fp32 under autocast


def gemm(m, n, k, count=1, first=False, what=""):
    return {"op": "gemm", "m": m, "n": n, "k": k, "count": count, "first": first, "what": what}


def mem(fwd, bwd, kf, kb, count=1, what=""):
    return {"op": "mem", "fwd": fwd, "bwd": bwd, "kf": kf, "kb": kb, "count": count, "what": what}


def cast_bytes(a):
    """Bytes per element of autocast's fp32 -> half cast (read 4, write 2); none in fp32."""
    return RESIDUAL + a if a < RESIDUAL else 0


def step_ops(cfg, element_bytes: int) -> dict:
    """{ops, tensors (parameter tensors), cast_params (weights autocast casts to half)} of
    `cfg` with activations of `element_bytes` (2 under autocast, 4 in fp32): its family's
    `step_ops`, written in the vocabulary above."""
    from vitpipe.models.registry import family_of_config

    return family_of_config(cfg).step_ops(cfg, element_bytes)
