"""The ResNet family: torchvision's ResNets and timm's plain ones (deep stem, avg-down,
ResNeXt groups, wide), their builder and their cost model.

Specs it claims:
  resnet18|34|50|101|152   torchvision's ResNets
  <a timm name>            any plain timm ResNet (resnet50d, resnext50_32x4d, wide_resnet50_2)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vitpipe.models.registry import Family, element_bytes, layer_weights, not_plain, register_family, timm_module
from vitpipe.models.step_ops import gemm, mem

# torchvision ResNets: depth -> (block, blocks per stage)
RESNETS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
TORCHVISION_RESNET = re.compile(r"^resnet(18|34|50|101|152)$")
TIMM_MODULE = "timm.models.resnet"
STAGES = ("layer4", "layer3", "layer2", "layer1")  # torchvision / timm, deepest first


@dataclass(frozen=True)
class ResNetConfig:
    """A torchvision-style ResNet (timm's plain ResNets add the deep stem and avg-down)."""

    image_size: int
    block: str  # basic | bottleneck
    layers: tuple
    num_classes: int
    groups: int = 1
    width_per_group: int = 64
    stem: str = "plain"  # plain (7x7) | deep (3x 3x3) | deep_tiered
    stem_width: int = 64
    avg_down: bool = False  # shortcut downsample by AvgPool + 1x1 conv ("d" variants)
    in_chans: int = 3


# ---------------------------------------------------------------------------------------
# The layers, walked once; params, FLOPs and activations all read this list


def resnet_features(c: ResNetConfig) -> int:
    return 512 * (4 if c.block == "bottleneck" else 1)


def resnet_convs(c: ResNetConfig) -> list[dict]:
    """Every convolution (each followed by a BatchNorm) in forward order, with its spatial
    size. `bn_saved`: the BN output is saved (by the ReLU after it); a shortcut's is not."""
    convs, h = [], c.image_size

    def conv(part, cin, cout, k, stride, groups=1, bn_saved=True):
        nonlocal h
        h_in, h = h, (h + 2 * (k // 2) - k) // stride + 1
        convs.append(
            dict(
                part=part,
                cin=cin,
                cout=cout,
                k=k,
                stride=stride,
                groups=groups,
                h_in=h_in,
                h_out=h,
                bn_saved=bn_saved,
                pool_before=0,
            )
        )
        return h

    if c.stem == "plain":
        inplanes = 64
        conv("stem", c.in_chans, inplanes, 7, 2)
    else:
        w1, w2 = (c.stem_width, c.stem_width) if c.stem == "deep" else (3 * (c.stem_width // 4), c.stem_width)
        inplanes = 2 * c.stem_width
        conv("stem", c.in_chans, w1, 3, 2)
        conv("stem", w1, w2, 3, 1)
        conv("stem", w2, inplanes, 3, 1)
    h = (h + 2 - 3) // 2 + 1  # max pool 3x3 / 2
    expansion = 4 if c.block == "bottleneck" else 1
    for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), c.layers)):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            h_block, out, first = h, planes * expansion, len(convs)
            if c.block == "basic":
                conv("blocks", inplanes, planes, 3, stride)
                conv("blocks", planes, planes, 3, 1)
            else:
                width = int(planes * c.width_per_group / 64) * c.groups
                conv("blocks", inplanes, width, 1, 1)
                conv("blocks", width, width, 3, stride, groups=c.groups)
                conv("blocks", width, out, 1, 1)
            if stride != 1 or inplanes != out:  # projection shortcut
                h_after = h
                if c.avg_down and stride > 1:
                    h = (h_block + 1) // 2  # AvgPool2d(2, 2, ceil_mode=True)
                    conv("blocks", inplanes, out, 1, 1, bn_saved=False)
                    convs[-1]["pool_before"] = 1
                else:
                    h = h_block
                    conv("blocks", inplanes, out, 1, stride, bn_saved=False)
                h = h_after
            for x in convs[first:]:
                x["unit"] = (stage, i)  # one residual block: one FSDP unit
            inplanes = out
    return convs


def _conv_weights(x: dict) -> int:
    return x["k"] ** 2 * x["cin"] // x["groups"] * x["cout"]


@register_family
class ResNet(Family):
    name = "resnet"
    label = "ResNet"
    config_type = ResNetConfig
    allowed = "resnet18/34/50/101/152"
    spec_keys = frozenset()
    checkpointing = False
    channels_last = True

    def matches(self, arch):
        return bool(TORCHVISION_RESNET.match(arch)) or timm_module(arch) == TIMM_MODULE

    def owns(self, model):
        import torchvision
        from timm.models.resnet import ResNet as TimmResNet

        return isinstance(model, (torchvision.models.ResNet, TimmResNet))

    def build(self, spec, num_classes, image_size):
        if TORCHVISION_RESNET.match(spec["arch"]):
            import torchvision

            return getattr(torchvision.models, spec["arch"])(weights=None, num_classes=num_classes)
        import timm

        return timm.create_model(spec["arch"], pretrained=False, num_classes=num_classes)

    def config(self, spec, num_classes, image_size):
        arch = spec["arch"]
        if TORCHVISION_RESNET.match(arch):
            block, layers = RESNETS[int(arch[len("resnet") :])]
            return ResNetConfig(image_size=image_size, block=block, layers=layers, num_classes=num_classes)
        import torch

        with torch.device("meta"):
            model = self.build(spec, num_classes, image_size)
        return _read_timm_resnet(model, arch, num_classes, image_size)

    def describe(self, spec, image_size):
        arch = spec["arch"]
        return f"ResNet-{arch[len('resnet') :]}" if TORCHVISION_RESNET.match(arch) else arch

    def cam_layer_names(self, model):
        return [n for n in STAGES if hasattr(model, n)]

    def shard_units(self, model):
        return [block for stage in reversed(STAGES) for block in getattr(model, stage, [])]

    def shard_unit_params(self, c):
        units = {}
        for conv in resnet_convs(c):
            if conv["part"] == "blocks":
                units[conv["unit"]] = units.get(conv["unit"], 0) + _conv_weights(conv) + 2 * conv["cout"]
        return list(units.values())

    # --- cost -----------------------------------------------------------------------------
    def param_counts(self, c):
        p = {"stem": 0, "blocks": 0}
        for conv in resnet_convs(c):
            p[conv["part"]] += _conv_weights(conv) + 2 * conv["cout"]  # conv + BatchNorm affine
        p["head"] = (resnet_features(c) + 1) * c.num_classes if c.num_classes else 0
        return p

    def flops(self, c):
        conv_flops = [2 * _conv_weights(x) * x["h_out"] ** 2 for x in resnet_convs(c)]
        forward = sum(conv_flops) + 2 * resnet_features(c) * c.num_classes
        return {"forward": forward, "first": conv_flops[0], "recompute": forward - conv_flops[0]}

    def saved(self, c, precision, attention, checkpointing, device_type):
        if checkpointing:
            raise self.refuse_checkpointing()
        a = element_bytes(precision)
        convs = resnet_convs(c)
        s = {"image": a * c.in_chans * c.image_size**2, "conv_out": 0, "bn_out": 0, "shortcut_pool": 0}
        for x in convs:
            s["conv_out"] += a * x["cout"] * x["h_out"] ** 2
            if x["bn_saved"]:
                s["bn_out"] += a * x["cout"] * x["h_out"] ** 2
            if x["pool_before"]:
                s["shortcut_pool"] += a * x["cin"] * x["h_out"] ** 2
        stem = [x for x in convs if x["part"] == "stem"][-1]
        h_pool = convs[len([x for x in convs if x["part"] == "stem"])]["h_in"]
        s["maxpool"] = (a + 8) * stem["cout"] * h_pool**2  # its output and int64 indices
        s["head_in"] = a * resnet_features(c)
        s["loss"] = 4 * c.num_classes + 8
        return s

    def weight_layers(self, c):
        return [
            dict(
                part="embed" if x["part"] == "stem" else "blocks",
                kind="conv",
                k=x["k"],
                cin=x["cin"] // x["groups"],
                cout=x["cout"],
            )
            for x in resnet_convs(c)
        ] + [dict(part="head", kind="linear", k=1, cin=resnet_features(c), cout=c.num_classes)]

    def autocast_weight_params(self, c, checkpointing):
        return sum(layer_weights(x) for x in self.weight_layers(c))

    def buffer_bytes(self, c):
        return sum(8 * x["cout"] + 8 for x in resnet_convs(c))  # running mean/var, batch counter

    def step_saved_bytes(self, c):
        return sum(8 * x["cout"] for x in resnet_convs(c))  # BatchNorm's batch mean and inverse std

    def transient_bytes(self, c, precision, attention, checkpointing):
        convs = resnet_convs(c)
        return 2 * element_bytes(precision) * max(x["cout"] * x["h_out"] ** 2 for x in convs[-3:])

    def step_ops(self, c, a: int) -> dict:
        """What one training step executes per image (the time model's op list; vocabulary in step_ops)."""
        ops, tensors, cast_params = [], 2, resnet_features(c) * c.num_classes
        convs = resnet_convs(c)
        for i, x in enumerate(convs):
            e = x["cout"] * x["h_out"] ** 2
            ops.append(
                {
                    **gemm(
                        x["h_out"] ** 2,
                        x["cout"],
                        x["cin"] // x["groups"] * x["k"] ** 2,
                        first=i == 0,
                        what=f"conv {x['k']}x{x['k']}",
                    ),
                    "nchw": x["cin"] * x["h_in"] ** 2 + e,
                }
            )
            # BatchNorm (statistics pass + normalise), ReLU after it (in place)
            relu = x["bn_saved"]
            ops.append(
                mem(
                    (3 * a + (2 * a if relu else 0)) * e,
                    (5 * a + (3 * a if relu else 0)) * e,
                    2 if relu else 1,
                    2 if relu else 1,
                    what="batchnorm, relu",
                )
            )
            tensors += 3
            cast_params += x["k"] ** 2 * x["cin"] // x["groups"] * x["cout"]
        outs = [x for x in convs if x["part"] == "blocks" and x["bn_saved"]]
        block_out = {x["unit"]: x["cout"] * x["h_out"] ** 2 for x in outs}  # the last conv of each block
        for e in block_out.values():  # residual add + ReLU
            ops.append(mem(3 * a * e + 2 * a * e, 3 * a * e, 2, 1, what="residual add, relu"))
        stem = [x for x in convs if x["part"] == "stem"][-1]
        e = stem["cout"] * stem["h_out"] ** 2
        ops.append(mem(a * e * 5 // 4, 2 * a * e, 1, 2, what="max pool"))
        ops.append(gemm(1, c.num_classes, resnet_features(c), what="head"))
        return {"ops": ops, "tensors": tensors, "cast_params": cast_params}


def _read_timm_resnet(m, name, num_classes, image_size) -> ResNetConfig:
    import torch.nn as nn
    from timm.models.resnet import BasicBlock, Bottleneck

    blocks = [blk for layer in (m.layer1, m.layer2, m.layer3, m.layer4) for blk in layer]
    block = "basic" if type(blocks[0]) is BasicBlock else "bottleneck"
    plain = all(type(blk) in (BasicBlock, Bottleneck) for blk in blocks) and all(
        getattr(blk, "se", None) is None
        and isinstance(blk.bn1, nn.BatchNorm2d)
        and isinstance(getattr(blk, "aa", nn.Identity()), nn.Identity)
        and isinstance(blk.drop_block, nn.Identity)
        for blk in blocks
    )
    if not plain or not isinstance(m.maxpool, nn.MaxPool2d):
        raise not_plain(name, "ResNet", "has attention, anti-aliasing or non-BatchNorm layers")
    if isinstance(m.conv1, nn.Sequential):
        w1, w2 = m.conv1[0].out_channels, m.conv1[3].out_channels
        stem, stem_width = ("deep", w1) if w1 == w2 else ("deep_tiered", w2)
    else:
        stem, stem_width = "plain", 64
    first = blocks[0]
    groups = first.conv2.groups if block == "bottleneck" else 1
    # timm: width = floor(planes * base_width / 64) * cardinality; stage 1 has planes = 64
    width_per_group = first.conv1.out_channels // groups if block == "bottleneck" else 64
    avg_down = any(
        blk.downsample is not None and isinstance(blk.downsample[0], (nn.AvgPool2d, nn.Identity)) for blk in blocks
    )
    return ResNetConfig(
        image_size=image_size,
        block=block,
        layers=tuple(len(x) for x in (m.layer1, m.layer2, m.layer3, m.layer4)),
        num_classes=num_classes,
        groups=groups,
        width_per_group=width_per_group,
        stem=stem,
        stem_width=stem_width,
        avg_down=avg_down,
    )
