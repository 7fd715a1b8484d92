"""What one training step of a family's network executes, per image, as the time model
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

from vitpipe.models.convnext import ConvNeXtConfig, _stages
from vitpipe.models.resnet import ResNetConfig, resnet_convs, resnet_features
from vitpipe.models.vit import ViTConfig

RESIDUAL = 4      # the residual stream and LayerNorm outputs stay fp32 under autocast


def gemm(m, n, k, count=1, first=False, what=""):
    return {"op": "gemm", "m": m, "n": n, "k": k, "count": count, "first": first, "what": what}


def mem(fwd, bwd, kf, kb, count=1, what=""):
    return {"op": "mem", "fwd": fwd, "bwd": bwd, "kf": kf, "kb": kb, "count": count, "what": what}


def _cast(a):
    """Bytes per element of autocast's fp32 -> half cast (read 4, write 2); none in fp32."""
    return RESIDUAL + a if a < RESIDUAL else 0


def vit_ops(c: ViTConfig, a: int) -> dict:
    t, d, hm, L, r, cast = c.tokens, c.dim, c.mlp_hidden, c.depth, RESIDUAL, _cast(a)
    ncast = 1 if cast else 0
    norm = mem(2 * r * t * d, 4 * r * t * d, 1, 2, what="layernorm")
    ops = [
        gemm(c.num_patches, d, c.in_chans * c.patch**2, first=True, what="patch embed"),
        mem((a + 2 * r) * t * d, r * t * d, 2, 1, what="cls token, position embedding"),
        # per block: 2 LayerNorms, the casts before qkv and fc1, q/k/v made contiguous for the
        # batched matmuls, the heads' output transposed back, GELU, 2 residual adds
        {**norm, "count": 2 * L},
        mem(cast * t * d, cast * t * d, ncast, ncast, count=2 * L, what="casts before qkv, fc1"),
        mem(3 * 2 * a * t * d, 3 * 2 * a * t * d, 3, 3, count=L, what="q, k, v contiguous"),
        mem(2 * a * t * d, 2 * a * t * d, 1, 1, count=L, what="heads transposed back"),
        mem(2 * a * t * hm, 3 * a * t * hm, 1, 1, count=L, what="GELU"),
        mem((2 * r + a) * t * d, (r + a) * t * d, 1, 1, count=2 * L, what="residual adds"),
        gemm(t, 3 * d, d, count=L, what="qkv"),
        gemm(t, d, d, count=L, what="attention projection"),
        gemm(t, hm, d, count=L, what="fc1"),
        gemm(t, d, hm, count=L, what="fc2"),
        {"op": "attention", "heads": c.heads, "tokens": t, "head_dim": d // c.heads, "count": L},
        {**norm, "count": 1, "what": "final norm"},
        gemm(1, c.num_classes, d, what="head"),
    ]
    tensors = 4 + 12 * L + 2 + 2 + (1 if c.class_token else 0)
    cast_params = c.in_chans * c.patch**2 * d + L * (4 * d * d + 2 * d * hm) + d * c.num_classes
    return {"ops": ops, "tensors": tensors, "cast_params": cast_params}


def resnet_ops(c: ResNetConfig, a: int) -> dict:
    ops, tensors, cast_params = [], 2, resnet_features(c) * c.num_classes
    convs = resnet_convs(c)
    for i, x in enumerate(convs):
        e = x["cout"] * x["h_out"] ** 2
        ops.append({**gemm(x["h_out"] ** 2, x["cout"], x["cin"] // x["groups"] * x["k"] ** 2, first=i == 0,
                           what=f"conv {x['k']}x{x['k']}"),
                    "nchw": x["cin"] * x["h_in"] ** 2 + e})
        # BatchNorm (statistics pass + normalise), ReLU after it (in place)
        relu = x["bn_saved"]
        ops.append(mem((3 * a + (2 * a if relu else 0)) * e, (5 * a + (3 * a if relu else 0)) * e,
                       2 if relu else 1, 2 if relu else 1, what="batchnorm, relu"))
        tensors += 3
        cast_params += x["k"] ** 2 * x["cin"] // x["groups"] * x["cout"]
    outs = [x for x in convs if x["part"] == "blocks" and x["bn_saved"]]
    block_out = {x["unit"]: x["cout"] * x["h_out"] ** 2 for x in outs}   # the last conv of each block
    for e in block_out.values():   # residual add + ReLU
        ops.append(mem(3 * a * e + 2 * a * e, 3 * a * e, 2, 1, what="residual add, relu"))
    stem = [x for x in convs if x["part"] == "stem"][-1]
    e = stem["cout"] * stem["h_out"] ** 2
    ops.append(mem(a * e * 5 // 4, 2 * a * e, 1, 2, what="max pool"))
    ops.append(gemm(1, c.num_classes, resnet_features(c), what="head"))
    return {"ops": ops, "tensors": tensors, "cast_params": cast_params}


def convnext_ops(c: ConvNeXtConfig, a: int) -> dict:
    r, cast = RESIDUAL, _cast(a)
    ncast = 1 if cast else 0
    g0 = c.grids()[0]
    ops = [gemm(g0 * g0, c.dims[0], c.in_chans * c.patch**2, first=True, what="stem conv"),
           mem((a + r) * c.dims[0] * g0 * g0, 3 * r * c.dims[0] * g0 * g0, 1, 2, what="stem norm")]
    tensors, cast_params = 4 + 4, c.in_chans * c.patch**2 * c.dims[0] + c.dims[-1] * c.num_classes
    for _, d, hidden, depth, h, prev in _stages(c):
        p = h * h
        if prev:
            pp = prev[1] ** 2
            ops += [mem(2 * r * prev[0] * pp, 4 * r * prev[0] * pp, 2, 3, what="downsample norm"),
                    gemm(p, d, 4 * prev[0], what="downsample conv 2x2")]
            tensors += 4
            cast_params += 4 * prev[0] * d
        ops += [
            mem(cast * d * p, cast * d * p, ncast, ncast, count=depth, what="cast before depthwise conv"),
            {"op": "dwconv", "channels": d, "pixels": p, "k": c.kernel, "count": depth},
            # NHWC permute made contiguous for the LayerNorm, the LayerNorm (fp32 out), the cast
            # before fc1, GELU, the layer scale (half x fp32 -> fp32), the residual add
            mem(2 * a * d * p, 2 * a * d * p, 1, 1, count=depth, what="permute to NHWC"),
            mem((a + r) * d * p, 4 * r * d * p, 1, 2, count=depth, what="layernorm"),
            mem(cast * d * p, cast * d * p, ncast, ncast, count=depth, what="cast before fc1"),
            gemm(p, hidden, d, count=depth, what="fc1"),
            mem(2 * a * hidden * p, 3 * a * hidden * p, 1, 1, count=depth, what="GELU"),
            gemm(p, d, hidden, count=depth, what="fc2"),
            mem((a + r) * d * p, (2 * r + a) * d * p, 1, 2, count=depth, what="layer scale"),
            mem(3 * r * d * p, r * d * p, 1, 1, count=depth, what="residual add"),
        ]
        tensors += 9 * depth
        cast_params += depth * 2 * d * hidden
    ops.append(gemm(1, c.num_classes, c.dims[-1], what="head"))
    return {"ops": ops, "tensors": tensors, "cast_params": cast_params}


def step_ops(cfg, element_bytes: int) -> dict:
    """{ops, tensors (parameter tensors), cast_params (weights autocast casts to half)} of
    `cfg` with activations of `element_bytes` (2 under autocast, 4 in fp32)."""
    for kind, fn in ((ViTConfig, vit_ops), (ResNetConfig, resnet_ops), (ConvNeXtConfig, convnext_ops)):
        if isinstance(cfg, kind):
            return fn(cfg, element_bytes)
    raise TypeError(f"no op list for {type(cfg).__name__}")
