"""The ConvNeXt family: timm's `convnext_*` (Liu et al., "A ConvNet for the 2020s", 2022),
the CNN modernised to stand against ViT, its builder and its cost model.

Specs it claims: any timm name defined in `timm.models.convnext` (convnext_atto, femto,
pico, nano, tiny, small, base, large, xlarge, ...). The compute model knows the plain ones:
a 4 x 4 patchify stem, 2 x 2 downsampling, blocks of depthwise conv -> LayerNorm -> MLP
(1 x 1 convs in atto..nano, linear layers on NHWC from tiny up) -> layer scale, and the
norm -> linear head. ConvNeXt-V2 (global response norm), overlapping stems, the
head-norm-first and MLP-head variants are refused with the reason.

What autograd saves, per block at C channels on an h x w grid (a: 2 bytes under autocast,
else 4): the depthwise conv's input (a half copy of the fp32 residual stream), the
LayerNorm's input (a contiguous copy of the permuted tensor) and its mean and rstd, the
first MLP layer's input, its output (kept by GELU), GELU's output, the second layer's output
(kept by the layer-scale multiply). On CUDA autocast runs LayerNorm in fp32 (its saved input
is then a fp32 copy); on CPU it runs in the input's precision. Measured exactly on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from vitpipe.errors import ParamError
from vitpipe.models.registry import Family, element_bytes, layer_weights, not_plain, register_family, timm_module
from vitpipe.models.step_ops import RESIDUAL, cast_bytes, gemm, mem

TIMM_MODULE = "timm.models.convnext"
MIN_IMAGE = 32  # stem /4, then three /2 downsamplings: at least one cell at the end


@dataclass(frozen=True)
class ConvNeXtConfig:
    """Everything about a plain timm ConvNeXt that sets its size and cost."""

    image_size: int
    dims: tuple  # channels of the 4 stages
    depths: tuple  # blocks per stage
    num_classes: int
    mlp_hidden: tuple = ()  # hidden width of each stage's MLP (4 x dims)
    in_chans: int = 3
    patch: int = 4  # patchify stem: a patch x patch conv, stride patch
    kernel: int = 7  # depthwise conv
    conv_mlp: bool = False  # 1 x 1 convs on NCHW (atto..nano) or linear layers on NHWC
    layer_scale: bool = True

    def grids(self) -> list[int]:
        """Side of each stage's feature map."""
        h = (self.image_size - self.patch) // self.patch + 1
        out = []
        for i in range(len(self.dims)):
            if i:
                h = (h - 2) // 2 + 1
            out.append(h)
        return out


def _stages(c: ConvNeXtConfig):
    """(index, channels, hidden, blocks, grid side, previous stage's channels and side)."""
    grids = c.grids()
    for i, (dim, depth, hidden, h) in enumerate(zip(c.dims, c.depths, c.mlp_hidden, grids)):
        prev = (c.dims[i - 1], grids[i - 1]) if i else None
        yield i, dim, hidden, depth, h, prev


def _block_params(c: ConvNeXtConfig, d: int, hidden: int) -> int:
    """One block at `d` channels."""
    return (
        c.kernel**2 * d
        + d  # depthwise conv
        + 2 * d  # LayerNorm
        + d * hidden
        + hidden
        + hidden * d
        + d  # MLP
        + (d if c.layer_scale else 0)
    )  # gamma


@register_family
class ConvNeXt(Family):
    name = "convnext"
    label = "ConvNeXt"
    config_type = ConvNeXtConfig
    allowed = "convnext_{atto,femto,pico,nano,tiny,small,base,large}"
    spec_keys = frozenset()
    checkpointing = False
    channels_last = True

    def matches(self, arch):
        return timm_module(arch) == TIMM_MODULE

    def owns(self, model):
        from timm.models.convnext import ConvNeXt as TimmConvNeXt

        return isinstance(model, TimmConvNeXt)

    def validate(self, spec, image_size, key_prefix, image_size_key):
        if image_size < MIN_IMAGE:
            raise ParamError(
                image_size_key, image_size, f"at least {MIN_IMAGE} for {spec['arch']} (a ConvNeXt downsamples by 32)"
            )

    def build(self, spec, num_classes, image_size):
        import timm

        return timm.create_model(spec["arch"], pretrained=False, num_classes=num_classes)

    def config(self, spec, num_classes, image_size):
        import torch

        with torch.device("meta"):
            model = self.build(spec, num_classes, image_size)
        return _read_timm_convnext(model, spec["arch"], num_classes, image_size)

    def describe(self, spec, image_size):
        arch = spec["arch"]
        size = arch[len("convnext_") :]
        if arch.startswith("convnext_") and size.isalpha():
            return f"ConvNeXt-{size.capitalize()} @{image_size}px"
        return f"{arch} @{image_size}px"

    def cam_layer_names(self, model):
        return [f"stages.{i}" for i in reversed(range(len(model.stages)))]

    def shard_units(self, model):
        """Each block of each stage (timm's ConvNeXt keeps them under stages[i].blocks); the
        downsampling layers between stages stay in the root."""
        return [block for stage in model.stages for block in stage.blocks]

    def shard_unit_params(self, c):
        return [block for _, d, hidden, depth, _, _ in _stages(c) for block in depth * [_block_params(c, d, hidden)]]

    # --- cost -----------------------------------------------------------------------------
    def weight_layers(self, c):
        layers = [dict(part="embed", kind="patch", k=c.patch, cin=c.in_chans, cout=c.dims[0])]
        for _, dim, hidden, depth, _, prev in _stages(c):
            if prev:
                layers.append(dict(part="blocks", kind="conv", k=2, cin=prev[0], cout=dim))
            mlp = "conv" if c.conv_mlp else "linear"
            layers += depth * [
                dict(part="blocks", kind="conv", k=c.kernel, cin=1, cout=dim),
                dict(part="blocks", kind=mlp, k=1, cin=dim, cout=hidden),
                dict(part="blocks", kind=mlp, k=1, cin=hidden, cout=dim),
            ]
        return layers + [dict(part="head", kind="linear", k=1, cin=c.dims[-1], cout=c.num_classes)]

    def param_counts(self, c):
        p = {
            "stem": c.patch**2 * c.in_chans * c.dims[0] + c.dims[0] + 2 * c.dims[0],  # conv + LayerNorm
            "downsample": 0,
            "blocks": 0,
        }
        for _, d, hidden, depth, _, prev in _stages(c):
            if prev:
                p["downsample"] += 2 * prev[0] + 4 * prev[0] * d + d  # LayerNorm + 2 x 2 conv
            p["blocks"] += depth * _block_params(c, d, hidden)
        p["head"] = 2 * c.dims[-1] + ((c.dims[-1] + 1) * c.num_classes if c.num_classes else 0)
        return p

    def flops(self, c):
        stem = 2 * c.patch**2 * c.in_chans * c.dims[0] * c.grids()[0] ** 2
        body = 0
        for _, d, hidden, depth, h, prev in _stages(c):
            if prev:
                body += 2 * 4 * prev[0] * d * h * h
            body += depth * 2 * h * h * (c.kernel**2 * d + 2 * d * hidden)
        head = 2 * c.dims[-1] * c.num_classes
        return {"forward": stem + body + head, "first": stem, "recompute": body}

    def saved(self, c, precision, attention, checkpointing, device_type):
        if checkpointing:
            raise self.refuse_checkpointing()
        a = element_bytes(precision)
        # LayerNorm's saved input: autocast on CUDA runs it in fp32, on CPU in the input's dtype
        ln = 4 if device_type == "cuda" else a
        h0 = c.grids()[0]
        s = {
            "image": a * c.in_chans * c.image_size**2,
            "stem_norm": ln * c.dims[0] * h0**2 + 8 * h0**2,
            "downsample": 0,
            "blocks": 0,
        }
        for _, d, hidden, depth, h, prev in _stages(c):
            if prev:  # LayerNorm of the fp32 residual stream, then the conv's half input
                d0, h_prev = prev
                s["downsample"] += (4 + a) * d0 * h_prev**2 + 8 * h_prev**2
            per_block = (
                a * d  # depthwise conv input
                + ln * d  # LayerNorm input
                + a * d  # first MLP layer input
                + 2 * a * hidden  # its output (GELU's input) and GELU's output
                + (a * d if c.layer_scale else 0)
            ) * h * h + 8 * h * h  # + LN stats
            s["blocks"] += depth * per_block
        d = c.dims[-1]
        s["head"] = 4 * d + 8 + a * d  # pooled (the norm's input), its stats, the linear's input
        s["loss"] = 4 * c.num_classes + 8  # log-softmax output (fp32) and the target
        return s

    def autocast_weight_params(self, c, checkpointing):
        return sum(layer_weights(x) for x in self.weight_layers(c))

    def transient_bytes(self, c, precision, attention, checkpointing):
        # backward of the widest block: the residual gradient (fp32) and the MLP's hidden
        # gradient, at the stage where they are largest
        a = element_bytes(precision)
        return max((4 * d + 2 * a * hidden) * h * h for _, d, hidden, _, h, _ in _stages(c))

    def step_ops(self, c, a: int) -> dict:
        """What one training step executes per image (the time model's op list; vocabulary in step_ops)."""
        r, cast = RESIDUAL, cast_bytes(a)
        ncast = 1 if cast else 0
        g0 = c.grids()[0]
        ops = [
            gemm(g0 * g0, c.dims[0], c.in_chans * c.patch**2, first=True, what="stem conv"),
            mem((a + r) * c.dims[0] * g0 * g0, 3 * r * c.dims[0] * g0 * g0, 1, 2, what="stem norm"),
        ]
        tensors, cast_params = 4 + 4, c.in_chans * c.patch**2 * c.dims[0] + c.dims[-1] * c.num_classes
        for _, d, hidden, depth, h, prev in _stages(c):
            p = h * h
            if prev:
                pp = prev[1] ** 2
                ops += [
                    mem(2 * r * prev[0] * pp, 4 * r * prev[0] * pp, 2, 3, what="downsample norm"),
                    gemm(p, d, 4 * prev[0], what="downsample conv 2x2"),
                ]
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


def _read_timm_convnext(m, name, num_classes, image_size) -> ConvNeXtConfig:
    import torch.nn as nn
    from timm.layers import LayerNorm, LayerNorm2d, Mlp, NormMlpClassifierHead
    from timm.models.convnext import ConvNeXtBlock

    blocks = [b for stage in m.stages for b in stage.blocks]
    b0 = blocks[0]
    stem = m.stem
    checks = {
        "a patchify stem": len(stem) == 2
        and isinstance(stem[0], nn.Conv2d)
        and isinstance(stem[1], LayerNorm2d)
        and stem[0].kernel_size[0] == stem[0].stride[0],
        "standard blocks": all(type(b) is ConvNeXtBlock for b in blocks),
        "LayerNorm": all(type(b.norm) in (LayerNorm, LayerNorm2d) for b in blocks),
        "GELU MLP without response norm": all(
            type(b.mlp) is Mlp and type(b.mlp.act).__name__ == "GELU" and isinstance(b.mlp.norm, nn.Identity)
            for b in blocks
        ),
        "biased convolutions": all(b.conv_dw.bias is not None for b in blocks),
        "the same layer scale everywhere": len({b.gamma is None for b in blocks}) == 1,
        "plain shortcuts": all(isinstance(b.shortcut, nn.Identity) for b in blocks),
        "2 x 2 downsampling": all(
            isinstance(s.downsample, nn.Identity)
            if i == 0
            else (isinstance(s.downsample[0], LayerNorm2d) and s.downsample[1].kernel_size == (2, 2))
            for i, s in enumerate(m.stages)
        ),
        "a norm -> linear head": type(m.head) is NormMlpClassifierHead
        and isinstance(m.head.pre_logits, nn.Identity)
        and isinstance(m.head.norm, LayerNorm2d)
        and isinstance(m.norm_pre, nn.Identity)
        and m.head.global_pool.pool_type == "avg",
        "one depthwise kernel": len({b.conv_dw.kernel_size for b in blocks}) == 1,
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise not_plain(name, "ConvNeXt", "needs " + ", ".join(bad))
    fc1 = [s.blocks[0].mlp.fc1 for s in m.stages]
    return ConvNeXtConfig(
        image_size=image_size,
        dims=tuple(s.blocks[0].conv_dw.out_channels for s in m.stages),
        depths=tuple(len(s.blocks) for s in m.stages),
        num_classes=num_classes,
        mlp_hidden=tuple(getattr(f, "out_features", None) or f.out_channels for f in fc1),
        in_chans=stem[0].in_channels,
        patch=stem[0].kernel_size[0],
        kernel=b0.conv_dw.kernel_size[0],
        conv_mlp=b0.use_conv_mlp,
        layer_scale=b0.gamma is not None,
    )
