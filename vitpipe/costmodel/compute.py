"""The analytic compute model: parameters, FLOPs, training memory, fits-on-device, a
micro-batch plan and time, for the networks `models.model_config` describes.

What depends on the network's family (parameter counts, FLOPs, the bytes autograd saves,
autocast's weight copies, buffers, the backward transient) lives in the family's file
(`vitpipe/models/vit.py`, `resnet.py`, `convnext.py`); this module dispatches through the
registry (`family_of_config`) and keeps what every family shares: memory, plan, time.

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
  weight copies autocast keeps for backward (none inside checkpointed blocks: their
  copies are made again in the recompute) + activations + a backward transient.
  The device's `reserve_bytes` (CUDA context) and a fragmentation margin come on top
  when deciding whether it fits.
"""

from __future__ import annotations

from vitpipe import precisions
from vitpipe.costmodel import steptime
from vitpipe.costmodel.devices import Device, get_device
from vitpipe.errors import UserError
from vitpipe.models.registry import family_of_config

# ViT-only readings the scaling section and the planner use (they live with the family)
from vitpipe.models.vit import ATTENTION_STORAGES, vit_flops_parts  # noqa: F401
from vitpipe.models.vit import attention_split as _attention_split
from vitpipe.params import divisors

# bytes of an activation element: 4, or 2 under autocast (the families count with the same rule)
PRECISIONS = {p.name: p.bytes for p in precisions.TABLE}
OPTIMIZERS = {"sgd": 1, "adamw": 2}  # fp32 state tensors per parameter (momentum; m and v)
ATTENTION = ("sdpa", "eager")  # timm's fused F.scaled_dot_product_attention, or not
FRAGMENTATION = 0.05  # caching-allocator slack on top of the peak, for `fits`
LOSS_SCALAR = 4  # the loss, saved once per step


def check_choice(what: str, value, allowed) -> None:
    if value not in allowed:
        raise UserError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")


def _checked_family(cfg, checkpointing: bool):
    family = family_of_config(cfg)
    if checkpointing and not family.checkpointing:
        raise family.refuse_checkpointing()
    return family


# ---------------------------------------------------------------------------------------
# Parameters and FLOPs: the family's


def param_counts(cfg) -> dict:
    """Exact parameter counts per component, and `total`."""
    p = family_of_config(cfg).param_counts(cfg)
    p["total"] = sum(p.values())
    return p


def matmul_weight_params(cfg, checkpointing: bool = False) -> int:
    """Weights of linear/conv layers whose half copy autocast keeps for backward. Inside
    checkpointed blocks the copies are made again in the recompute, not kept."""
    return _checked_family(cfg, checkpointing).autocast_weight_params(cfg, checkpointing)


def flops(cfg) -> dict:
    """FLOPs per image: forward, backward, train (= forward + backward), and the extra
    forward that activation checkpointing recomputes (`recompute`)."""
    f = family_of_config(cfg).flops(cfg)
    backward = 2 * f["forward"] - f["first"]  # no gradient for the image
    return {
        "forward": f["forward"],
        "backward": backward,
        "train": f["forward"] + backward,
        "recompute": f["recompute"],
    }


# ---------------------------------------------------------------------------------------
# Activations


def saved_tensors(
    cfg, precision: str = "fp32", attention: str = "sdpa", checkpointing: bool = False, device_type: str = "cuda"
) -> dict:
    """Bytes per image that autograd keeps for backward, by storage (each counted once).
    Keys name the storages; the values sum to `activation_bytes`."""
    check_choice("precision", precision, PRECISIONS)
    check_choice("attention", attention, ATTENTION)
    return _checked_family(cfg, checkpointing).saved(cfg, precision, attention, checkpointing, device_type)


def activation_bytes(cfg, precision="fp32", attention="sdpa", checkpointing=False, device_type="cuda") -> int:
    """Saved bytes per image (the sum of `saved_tensors`)."""
    return sum(saved_tensors(cfg, precision, attention, checkpointing, device_type).values())


def step_saved_bytes(cfg) -> int:
    """Saved bytes per step that do not grow with the batch: the loss scalar and, for
    BatchNorm networks, the batch mean and inverse std (fp32, per channel)."""
    return LOSS_SCALAR + family_of_config(cfg).step_saved_bytes(cfg)


def autocast_weight_bytes(cfg, precision="fp32", checkpointing=False) -> int:
    """The half-precision weight copies autocast keeps for backward (0 in fp32/tf32)."""
    return 2 * matmul_weight_params(cfg, checkpointing) if PRECISIONS[precision] == 2 else 0


def step_saved_total(
    cfg, batch: int, precision="fp32", attention="sdpa", checkpointing=False, device_type="cuda"
) -> int:
    """Every byte autograd keeps for one training step's backward: the activations of `batch`
    images, what does not grow with the batch, and autocast's half-precision weight copies."""
    return (
        batch * activation_bytes(cfg, precision, attention, checkpointing, device_type=device_type)
        + step_saved_bytes(cfg)
        + autocast_weight_bytes(cfg, precision, checkpointing)
    )


def attention_split(cfg, precision: str = "fp32", attention: str = "sdpa", device_type: str = "cuda") -> dict:
    """Per image, a ViT's attention (token mixing) against the rest: forward FLOPs and saved
    activation bytes, and attention's share of each (`models.vit.attention_split`)."""
    check_choice("precision", precision, PRECISIONS)
    check_choice("attention", attention, ATTENTION)
    return _attention_split(cfg, precision, attention, device_type)


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

    half = precisions.get(precision).torch_dtype()
    y = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(x.device.type, dtype=half or torch.bfloat16, enabled=half is not None):
            F.cross_entropy(model(x), y)
    return sum(seen.values())


def buffer_bytes(cfg) -> int:
    """Model state that is not parameters (BatchNorm running mean/var and batch counter)."""
    return family_of_config(cfg).buffer_bytes(cfg)


def transient_bytes(cfg, precision="fp32", attention="sdpa", checkpointing=False) -> int:
    """Per image, what backward allocates on top of the saved activations before it frees
    them: gradient buffers of the largest intermediate, the residual gradient and, with
    checkpointing, the one block being recomputed."""
    return _checked_family(cfg, checkpointing).transient_bytes(cfg, precision, attention, checkpointing)


# ---------------------------------------------------------------------------------------
# Memory and the plan


def memory(cfg, batch: int, precision="fp32", optimizer="adamw", attention="sdpa", checkpointing=False) -> dict:
    """Training memory in bytes at micro-batch `batch`: the parts and the allocator peak."""
    check_choice("optimizer", optimizer, OPTIMIZERS)
    check_choice("precision", precision, PRECISIONS)
    family = _checked_family(cfg, checkpointing)
    n = param_counts(cfg)["total"]
    half = PRECISIONS[precision] == 2
    m = {
        "weights": 4 * n + buffer_bytes(cfg),  # fp32 master weights (autocast never changes them)
        "grads": 4 * n,  # kept between micro-batches when accumulating
        "optimizer": 4 * n * OPTIMIZERS[optimizer],
        "autocast_weights": autocast_weight_bytes(cfg, precision, checkpointing),
        "activations": batch * activation_bytes(cfg, precision, attention, checkpointing) + step_saved_bytes(cfg),
        # per image, and, with checkpointing in half precision, the recomputed block's
        # weight copies (made again in backward, freed with the block)
        "transient": batch * transient_bytes(cfg, precision, attention, checkpointing)
        + (2 * family.recompute_weight_params(cfg) if half and checkpointing else 0),
    }
    backward_peak = sum(m.values())
    # the foreach optimizer step allocates about one parameter-sized temporary
    step_peak = m["weights"] + m["grads"] + m["optimizer"] + 4 * n
    m["peak"] = max(backward_peak, step_peak)
    return m


def required_bytes(peak: int, device: Device) -> int:
    """What must be free on the device for that peak: + fragmentation + context."""
    return int(peak * (1 + FRAGMENTATION)) + device.reserve_bytes


def plan(
    cfg, batch: int, device: Device, precision="fp32", optimizer="adamw", attention="sdpa", checkpointing=False
) -> dict:
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
    return {
        "fits": fits_full,
        "micro_batch": micro,
        "accum_steps": batch // micro if micro else 0,
        "micro_required_bytes": need(micro) if micro else None,
        "headroom_bytes": device.memory_bytes - need(micro) if micro else device.memory_bytes - need(1),
    }


# ---------------------------------------------------------------------------------------
# Time


def timing(
    cfg,
    batch: int,
    micro_batch: int,
    device: Device,
    precision="fp32",
    optimizer="adamw",
    attention="sdpa",
    checkpointing=False,
) -> dict:
    """Training and inference img/s from the time model (`costmodel.steptime`): one optimizer
    step of `batch` images is batch / micro_batch micro-steps (forward + backward) and one
    update; inference runs forward passes of `micro_batch`. The split says where a training
    step's time goes (compute-bound, memory-bound, kernel launches)."""
    micro = micro_batch or batch  # does not fit anywhere: timed as if it did
    accum = max(1, batch // micro)
    step = steptime.step_time(
        cfg, micro, device, precision, attention, optimizer, train=True, checkpointing=checkpointing
    )
    update = steptime.update_time(cfg, device, precision, optimizer)
    seconds = accum * (step["seconds"] - update["seconds"]) + update["seconds"]
    infer = steptime.step_time(cfg, micro, device, precision, attention, optimizer, train=False)
    split = {k: accum * (step[k] - update[k]) + update[k] for k in ("compute_s", "memory_s", "overhead_s")}
    return {
        "train_img_per_s": batch / seconds,
        "infer_img_per_s": infer["img_per_s"],
        "step_s": seconds,
        "time_split": {k: v / seconds for k, v in split.items()},
        "time_split_s": split,
    }


# ---------------------------------------------------------------------------------------
# Everything for one model at one setting


def estimate(
    cfg,
    batch: int,
    device: str | Device = "t4",
    precision: str = "fp32",
    optimizer: str = "adamw",
    attention: str = "sdpa",
    checkpointing: bool = False,
    steps: int | None = None,
) -> dict:
    """One flat dict: params (per component), FLOPs, memory, fits/plan, training and
    inference img/s (the time model, at the planned micro-batch), the time split and ETA."""
    check_choice("precision", precision, PRECISIONS)
    check_choice("optimizer", optimizer, OPTIMIZERS)
    check_choice("attention", attention, ATTENTION)
    if isinstance(device, str):
        device = get_device(device)
    family = _checked_family(cfg, checkpointing)
    if batch < 1:
        raise UserError(f"batch must be a positive integer, got {batch}")
    p = param_counts(cfg)
    f = flops(cfg)
    mem = memory(cfg, batch, precision, optimizer, attention, checkpointing)
    pl = plan(cfg, batch, device, precision, optimizer, attention, checkpointing)
    t = timing(cfg, batch, pl["micro_batch"], device, precision, optimizer, attention, checkpointing)
    executed = f["train"] + (f["recompute"] if checkpointing else 0)
    img_s = t["train_img_per_s"]
    achieved = img_s * f["train"] / device.peak(precision)
    basis = "measured peak and bandwidth" if device.measured else "datasheet"
    note = (
        f"time model (costmodel.steptime) on {device.label}'s {basis}: "
        f"{t['time_split']['compute_s']:.0%} compute-bound, {t['time_split']['memory_s']:.0%} memory-bound, "
        f"{t['time_split']['overhead_s']:.0%} kernel launches; MFU {achieved:.3f} of the {precision} peak "
        f"({device.peak(precision) / 1e12:,.1f} TFLOP/s) follows from it"
    )
    out = {
        "params": p["total"],
        **{f"params_{k}": v for k, v in p.items() if k != "total"},
        "forward_flops": f["forward"],
        "train_flops": f["train"],
        "executed_flops": executed,
        "activation_bytes": activation_bytes(cfg, precision, attention, checkpointing),
        "batch": batch,
        "weights_bytes": mem["weights"],
        "grads_bytes": mem["grads"],
        "optimizer_bytes": mem["optimizer"],
        "autocast_weights_bytes": mem["autocast_weights"],
        "activations_bytes": mem["activations"],
        "transient_bytes": mem["transient"],
        "peak_bytes": mem["peak"],
        "required_bytes": required_bytes(mem["peak"], device),
        "capacity_bytes": device.memory_bytes,
        **pl,
        "img_per_s": img_s,
        "train_img_per_s": img_s,
        "infer_img_per_s": t["infer_img_per_s"],
        "time_split": t["time_split"],
        "step_s": t["step_s"],
        "mfu": achieved,
        "mfu_source": "time model",
        "mfu_basis": "predicted",
        "mfu_note": note,
        "peak_flops": device.peak(precision),
        "device": device.name,
        "device_label": device.label,
        "precision": precision,
        "optimizer": optimizer,
        "attention": attention,
        "checkpointing": checkpointing,
        "family": family.name,
        "attention_applies": family.attention,
    }
    if steps is not None:
        out["steps"] = steps
        out["eta_s"] = steps * batch / img_s
    return out
