"""The ViT family: timm's VisionTransformer, its builder and its cost model.

Specs it claims:
  vit                      explicit sizes: patch, dim, depth, heads, mlp_ratio (pool: token|avg)
  vit_{ti,s,m,b,l,h}<p>    the ViT paper's sizes with patch p (vit_b16); extra keys override
  <a timm name>            any timm model whose class is a plain VisionTransformer
                           (vit_small_patch32_384, deit_tiny_patch16_224, ...)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from vitpipe.errors import ParamError
from vitpipe.models.registry import Family, element_bytes, not_plain, register_family, short_list, timm_module
from vitpipe.models.step_ops import RESIDUAL, cast_bytes, gemm, mem

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
VIT_KEYS = ("patch", "dim", "depth", "heads", "mlp_ratio")
TIMM_MODULE = "timm.models.vision_transformer"


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
    pool: str = "token"  # token | avg
    final_norm: bool = True  # LayerNorm over all tokens after the blocks
    fc_norm: bool = False  # LayerNorm after pooling instead
    pre_norm: bool = False  # LayerNorm before the blocks (CLIP style)
    no_embed_class: bool = False  # position embedding skips the prefix tokens
    qkv_bias: bool = True
    patch_bias: bool = True  # CLIP's patch embedding has none
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


def patch_message(image_size, image_size_key, patch) -> str:
    divisors = [p for p in range(1, image_size + 1) if image_size % p == 0]
    return (
        f"{image_size_key}={image_size} must be divisible by the patch ({patch}); "
        f"allowed patches: {short_list(divisors)}"
    )


# ---------------------------------------------------------------------------------------
# The cost model's pieces that other code reads (the scaling section, the planner)


def vit_flops_parts(c: ViTConfig) -> dict:
    """Forward FLOPs per image of a ViT by part; they sum to `compute.flops(c)["forward"]`.
    `attention` is the token mixing, q·kᵀ and softmax·v: the only term that grows with
    tokens²; `projections` are the qkv and output projections of the blocks."""
    t, d, hm = c.tokens, c.dim, c.mlp_hidden
    return {
        "patch_embed": 2 * c.num_patches * d * c.in_chans * c.patch**2,  # a p x p conv, stride p
        "projections": c.depth * 2 * t * (3 * d * d + d * d),
        "attention": c.depth * 4 * t * t * d,
        "mlp": c.depth * 2 * t * 2 * d * hm,
        "head": 2 * d * c.num_classes,
    }


# what autograd saves around the token mixing: its inputs q, k, v (or the qkv output they
# view), its t x t probabilities (eager) or per-row log-sum-exp (sdpa), and its output
ATTENTION_STORAGES = tuple(f"blocks.{k}" for k in ("qkv", "q", "k", "v", "attn_probs", "attn_lse", "attn_out"))


def _block_saved(c: ViTConfig, a: int, attention: str, device_type: str) -> dict:
    """What one block keeps for backward when it is not checkpointed."""
    t, d, hm, h = c.tokens, c.dim, c.mlp_hidden, c.heads
    r, stats = 4, 2 * 4 * t  # residual stream fp32; LayerNorm mean and rstd
    block = {"block_input": r * t * d + stats, "norm1_out": a * t * d}
    if attention == "sdpa":
        # fused attention keeps q, k, v (views of the qkv output), its output (which the
        # projection reads as a view) and a log-sum-exp per row
        block.update(qkv=3 * a * t * d, attn_out=a * t * d, attn_lse=4 * h * t)
    else:
        # eager: q*scale, k^T and v are copied into batched matmuls; the softmax
        # probabilities are kept (on CUDA in fp32, plus the half copy for attn @ v)
        probs = 4 if a == 4 else (6 if device_type == "cuda" else 2)
        block.update(q=a * t * d, k=a * t * d, v=a * t * d, attn_probs=probs * h * t * t, attn_out=a * t * d)
    block.update(residual=r * t * d + stats, norm2_out=a * t * d, fc1_out=a * t * hm, gelu_out=a * t * hm)
    if c.layer_scale:
        block["layer_scale_inputs"] = 2 * a * t * d
    return block


def _vit_saved(c: ViTConfig, precision, attention, checkpointing, device_type) -> dict:
    a = element_bytes(precision)  # matmul inputs/outputs: half under autocast
    t, d = c.tokens, c.dim
    r = 4  # residual stream: fp32 (LayerNorm runs in fp32 under autocast)
    stats = 2 * 4 * t  # LayerNorm mean and rstd
    s = {"image": a * c.in_chans * c.image_size**2}  # the input, or its half copy
    if c.pre_norm:
        s["norm_pre"] = r * t * d + stats
    if checkpointing:
        block = {"block_input": r * t * d}  # recomputed in backward, one block at a time
    else:
        block = _block_saved(c, a, attention, device_type)
    for k, v in block.items():
        s[f"blocks.{k}"] = c.depth * v
    # after the blocks: final norm over tokens, pooling, fc_norm, head
    tokens_storage = None
    if c.final_norm:
        s["final_norm_in"] = r * t * d + stats
        tokens_storage = "final_norm_out"
    if c.pool == "token":
        pooled_storage, pooled_bytes = tokens_storage or "blocks_out", r * t * d  # a view of it
    else:
        pooled_storage, pooled_bytes = "pooled", r * d
    if c.fc_norm:
        s[pooled_storage] = pooled_bytes
        s["fc_norm_stats"] = 8
        head_in, head_bytes = "fc_norm_out", r * d
    else:
        head_in, head_bytes = pooled_storage, pooled_bytes
    if a == 2:
        head_in, head_bytes = "head_in", a * d  # the half copy the linear layer keeps
    s[head_in] = head_bytes
    s["loss"] = 4 * c.num_classes + 8  # log-softmax output (fp32) and the target
    return s


def attention_split(
    cfg: ViTConfig, precision: str = "fp32", attention: str = "sdpa", device_type: str = "cuda"
) -> dict:
    """Per image, attention's token mixing against the rest of a ViT: forward FLOPs
    (`vit_flops_parts`) and saved activation bytes, and attention's share of each. The
    parts sum to `compute.flops(cfg)["forward"]` and `compute.activation_bytes(cfg, ...)`."""
    f = vit_flops_parts(cfg)
    saved = _vit_saved(cfg, precision, attention, False, device_type)
    attn_bytes = sum(v for k, v in saved.items() if k in ATTENTION_STORAGES)
    out = {
        "attention_flops": f["attention"],
        "rest_flops": sum(f.values()) - f["attention"],
        "attention_bytes": attn_bytes,
        "rest_bytes": sum(saved.values()) - attn_bytes,
    }
    out["flops_share"] = out["attention_flops"] / (out["attention_flops"] + out["rest_flops"])
    out["bytes_share"] = out["attention_bytes"] / (out["attention_bytes"] + out["rest_bytes"])
    return out


# ---------------------------------------------------------------------------------------
# The family


@register_family
class ViT(Family):
    name = "vit"
    label = "ViT"
    config_type = ViTConfig
    allowed = "vit, vit_b16-style (vit_{ti,s,m,b,l,h}<patch>)"
    spec_schema = {
        "patch": {"kind": "int", "help": "patch size in pixels (vit)", "lo": 1, "hi": 4096},
        "dim": {"kind": "int", "help": "embedding width (vit)", "lo": 1, "hi": 65536},
        "depth": {"kind": "int", "help": "transformer blocks (vit)", "lo": 1, "hi": 1024},
        "heads": {"kind": "int", "help": "attention heads; must divide dim (vit)", "lo": 1, "hi": 4096},
        "mlp_ratio": {"kind": "float", "help": "MLP hidden width / dim (vit)", "lo": 0, "hi": 64, "lo_open": True},
        "pool": {"kind": "choice", "help": "class token or average pooling (vit)", "choices": ("token", "avg")},
    }
    spec_keys = frozenset(spec_schema)
    attention = True
    checkpointing = True
    channels_last = False

    def matches(self, arch):
        return arch == "vit" or bool(SHORT_VIT.match(arch)) or timm_module(arch) == TIMM_MODULE

    def claims_class(self, cls):
        from timm.models.vision_transformer import VisionTransformer

        return issubclass(cls, VisionTransformer)

    def owns(self, model):
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(model, VisionTransformer)

    def shard_units(self, model):
        return list(model.blocks)

    def shard_unit_params(self, c):
        return c.depth * [self.param_counts(c)["blocks"] // c.depth]

    def _timm(self, arch):
        return arch != "vit" and not SHORT_VIT.match(arch)

    def validate(self, spec, image_size, key_prefix, image_size_key):
        arch = spec["arch"]
        if self._timm(arch):
            m = re.search(r"patch(\d+)", arch)
            patch = int(m.group(1)) if m else None
            if patch and image_size % patch:
                raise ParamError(f"{key_prefix}.arch", arch, patch_message(image_size, image_size_key, patch))
            return
        sizes = vit_sizes(spec)
        missing = [k for k in VIT_KEYS if k not in sizes]
        if missing:
            raise ParamError(f"{key_prefix}.{missing[0]}", None, f"arch vit needs {', '.join(VIT_KEYS)}")
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
            raise ParamError(
                f"{key_prefix}.heads", sizes["heads"], f"a divisor of dim={sizes['dim']}: {short_list(divisors)}"
            )
        if image_size % sizes["patch"]:
            raise ParamError(
                f"{key_prefix}.patch", sizes["patch"], patch_message(image_size, image_size_key, sizes["patch"])
            )

    def build(self, spec, num_classes, image_size):
        if self._timm(spec["arch"]):
            import timm

            return timm.create_model(spec["arch"], pretrained=False, num_classes=num_classes, img_size=image_size)
        from timm.models.vision_transformer import VisionTransformer

        s = vit_sizes(spec)
        avg = s["pool"] == "avg"
        return VisionTransformer(
            img_size=image_size,
            patch_size=s["patch"],
            embed_dim=s["dim"],
            depth=s["depth"],
            num_heads=s["heads"],
            mlp_ratio=s["mlp_ratio"],
            num_classes=num_classes,
            # avg pooling drops the then-unused class token; timm adds an fc_norm for it
            global_pool="avg" if avg else "token",
            class_token=not avg,
        )

    def config(self, spec, num_classes, image_size):
        if self._timm(spec["arch"]):
            import torch

            with torch.device("meta"):
                model = self.build(spec, num_classes, image_size)
            return _read_timm_vit(model, spec["arch"], num_classes, image_size)
        s = vit_sizes(spec)
        avg = s["pool"] == "avg"
        return ViTConfig(
            image_size=image_size,
            patch=s["patch"],
            dim=s["dim"],
            depth=s["depth"],
            heads=s["heads"],
            mlp_hidden=int(s["dim"] * s["mlp_ratio"]),
            num_classes=num_classes,
            class_token=not avg,
            pool=s["pool"],
            final_norm=not avg,
            fc_norm=avg,
        )

    def describe(self, spec, image_size):
        arch = spec["arch"]
        if self._timm(arch):
            return f"{arch} @{image_size}px"
        if SHORT_VIT.match(arch) and not any(k in spec for k in VIT_KEYS):
            m = SHORT_VIT.match(arch)
            return f"ViT-{VIT_SIZE_NAMES[m.group(1)]}/{m.group(2)} @{image_size}px"
        s = vit_sizes(spec)
        pool = " gap" if s["pool"] == "avg" else ""
        return f"ViT dim{s['dim']} depth{s['depth']} heads{s['heads']}{pool} /{s['patch']} @{image_size}px"

    # --- cost -----------------------------------------------------------------------------
    def param_counts(self, c):
        d, hm = c.dim, c.mlp_hidden
        block = (
            2 * d  # norm1
            + 3 * d * d
            + (3 * d if c.qkv_bias else 0)  # qkv
            + d * d
            + d  # proj
            + 2 * d  # norm2
            + d * hm
            + hm
            + hm * d
            + d  # fc1, fc2
            + (2 * d if c.layer_scale else 0)
        )  # ls1, ls2
        pos_tokens = c.num_patches + (0 if c.no_embed_class else c.prefix_tokens)
        return {
            "patch_embed": c.in_chans * c.patch**2 * d + (d if c.patch_bias else 0),
            "class_token": c.prefix_tokens * d,
            "pos_embed": pos_tokens * d,
            "blocks": c.depth * block,
            "norms": 2 * d * (int(c.pre_norm) + int(c.final_norm) + int(c.fc_norm)),
            "head": (d + 1) * c.num_classes if c.num_classes else 0,
        }

    def flops(self, c):
        parts = vit_flops_parts(c)
        forward = sum(parts.values())
        return {
            "forward": forward,
            "first": parts["patch_embed"],
            "recompute": forward - parts["patch_embed"] - parts["head"],
        }  # the blocks

    def saved(self, c, precision, attention, checkpointing, device_type):
        return _vit_saved(c, precision, attention, checkpointing, device_type)

    def weight_layers(self, c):
        d, hm = c.dim, c.mlp_hidden
        block = [dict(part="blocks", kind="linear", k=1, cin=d, cout=n) for n in (3 * d, d)]
        block += [
            dict(part="blocks", kind="linear", k=1, cin=d, cout=hm),
            dict(part="blocks", kind="linear", k=1, cin=hm, cout=d),
        ]
        return (
            [dict(part="embed", kind="patch", k=c.patch, cin=c.in_chans, cout=d)]
            + c.depth * block
            + [dict(part="head", kind="linear", k=1, cin=d, cout=c.num_classes)]
        )

    def _block_weights(self, c):
        return 4 * c.dim * c.dim + 2 * c.dim * c.mlp_hidden  # qkv, proj, fc1, fc2

    def autocast_weight_params(self, c, checkpointing):
        outside = c.in_chans * c.patch**2 * c.dim + c.dim * c.num_classes  # patch embed, head
        return outside + (0 if checkpointing else c.depth * self._block_weights(c))

    def recompute_weight_params(self, c):
        return self._block_weights(c)

    def transient_bytes(self, c, precision, attention, checkpointing):
        a = element_bytes(precision)
        t, d = c.tokens, c.dim
        biggest = max(a * t * c.mlp_hidden, (2 * a * c.heads * t * t) if attention == "eager" else 0)
        extra = 4 * t * d + biggest
        if checkpointing:  # the one block being recomputed holds what it saves
            extra += sum(_block_saved(c, a, attention, "cuda").values())
        return extra

    def step_ops(self, c, a: int) -> dict:
        """What one training step executes per image (the time model's op list; vocabulary in step_ops)."""
        t, d, hm, L, r, cast = c.tokens, c.dim, c.mlp_hidden, c.depth, RESIDUAL, cast_bytes(a)
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


def _read_timm_vit(m, name, num_classes, image_size) -> ViTConfig:
    import torch.nn as nn
    from timm.layers import LayerScale, Mlp, PatchEmbed
    from timm.models.vision_transformer import Block, VisionTransformer

    b = m.blocks[0]
    checks = {
        "the plain VisionTransformer class": type(m) is VisionTransformer,
        "attention pooling": m.global_pool in ("token", "avg"),
        "standard blocks": all(type(blk) is Block for blk in m.blocks),
        "GELU MLP": type(b.mlp) is Mlp and isinstance(b.mlp.act, nn.GELU) and isinstance(b.mlp.norm, nn.Identity),
        "no qk-norm": isinstance(b.attn.q_norm, nn.Identity) and isinstance(b.attn.norm, nn.Identity),
        "LayerNorm": isinstance(b.norm1, nn.LayerNorm),
        "patch embedding": type(m.patch_embed) is PatchEmbed and isinstance(m.patch_embed.norm, nn.Identity),
        "learned position embedding": m.pos_embed is not None,
        "biased projections": b.attn.proj.bias is not None,
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise not_plain(name, "ViT", "needs " + ", ".join(bad))
    return ViTConfig(
        image_size=image_size,
        patch=m.patch_embed.patch_size[0],
        dim=m.embed_dim,
        depth=len(m.blocks),
        heads=b.attn.num_heads,
        mlp_hidden=b.mlp.fc1.out_features,
        num_classes=num_classes,
        in_chans=m.patch_embed.proj.in_channels,
        class_token=m.cls_token is not None,
        reg_tokens=m.num_reg_tokens,
        pool=m.global_pool,
        final_norm=not isinstance(m.norm, nn.Identity),
        fc_norm=not isinstance(m.fc_norm, nn.Identity),
        pre_norm=not isinstance(m.norm_pre, nn.Identity),
        no_embed_class=m.no_embed_class,
        qkv_bias=b.attn.qkv.bias is not None,
        patch_bias=m.patch_embed.proj.bias is not None,
        layer_scale=isinstance(b.ls1, LayerScale),
    )
