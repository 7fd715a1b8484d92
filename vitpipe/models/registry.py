"""The model registry: a spec (a dict from params.yaml) -> a network, or -> the facts
about that network the compute model needs (`model_config`), without building it.

A spec's `arch` is one of
  vit                      explicit sizes: patch, dim, depth, heads, mlp_ratio (pool: token|avg)
  vit_{ti,s,m,b,l,h}<p>    the ViT paper's sizes with patch p (vit_b16); extra keys override
  resnet18|34|50|101|152   torchvision's ResNets
  <a timm name>            any timm model of a plain ViT or ResNet (vit_small_patch32_384, resnet50d)
Keys a spec may carry that are not about the network (source, weights, ...) are ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vitpipe.errors import ParamError, UserError

# name -> (dim, depth, heads); mlp_ratio 4 for all (ViT paper table 1; DeiT for Ti/S; timm for M)
VIT_SIZES = {
    "ti": (192, 12, 3),
    "s": (384, 12, 6),
    "m": (512, 12, 8),
    "b": (768, 12, 12),
    "l": (1024, 24, 16),
    "h": (1280, 32, 16),
}
VIT_SIZE_NAMES = {"ti": "Ti", "s": "S", "m": "M", "b": "B", "l": "L", "h": "H"}
SHORT_VIT = re.compile(r"^vit_(ti|s|m|b|l|h)(\d+)$")

# torchvision ResNets: depth -> (block, blocks per stage)
RESNETS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
TORCHVISION_RESNET = re.compile(r"^resnet(18|34|50|101|152)$")

# timm modules whose models count as "plain": the compute model knows their layers
TIMM_MODULES = {"timm.models.vision_transformer": "vit", "timm.models.resnet": "resnet"}

ALLOWED_ARCH = ("one of: vit, vit_b16-style (vit_{ti,s,m,b,l,h}<patch>), "
                "resnet18/34/50/101/152, or a timm ViT/ResNet name")
VIT_KEYS = ("patch", "dim", "depth", "heads", "mlp_ratio")


@dataclass(frozen=True)
class ViTConfig:
    """Everything about a timm VisionTransformer that sets its size and cost."""
    image_size: int
    patch: int
    dim: int
    depth: int
    heads: int
    mlp_hidden: int
    num_classes: int
    in_chans: int = 3
    class_token: bool = True
    reg_tokens: int = 0
    pool: str = "token"          # token | avg
    final_norm: bool = True      # LayerNorm over all tokens after the blocks
    fc_norm: bool = False        # LayerNorm after pooling instead
    pre_norm: bool = False       # LayerNorm before the blocks (CLIP style)
    no_embed_class: bool = False  # position embedding skips the prefix tokens
    qkv_bias: bool = True
    patch_bias: bool = True      # CLIP's patch embedding has none
    layer_scale: bool = False

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch) ** 2

    @property
    def prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens

    @property
    def tokens(self) -> int:
        return self.num_patches + self.prefix_tokens


@dataclass(frozen=True)
class ResNetConfig:
    """A torchvision-style ResNet (timm's plain ResNets add the deep stem and avg-down)."""
    image_size: int
    block: str                   # basic | bottleneck
    layers: tuple
    num_classes: int
    groups: int = 1
    width_per_group: int = 64
    stem: str = "plain"          # plain (7x7) | deep (3x 3x3) | deep_tiered
    stem_width: int = 64
    avg_down: bool = False       # shortcut downsample by AvgPool + 1x1 conv ("d" variants)
    in_chans: int = 3


# ---------------------------------------------------------------------------------------
# What kind of spec is this?


def arch_kind(arch) -> str:
    """'vit', 'vit_short', 'resnet' (torchvision), 'timm_vit', 'timm_resnet' or ''."""
    if not isinstance(arch, str):
        return ""
    if arch == "vit":
        return "vit"
    if SHORT_VIT.match(arch):
        return "vit_short"
    if TORCHVISION_RESNET.match(arch):
        return "resnet"
    module = _timm_module(arch)
    return {"vit": "timm_vit", "resnet": "timm_resnet"}.get(TIMM_MODULES.get(module, ""), "")


def _timm_module(name: str) -> str:
    import timm

    if not timm.is_model(name):
        return ""
    return timm.models.model_entrypoint(name).__module__


def vit_sizes(spec: dict) -> dict:
    """The ViT size keys of a `vit` or short-name spec (short name's table, then overrides)."""
    arch = spec["arch"]
    sizes = {"pool": "token"}
    m = SHORT_VIT.match(arch)
    if m:
        dim, depth, heads = VIT_SIZES[m.group(1)]
        sizes.update(patch=int(m.group(2)), dim=dim, depth=depth, heads=heads, mlp_ratio=4.0)
    sizes.update({k: spec[k] for k in (*VIT_KEYS, "pool") if k in spec})
    return sizes


def validate_spec(spec: dict, image_size: int, key_prefix: str,
                  image_size_key: str = "data.image_size") -> None:
    """Raise ParamError naming the key if `spec` can not be built at `image_size`. Cheap:
    looks names up, builds nothing."""
    if not isinstance(spec, dict):
        raise ParamError(key_prefix, spec, "a mapping with an `arch` key")
    arch = spec.get("arch")
    kind = arch_kind(arch)
    if not kind:
        raise ParamError(f"{key_prefix}.arch", arch, ALLOWED_ARCH)
    if kind in ("resnet", "timm_resnet"):
        return
    if kind == "timm_vit":
        m = re.search(r"patch(\d+)", arch)
        patch = int(m.group(1)) if m else None
        if patch and image_size % patch:
            raise ParamError(f"{key_prefix}.arch", arch,
                             _patch_message(image_size, image_size_key, patch))
        return
    sizes = vit_sizes(spec)
    missing = [k for k in VIT_KEYS if k not in sizes]
    if missing:
        raise ParamError(f"{key_prefix}.{missing[0]}", None,
                         f"arch vit needs {', '.join(VIT_KEYS)}")
    for k in ("patch", "dim", "depth", "heads"):
        v = sizes[k]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ParamError(f"{key_prefix}.{k}", v, "a positive integer")
    r = sizes["mlp_ratio"]
    if isinstance(r, bool) or not isinstance(r, (int, float)) or r <= 0 or int(sizes["dim"] * r) < 1:
        raise ParamError(f"{key_prefix}.mlp_ratio", r, "a positive number (hidden = dim * mlp_ratio)")
    if sizes["pool"] not in ("token", "avg"):
        raise ParamError(f"{key_prefix}.pool", sizes["pool"], "token (class token) or avg")
    if sizes["dim"] % sizes["heads"]:
        divisors = [h for h in range(1, sizes["dim"] + 1) if sizes["dim"] % h == 0]
        raise ParamError(f"{key_prefix}.heads", sizes["heads"],
                         f"a divisor of dim={sizes['dim']}: {_short_list(divisors)}")
    if not isinstance(image_size, int) or image_size <= 0:
        raise ParamError(image_size_key, image_size, "a positive integer")
    if image_size % sizes["patch"]:
        raise ParamError(f"{key_prefix}.patch", sizes["patch"],
                         _patch_message(image_size, image_size_key, sizes["patch"]))


def _patch_message(image_size, image_size_key, patch) -> str:
    divisors = [p for p in range(1, image_size + 1) if image_size % p == 0]
    return (f"{image_size_key}={image_size} must be divisible by the patch ({patch}); "
            f"allowed patches: {_short_list(divisors)}")


def _short_list(xs, n=12) -> str:
    return ", ".join(map(str, xs[:n])) + (", ..." if len(xs) > n else "")


# ---------------------------------------------------------------------------------------
# Build


def build_model(spec: dict, num_classes: int, image_size: int):
    """The network a spec names, randomly initialised (weights come from the loader)."""
    kind = arch_kind(spec.get("arch"))
    if kind in ("vit", "vit_short"):
        from timm.models.vision_transformer import VisionTransformer

        s = vit_sizes(spec)
        avg = s["pool"] == "avg"
        return VisionTransformer(
            img_size=image_size, patch_size=s["patch"], embed_dim=s["dim"], depth=s["depth"],
            num_heads=s["heads"], mlp_ratio=s["mlp_ratio"], num_classes=num_classes,
            # avg pooling drops the then-unused class token; timm adds an fc_norm for it
            global_pool="avg" if avg else "token", class_token=not avg)
    if kind == "resnet":
        import torchvision

        return getattr(torchvision.models, spec["arch"])(weights=None, num_classes=num_classes)
    if kind in ("timm_vit", "timm_resnet"):
        import timm

        extra = {"img_size": image_size} if kind == "timm_vit" else {}
        return timm.create_model(spec["arch"], pretrained=False, num_classes=num_classes, **extra)
    raise ParamError("arch", spec.get("arch"), ALLOWED_ARCH)


def reset_head(model, num_classes: int) -> None:
    """Give `model` a fresh classifier for `num_classes` (fine-tuning on a new label set)."""
    import torch.nn as nn

    if hasattr(model, "reset_classifier"):        # timm
        model.reset_classifier(num_classes)
    elif isinstance(getattr(model, "fc", None), nn.Linear):   # torchvision ResNet
        fc = model.fc
        model.fc = nn.Linear(fc.in_features, num_classes, device=fc.weight.device,
                             dtype=fc.weight.dtype)
    else:
        raise UserError(f"do not know the classifier of {type(model).__name__}")


def head_param_names(model) -> set[str]:
    """Names of the classifier's parameters (dropped when loading weights for other classes)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "fc")
    for name, module in model.named_modules():
        if module is head:
            return {f"{name}.{p}" if name else p for p, _ in module.named_parameters()}
    return set()


def describe(spec: dict, image_size: int) -> str:
    """A short human name: 'ViT-B/16 @224px', 'ViT dim96 depth4 heads3 /4 @32px', 'ResNet-18'."""
    arch = spec.get("arch")
    kind = arch_kind(arch)
    if kind == "resnet":
        return f"ResNet-{arch[len('resnet'):]}"
    if kind == "vit_short" and not any(k in spec for k in VIT_KEYS):
        m = SHORT_VIT.match(arch)
        return f"ViT-{VIT_SIZE_NAMES[m.group(1)]}/{m.group(2)} @{image_size}px"
    if kind in ("vit", "vit_short"):
        s = vit_sizes(spec)
        pool = " gap" if s["pool"] == "avg" else ""
        return f"ViT dim{s['dim']} depth{s['depth']} heads{s['heads']}{pool} /{s['patch']} @{image_size}px"
    if kind == "timm_vit":
        return f"{arch} @{image_size}px"
    return str(arch)


# ---------------------------------------------------------------------------------------
# The facts the compute model needs


def model_config(spec: dict, num_classes: int, image_size: int) -> ViTConfig | ResNetConfig:
    """Sizes of the network `build_model` would build. Short names and `vit` specs are read
    directly; a timm name is built on the meta device (no memory, ~0.1 s) and inspected."""
    kind = arch_kind(spec.get("arch"))
    if kind in ("vit", "vit_short"):
        s = vit_sizes(spec)
        avg = s["pool"] == "avg"
        return ViTConfig(image_size=image_size, patch=s["patch"], dim=s["dim"], depth=s["depth"],
                         heads=s["heads"], mlp_hidden=int(s["dim"] * s["mlp_ratio"]),
                         num_classes=num_classes, class_token=not avg, pool=s["pool"],
                         final_norm=not avg, fc_norm=avg)
    if kind == "resnet":
        block, layers = RESNETS[int(spec["arch"][len("resnet"):])]
        return ResNetConfig(image_size=image_size, block=block, layers=layers,
                            num_classes=num_classes)
    if kind in ("timm_vit", "timm_resnet"):
        import torch

        with torch.device("meta"):
            model = build_model(spec, num_classes, image_size)
        read = _read_timm_vit if kind == "timm_vit" else _read_timm_resnet
        return read(model, spec["arch"], num_classes, image_size)
    raise ParamError("arch", spec.get("arch"), ALLOWED_ARCH)


def _not_plain(name, why):
    return UserError(f"{name} is not a plain ViT/ResNet the compute model knows ({why}); "
                     "use a vit/resnet spec or another timm name")


def _read_timm_vit(m, name, num_classes, image_size) -> ViTConfig:
    import torch.nn as nn
    from timm.layers import LayerScale, Mlp, PatchEmbed
    from timm.models.vision_transformer import Block

    b = m.blocks[0]
    checks = {
        "attention pooling": m.global_pool in ("token", "avg"),
        "standard blocks": all(type(blk) is Block for blk in m.blocks),
        "GELU MLP": type(b.mlp) is Mlp and isinstance(b.mlp.act, nn.GELU)
        and isinstance(b.mlp.norm, nn.Identity),
        "no qk-norm": isinstance(b.attn.q_norm, nn.Identity) and isinstance(b.attn.norm, nn.Identity),
        "LayerNorm": isinstance(b.norm1, nn.LayerNorm),
        "patch embedding": type(m.patch_embed) is PatchEmbed and isinstance(m.patch_embed.norm, nn.Identity),
        "learned position embedding": m.pos_embed is not None,
        "biased projections": b.attn.proj.bias is not None,
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise _not_plain(name, "needs " + ", ".join(bad))
    return ViTConfig(
        image_size=image_size, patch=m.patch_embed.patch_size[0], dim=m.embed_dim,
        depth=len(m.blocks), heads=b.attn.num_heads, mlp_hidden=b.mlp.fc1.out_features,
        num_classes=num_classes, in_chans=m.patch_embed.proj.in_channels,
        class_token=m.cls_token is not None, reg_tokens=m.num_reg_tokens, pool=m.global_pool,
        final_norm=not isinstance(m.norm, nn.Identity), fc_norm=not isinstance(m.fc_norm, nn.Identity),
        pre_norm=not isinstance(m.norm_pre, nn.Identity), no_embed_class=m.no_embed_class,
        qkv_bias=b.attn.qkv.bias is not None, patch_bias=m.patch_embed.proj.bias is not None,
        layer_scale=isinstance(b.ls1, LayerScale))


def _read_timm_resnet(m, name, num_classes, image_size) -> ResNetConfig:
    import torch.nn as nn
    from timm.models.resnet import BasicBlock, Bottleneck

    blocks = [blk for layer in (m.layer1, m.layer2, m.layer3, m.layer4) for blk in layer]
    block = "basic" if type(blocks[0]) is BasicBlock else "bottleneck"
    plain = all(type(blk) in (BasicBlock, Bottleneck) for blk in blocks) and all(
        getattr(blk, "se", None) is None and isinstance(blk.bn1, nn.BatchNorm2d)
        and isinstance(getattr(blk, "aa", nn.Identity()), nn.Identity)
        and isinstance(blk.drop_block, nn.Identity) for blk in blocks)
    if not plain or not isinstance(m.maxpool, nn.MaxPool2d):
        raise _not_plain(name, "has attention, anti-aliasing or non-BatchNorm layers")
    if isinstance(m.conv1, nn.Sequential):
        w1, w2 = m.conv1[0].out_channels, m.conv1[3].out_channels
        stem, stem_width = ("deep", w1) if w1 == w2 else ("deep_tiered", w2)
    else:
        stem, stem_width = "plain", 64
    first = blocks[0]
    groups = first.conv2.groups if block == "bottleneck" else 1
    # timm: width = floor(planes * base_width / 64) * cardinality; stage 1 has planes = 64
    width_per_group = first.conv1.out_channels // groups if block == "bottleneck" else 64
    avg_down = any(blk.downsample is not None and isinstance(blk.downsample[0], nn.AvgPool2d)
                   for blk in blocks) or any(blk.downsample is not None and
                                             isinstance(blk.downsample[0], nn.Identity)
                                             for blk in blocks)
    return ResNetConfig(image_size=image_size, block=block,
                        layers=tuple(len(x) for x in (m.layer1, m.layer2, m.layer3, m.layer4)),
                        num_classes=num_classes, groups=groups, width_per_group=width_per_group,
                        stem=stem, stem_width=stem_width, avg_down=avg_down)
