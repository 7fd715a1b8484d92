"""The analytic compute model: parameters, FLOPs, training memory, fits-on-device, a
micro-batch plan and time, for the networks `models.model_config` describes.

Conventions (the ones the tests hold it to):
- params: exact counts of the timm / torchvision model, per component.
- FLOPs: 2 x multiply-accumulates of matmuls, convolutions and attention, as
  torch.utils.flop_counter.FlopCounterMode counts them; norms, activations and pooling
  count zero. A training step is forward + backward = 3 x forward, minus the gradient
  w.r.t. the image (the first layer's input never needs one).
- activations: the bytes autograd saves for backward in one training step (model + loss),
  every storage once, as PyTorch 2.x runs timm/torchvision modules.
- peak: what the caching allocator hands out at its high-water mark
  (torch.cuda.max_memory_allocated): weights + grads + optimizer state + the half-precision
  weight copies autocast keeps for backward + activations + a backward transient.
  The device's `reserve_bytes` (CUDA context) and a fragmentation margin come on top
  when deciding whether it fits.
"""

from __future__ import annotations


from vitpipe.costmodel.devices import Device, get_device
from vitpipe.errors import UserError
from vitpipe.params import divisors
from vitpipe.models import ResNetConfig, ViTConfig

PRECISIONS = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2}   # bytes of an activation element
OPTIMIZERS = {"sgd": 1, "adamw": 2}    # fp32 state tensors per parameter (momentum; m and v)
ATTENTION = ("sdpa", "eager")          # timm's fused F.scaled_dot_product_attention, or not
FRAGMENTATION = 0.05                   # caching-allocator slack on top of the peak, for `fits`


def check_choice(what: str, value, allowed) -> None:
    if value not in allowed:
        raise UserError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")


# ---------------------------------------------------------------------------------------
# Parameters


def param_counts(cfg) -> dict:
    """Exact parameter counts per component, and `total`."""
    return _vit_params(cfg) if isinstance(cfg, ViTConfig) else _resnet_params(cfg)


def _vit_params(c: ViTConfig) -> dict:
    d, hm = c.dim, c.mlp_hidden
    block = (2 * d                                  # norm1
             + 3 * d * d + (3 * d if c.qkv_bias else 0)  # qkv
             + d * d + d                            # proj
             + 2 * d                                # norm2
             + d * hm + hm + hm * d + d             # fc1, fc2
             + (2 * d if c.layer_scale else 0))     # ls1, ls2
    pos_tokens = c.num_patches + (0 if c.no_embed_class else c.prefix_tokens)
    p = {
        "patch_embed": c.in_chans * c.patch**2 * d + (d if c.patch_bias else 0),
        "class_token": c.prefix_tokens * d,
        "pos_embed": pos_tokens * d,
        "blocks": c.depth * block,
        "norms": 2 * d * (int(c.pre_norm) + int(c.final_norm) + int(c.fc_norm)),
        "head": (d + 1) * c.num_classes if c.num_classes else 0,
    }
    p["total"] = sum(p.values())
    return p


def _resnet_params(c: ResNetConfig) -> dict:
    p = {"stem": 0, "blocks": 0}
    for conv in resnet_convs(c):
        p[conv["part"]] += conv["k"] ** 2 * conv["cin"] // conv["groups"] * conv["cout"] + 2 * conv["cout"]
    p["head"] = (resnet_features(c) + 1) * c.num_classes if c.num_classes else 0
    p["total"] = sum(p.values())
    return p


def matmul_weight_params(cfg) -> int:
    """Weights of linear/conv layers: what autocast casts to half and keeps for backward."""
    if isinstance(cfg, ViTConfig):
        d, hm = cfg.dim, cfg.mlp_hidden
        return (cfg.in_chans * cfg.patch**2 * d + cfg.depth * (4 * d * d + 2 * d * hm)
                + d * cfg.num_classes)
    convs = sum(c["k"] ** 2 * c["cin"] // c["groups"] * c["cout"] for c in resnet_convs(cfg))
    return convs + resnet_features(cfg) * cfg.num_classes


# ---------------------------------------------------------------------------------------
# ResNet layers, walked once; params, FLOPs and activations all read this list


def resnet_features(c: ResNetConfig) -> int:
    return 512 * (4 if c.block == "bottleneck" else 1)


def resnet_convs(c: ResNetConfig) -> list[dict]:
    """Every convolution (each followed by a BatchNorm) in forward order, with its spatial
    size. `bn_saved`: the BN output is saved (by the ReLU after it); a shortcut's is not."""
    convs, h = [], c.image_size

    def conv(part, cin, cout, k, stride, groups=1, bn_saved=True):
        nonlocal h
        h_in, h = h, (h + 2 * (k // 2) - k) // stride + 1
        convs.append(dict(part=part, cin=cin, cout=cout, k=k, stride=stride, groups=groups,
                          h_in=h_in, h_out=h, bn_saved=bn_saved, pool_before=0))
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
    h = (h + 2 - 3) // 2 + 1                      # max pool 3x3 / 2
    expansion = 4 if c.block == "bottleneck" else 1
    for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), c.layers)):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            h_block, out = h, planes * expansion
            if c.block == "basic":
                conv("blocks", inplanes, planes, 3, stride)
                conv("blocks", planes, planes, 3, 1)
            else:
                width = int(planes * c.width_per_group / 64) * c.groups
                conv("blocks", inplanes, width, 1, 1)
                conv("blocks", width, width, 3, stride, groups=c.groups)
                conv("blocks", width, out, 1, 1)
            if stride != 1 or inplanes != out:    # projection shortcut
                h_after = h
                if c.avg_down and stride > 1:
                    h = (h_block + 1) // 2        # AvgPool2d(2, 2, ceil_mode=True)
                    conv("blocks", inplanes, out, 1, 1, bn_saved=False)
                    convs[-1]["pool_before"] = 1
                else:
                    h = h_block
                    conv("blocks", inplanes, out, 1, stride, bn_saved=False)
                h = h_after
            inplanes = out
    return convs


# ---------------------------------------------------------------------------------------
# FLOPs


def flops(cfg) -> dict:
    """FLOPs per image: forward, backward, train (= forward + backward), and the extra
    forward that activation checkpointing recomputes (`recompute`)."""
    if isinstance(cfg, ViTConfig):
        parts = vit_flops_parts(cfg)
        first = parts["patch_embed"]
        forward = sum(parts.values())
        recompute = forward - first - parts["head"]     # the blocks
    else:
        convs = resnet_convs(cfg)
        conv_flops = [2 * x["k"] ** 2 * x["cin"] // x["groups"] * x["cout"] * x["h_out"] ** 2 for x in convs]
        first = conv_flops[0]
        forward = sum(conv_flops) + 2 * resnet_features(cfg) * cfg.num_classes
        recompute = forward - first
    backward = 2 * forward - first        # no gradient for the image
    return {"forward": forward, "backward": backward, "train": forward + backward,
            "recompute": recompute}


def vit_flops_parts(c: ViTConfig) -> dict:
    """Forward FLOPs per image of a ViT by part; they sum to `flops(c)["forward"]`.
    `attention` is the token mixing, q·kᵀ and softmax·v: the only term that grows with
    tokens²; `projections` are the qkv and output projections of the blocks."""
    t, d, hm = c.tokens, c.dim, c.mlp_hidden
    return {
        "patch_embed": 2 * c.num_patches * d * c.in_chans * c.patch**2,   # a p x p conv, stride p
        "projections": c.depth * 2 * t * (3 * d * d + d * d),
        "attention": c.depth * 4 * t * t * d,
        "mlp": c.depth * 2 * t * 2 * d * hm,
        "head": 2 * d * c.num_classes,
    }


# ---------------------------------------------------------------------------------------
# Activations


def saved_tensors(cfg, precision: str = "fp32", attention: str = "sdpa",
                  checkpointing: bool = False, device_type: str = "cuda") -> dict:
    """Bytes per image that autograd keeps for backward, by storage (each counted once).
    Keys name the storages; the values sum to `activation_bytes`."""
    check_choice("precision", precision, PRECISIONS)
    check_choice("attention", attention, ATTENTION)
    if isinstance(cfg, ViTConfig):
        return _vit_saved(cfg, precision, attention, checkpointing, device_type)
    return _resnet_saved(cfg, precision, checkpointing)


def _vit_saved(c: ViTConfig, precision, attention, checkpointing, device_type) -> dict:
    a = PRECISIONS[precision]        # matmul inputs/outputs: half under autocast
    autocast = a == 2
    t, d, hm, h = c.tokens, c.dim, c.mlp_hidden, c.heads
    r = 4                            # residual stream: fp32 (LayerNorm runs in fp32 under autocast)
    stats = 2 * 4 * t                # LayerNorm mean and rstd
    s = {"image": a * c.in_chans * c.image_size**2}   # the input, or its half copy
    if c.pre_norm:
        s["norm_pre"] = r * t * d + stats
    if checkpointing:
        block = {"block_input": r * t * d}            # recomputed in backward, one block at a time
    else:
        block = {"block_input": r * t * d + stats, "norm1_out": a * t * d}
        if attention == "sdpa":
            # fused attention keeps q, k, v (views of the qkv output), its output (which the
            # projection reads as a view) and a log-sum-exp per row
            block.update(qkv=3 * a * t * d, attn_out=a * t * d, attn_lse=4 * h * t)
        else:
            # eager: q*scale, k^T and v are copied into batched matmuls; the softmax
            # probabilities are kept (on CUDA in fp32, plus the half copy for attn @ v)
            probs = 4 if not autocast else (6 if device_type == "cuda" else 2)
            block.update(q=a * t * d, k=a * t * d, v=a * t * d, attn_probs=probs * h * t * t,
                         attn_out=a * t * d)
        block.update(residual=r * t * d + stats, norm2_out=a * t * d,
                     fc1_out=a * t * hm, gelu_out=a * t * hm)
        if c.layer_scale:
            block["layer_scale_inputs"] = 2 * a * t * d
    for k, v in block.items():
        s[f"blocks.{k}"] = c.depth * v
    # after the blocks: final norm over tokens, pooling, fc_norm, head
    tokens_storage = None
    if c.final_norm:
        s["final_norm_in"] = r * t * d + stats
        tokens_storage = "final_norm_out"
    if c.pool == "token":
        pooled_storage, pooled_bytes = tokens_storage or "blocks_out", r * t * d   # a view of it
    else:
        pooled_storage, pooled_bytes = "pooled", r * d
    if c.fc_norm:
        s[pooled_storage] = pooled_bytes
        s["fc_norm_stats"] = 8
        head_in, head_bytes = "fc_norm_out", r * d
    else:
        head_in, head_bytes = pooled_storage, pooled_bytes
    if autocast:
        head_in, head_bytes = "head_in", a * d   # the half copy the linear layer keeps
    s[head_in] = head_bytes
    s["loss"] = 4 * c.num_classes + 8            # log-softmax output (fp32) and the target
    return s


def _resnet_saved(c: ResNetConfig, precision, checkpointing) -> dict:
    a = PRECISIONS[precision]
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
    s["maxpool"] = (a + 8) * stem["cout"] * h_pool**2      # its output and int64 indices
    s["head_in"] = a * resnet_features(c)
    s["loss"] = 4 * c.num_classes + 8
    if checkpointing:
        raise UserError("activation checkpointing is modelled for ViTs only")
    return s


def activation_bytes(cfg, precision="fp32", attention="sdpa", checkpointing=False,
                     device_type="cuda") -> int:
    """Saved bytes per image (the sum of `saved_tensors`)."""
    return sum(saved_tensors(cfg, precision, attention, checkpointing, device_type).values())


def step_saved_bytes(cfg) -> int:
    """Saved bytes per step that do not grow with the batch: BatchNorm's batch mean and
    inverse std (fp32, per channel) and the loss scalar."""
    if isinstance(cfg, ViTConfig):
        return 4
    return 4 + sum(8 * x["cout"] for x in resnet_convs(cfg))


def step_saved_total(cfg, batch: int, precision="fp32", attention="sdpa", checkpointing=False,
                     device_type="cuda") -> int:
    """Every byte autograd keeps for one training step's backward: the activations of `batch`
    images, what does not grow with the batch, and autocast's half-precision weight copies."""
    casts = 2 * matmul_weight_params(cfg) if PRECISIONS[precision] == 2 else 0
    return (batch * activation_bytes(cfg, precision, attention, checkpointing, device_type=device_type)
            + step_saved_bytes(cfg) + casts)


# what autograd saves around the token mixing: its inputs q, k, v (or the qkv output they
# view), its t x t probabilities (eager) or per-row log-sum-exp (sdpa), and its output
ATTENTION_STORAGES = tuple(f"blocks.{k}" for k in ("qkv", "q", "k", "v", "attn_probs", "attn_lse", "attn_out"))


def attention_split(cfg: ViTConfig, precision: str = "fp32", attention: str = "sdpa",
                    device_type: str = "cuda") -> dict:
    """Per image, attention's token mixing against the rest of a ViT: forward FLOPs
    (`vit_flops_parts`) and saved activation bytes (`saved_tensors`), and attention's share
    of each. The parts sum to `flops(cfg)["forward"]` and `activation_bytes(cfg, ...)`."""
    f = vit_flops_parts(cfg)
    saved = saved_tensors(cfg, precision, attention, device_type=device_type)
    attn_bytes = sum(v for k, v in saved.items() if k in ATTENTION_STORAGES)
    out = {"attention_flops": f["attention"], "rest_flops": sum(f.values()) - f["attention"],
           "attention_bytes": attn_bytes, "rest_bytes": sum(saved.values()) - attn_bytes}
    out["flops_share"] = out["attention_flops"] / (out["attention_flops"] + out["rest_flops"])
    out["bytes_share"] = out["attention_bytes"] / (out["attention_bytes"] + out["rest_bytes"])
    return out


def measure_saved_bytes(model, x, precision="fp32") -> int:
    """What `step_saved_total` predicts, measured: the distinct storages autograd saves in
    forward + loss (each storage once), less the model's own parameters and buffers."""
    import torch
    import torch.nn.functional as F

    state = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in state:
            seen[s.data_ptr()] = s.nbytes()
        return t

    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    y = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(x.device.type, dtype=half or torch.bfloat16, enabled=half is not None):
            F.cross_entropy(model(x), y)
    return sum(seen.values())


def buffer_bytes(cfg) -> int:
    """Model state that is not parameters: BatchNorm running mean/var and batch counter."""
    if isinstance(cfg, ViTConfig):
        return 0
    return sum(8 * x["cout"] + 8 for x in resnet_convs(cfg))


def transient_bytes(cfg, precision="fp32", attention="sdpa", checkpointing=False) -> int:
    """Per image, what backward allocates on top of the saved activations before it frees
    them: gradient buffers of the largest intermediate, the residual gradient and, with
    checkpointing, the one block being recomputed."""
    a = PRECISIONS[precision]
    if isinstance(cfg, ViTConfig):
        t, d = cfg.tokens, cfg.dim
        biggest = max(a * t * cfg.mlp_hidden,
                      (2 * a * cfg.heads * t * t) if attention == "eager" else 0)
        extra = 4 * t * d + biggest
        if checkpointing:
            one = ViTConfig(**{**cfg.__dict__, "depth": 1})
            full = _vit_saved(one, precision, attention, False, "cuda")
            extra += sum(v for k, v in full.items() if k.startswith("blocks."))
        return extra
    convs = resnet_convs(cfg)
    return 2 * a * max(x["cout"] * x["h_out"] ** 2 for x in convs[-3:])


# ---------------------------------------------------------------------------------------
# Memory and the plan


def memory(cfg, batch: int, precision="fp32", optimizer="adamw", attention="sdpa",
           checkpointing=False) -> dict:
    """Training memory in bytes at micro-batch `batch`: the parts and the allocator peak."""
    check_choice("optimizer", optimizer, OPTIMIZERS)
    check_choice("precision", precision, PRECISIONS)
    n = param_counts(cfg)["total"]
    m = {
        "weights": 4 * n + buffer_bytes(cfg),   # fp32 master weights (autocast never changes them)
        "grads": 4 * n,                      # kept between micro-batches when accumulating
        "optimizer": 4 * n * OPTIMIZERS[optimizer],
        "autocast_weights": 2 * matmul_weight_params(cfg) if PRECISIONS[precision] == 2 else 0,
        "activations": batch * activation_bytes(cfg, precision, attention, checkpointing)
        + step_saved_bytes(cfg),
        "transient": batch * transient_bytes(cfg, precision, attention, checkpointing),
    }
    backward_peak = sum(m.values())
    # the foreach optimizer step allocates about one parameter-sized temporary
    step_peak = m["weights"] + m["grads"] + m["optimizer"] + 4 * n
    m["peak"] = max(backward_peak, step_peak)
    return m


def required_bytes(peak: int, device: Device) -> int:
    """What must be free on the device for that peak: + fragmentation + context."""
    return int(peak * (1 + FRAGMENTATION)) + device.reserve_bytes


def plan(cfg, batch: int, device: Device, precision="fp32", optimizer="adamw",
         attention="sdpa", checkpointing=False) -> dict:
    """Largest micro-batch that divides `batch` and fits, and the accumulation steps."""
    def need(mb):
        return required_bytes(memory(cfg, mb, precision, optimizer, attention, checkpointing)["peak"], device)

    fits_full = need(batch) <= device.memory_bytes
    # memory grows with the micro-batch: binary search the divisors (found in O(sqrt(batch)),
    # so a batch of 10^12 plans in a fraction of a second)
    divs, micro = divisors(batch), 0
    lo, hi = 0, len(divs) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        if need(divs[mid]) <= device.memory_bytes:
            micro, lo = divs[mid], mid + 1
        else:
            hi = mid - 1
    return {"fits": fits_full, "micro_batch": micro,
            "accum_steps": batch // micro if micro else 0,
            "micro_required_bytes": need(micro) if micro else None,
            "headroom_bytes": device.memory_bytes - need(micro) if micro else device.memory_bytes - need(1)}


# ---------------------------------------------------------------------------------------
# Time


def throughput(train_flops_per_image: float, device: Device, precision: str, mfu: float) -> float:
    """Images per second = achieved FLOP/s / FLOPs per image."""
    return mfu * device.peak(precision) / train_flops_per_image


# ---------------------------------------------------------------------------------------
# Everything for one model at one setting


def estimate(cfg, batch: int, device: str | Device = "t4", precision: str = "fp32",
             optimizer: str = "adamw", attention: str = "sdpa", checkpointing: bool = False,
             steps: int | None = None, mfu: float | None = None) -> dict:
    """One flat dict: params (per component), FLOPs, memory, fits/plan, img/s and ETA.
    `mfu`: a calibrated value; None uses the device profile's assumption."""
    check_choice("precision", precision, PRECISIONS)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    check_choice("attention", attention, ATTENTION)
    if isinstance(device, str):
        device = get_device(device)
    if checkpointing and not isinstance(cfg, ViTConfig):
        raise UserError("activation checkpointing is modelled for ViTs only")
    if batch < 1:
        raise UserError(f"batch must be a positive integer, got {batch}")
    p = param_counts(cfg)
    f = flops(cfg)
    mem = memory(cfg, batch, precision, optimizer, attention, checkpointing)
    pl = plan(cfg, batch, device, precision, optimizer, attention, checkpointing)
    mfu_used = device.mfu if mfu is None else mfu
    executed = f["train"] + (f["recompute"] if checkpointing else 0)
    img_s = throughput(executed, device, precision, mfu_used)
    out = {"params": p["total"], **{f"params_{k}": v for k, v in p.items() if k != "total"},
           "forward_flops": f["forward"], "train_flops": f["train"], "executed_flops": executed,
           "activation_bytes": activation_bytes(cfg, precision, attention, checkpointing),
           "batch": batch, "weights_bytes": mem["weights"], "grads_bytes": mem["grads"],
           "optimizer_bytes": mem["optimizer"], "autocast_weights_bytes": mem["autocast_weights"],
           "activations_bytes": mem["activations"], "transient_bytes": mem["transient"],
           "peak_bytes": mem["peak"], "required_bytes": required_bytes(mem["peak"], device),
           "capacity_bytes": device.memory_bytes, **pl,
           "img_per_s": img_s, "mfu": mfu_used, "mfu_source": "device default" if mfu is None else "given",
           "peak_flops": device.peak(precision), "device": device.name, "device_label": device.label,
           "precision": precision, "optimizer": optimizer, "attention": attention,
           "checkpointing": checkpointing}
    if steps is not None:
        out["steps"] = steps
        out["eta_s"] = steps * batch / img_s
    return out
