"""Training memory per device when the state is sharded (FSDP2), and the decision between
replicating (DDP) and sharding.

Under DDP every device holds the whole state: fp32 weights, gradients and optimizer state
(`compute.memory`). Under FSDP (vitpipe.training.sharding: one unit per transformer block,
plus the root) each of `world` devices holds 1/world of that state, and on top:

- the unsharded weights of the root unit (embeddings, head) and of two units (the one that
  runs and the one prefetched), all-gathered in the run's precision (MixedPrecisionPolicy's
  param_dtype) for forward and again for backward; autocast then has no copies to make;
- the unsharded gradients of one unit while they are reduce-scattered (in fp32).

The units are the model family's (Family.shard_unit_params: the modules training shards).

Gradients are reduce-scattered after every micro-batch (the loop never defers the sync under
FSDP), so accumulation keeps only sharded gradients. Activations, the backward transient
and autocast's half copies are what one micro-batch needs, as under DDP.
"""

from __future__ import annotations

from vitpipe.costmodel import compute
from vitpipe.costmodel.devices import Device
from vitpipe.models import family_of_config
from vitpipe.models.registry import element_bytes
from vitpipe.params import divisors


def unit_params(cfg) -> tuple[int, int]:
    """(parameters of the largest sharded unit, parameters of the root unit): the units the
    family shards (Family.shard_unit_params, the same family file that names the modules to
    training.sharding). A family that names none is one root unit: gathered whole."""
    units = family_of_config(cfg).shard_unit_params(cfg)
    total = compute.param_counts(cfg)["total"]
    return max(units, default=0), total - sum(units)


def sharded_memory(
    cfg, batch: int, world: int, precision="fp32", optimizer="adamw", attention="sdpa", checkpointing=False
) -> dict:
    """`compute.memory` per device with the state sharded over `world` devices (bytes)."""
    m = compute.memory(cfg, batch, precision, optimizer, attention, checkpointing)
    n = compute.param_counts(cfg)["total"]
    block, root = unit_params(cfg)
    s = dict(m)
    s["weights"] = -(-4 * n // world) + compute.buffer_bytes(cfg)  # buffers are not sharded
    s["grads"] = -(-4 * n // world)
    s["optimizer"] = -(-m["optimizer"] // world)
    # MixedPrecisionPolicy: weights all-gathered in the run's precision, one unit's full gradients
    # in it too and again in fp32 for the reduce-scatter; the gathered half weights are what the
    # matmuls read, so autocast keeps no copies of its own
    a = element_bytes(precision)
    s["gathered"] = a * (root + 2 * block) + (a + 4 if a < 4 else 4) * block
    if a < 4:
        s["autocast_weights"] = 0
    s["state"] = s["weights"] + s["grads"] + s["optimizer"]
    parts = ("weights", "grads", "optimizer", "gathered", "autocast_weights", "activations", "transient")
    backward_peak = sum(s[k] for k in parts)
    step_peak = s["state"] + s["grads"]  # the foreach step's temporary, per shard
    s["peak"] = max(backward_peak, step_peak)
    s["world"] = world
    return s


def state_bytes(cfg, world: int, optimizer="adamw") -> int:
    """Weights + gradients + optimizer state one of `world` devices holds under FSDP (world 1:
    DDP's, the whole state): what `state_bytes_per_process` measures in a run."""
    n = compute.param_counts(cfg)["total"]
    return -(-4 * n * (2 + compute.OPTIMIZERS[optimizer]) // world)


def largest_micro_batch(
    cfg,
    batch: int,
    device: Device,
    world: int,
    precision="fp32",
    optimizer="adamw",
    attention="sdpa",
    checkpointing=False,
) -> int:
    """The largest micro-batch (a divisor of batch/world, each device takes whole micro-batches)
    that fits one device with the state sharded over `world`; 0 if none does."""

    def fits(mb):
        peak = sharded_memory(cfg, mb, world, precision, optimizer, attention, checkpointing)["peak"]
        return compute.required_bytes(peak, device) <= device.memory_bytes

    if batch % world:
        return 0
    divs, best, lo, hi = divisors(batch // world), 0, 0, None
    hi = len(divs) - 1
    while lo <= hi:  # memory grows with the micro-batch
        mid = (lo + hi) // 2
        if fits(divs[mid]):
            best, lo = divs[mid], mid + 1
        else:
            hi = mid - 1
    return best


def fits_replicated(
    cfg, micro_batch: int, device: Device, precision="fp32", optimizer="adamw", attention="sdpa", checkpointing=False
) -> bool:
    """Does the whole state plus one micro-batch fit one device (DDP)?"""
    peak = compute.memory(cfg, micro_batch, precision, optimizer, attention, checkpointing)["peak"]
    return compute.required_bytes(peak, device) <= device.memory_bytes


def fewest_devices(cfg, batch: int, device: Device, most: int = 64, **kw) -> int | None:
    """The fewest devices the state can be sharded over and fit (None: not even `most`)."""
    return next((w for w in range(2, most + 1) if largest_micro_batch(cfg, batch, device, w, **kw)), None)


def decide(
    cfg,
    batch: int,
    device: Device,
    devices: int,
    precision="fp32",
    optimizer="adamw",
    attention="sdpa",
    checkpointing=False,
) -> dict:
    """Replicate or shard over the `devices` available: DDP where the whole state fits one device
    at micro-batch 1, else FSDP over all of them at the largest micro-batch that fits.
    {parallel (ddp | fsdp | None: neither fits), nproc, micro_batch, accum_steps,
    per_device_required_bytes, state_bytes_per_device, fewest_devices}."""
    kw = {"precision": precision, "optimizer": optimizer, "attention": attention, "checkpointing": checkpointing}
    out = {
        "parallel": None,
        "nproc": devices,
        "micro_batch": None,
        "accum_steps": None,
        "per_device_required_bytes": None,
        "state_bytes_per_device": None,
        "fewest_devices": None,
    }
    if fits_replicated(cfg, 1, device, **kw):
        return out | {"parallel": "ddp", "state_bytes_per_device": state_bytes(cfg, 1, optimizer)}
    out["fewest_devices"] = fewest_devices(cfg, batch, device, **kw)
    mb = largest_micro_batch(cfg, batch, device, devices, **kw) if devices > 1 else 0
    if mb:
        peak = sharded_memory(cfg, mb, devices, **kw)["peak"]
        out |= {
            "parallel": "fsdp",
            "micro_batch": mb,
            "accum_steps": batch // mb,
            "per_device_required_bytes": compute.required_bytes(peak, device),
            "state_bytes_per_device": state_bytes(cfg, devices, optimizer),
        }
    return out
