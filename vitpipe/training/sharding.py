"""How a model is spread over the processes of a run: replicated (DDP) or sharded (FSDP2).

`parallel: ddp` keeps the whole training state (weights, gradients, optimizer state) on every
process and all-reduces gradients. `parallel: fsdp` shards that state over the processes with
PyTorch's `fully_shard` (one unit per transformer block / residual block, plus the root), so
each process holds about 1/world of it and gathers a block's weights only while it runs.
`auto` asks the cost model (vitpipe.costmodel.sharding) at run time: DDP where it fits the
device, FSDP where only sharding does.

What the loop needs stays the same for both: a gradient-sync switch for accumulation, a plain
tensor for the clipped norm, full (gathered) state dicts for checkpoints and the final
weights, and the bytes of state this process holds (`state_bytes_per_process`).

Checkpoints of a sharded run are gathered to rank 0 and written through the one checkpoint
format (vitpipe.checkpoints.format), so they keep its guarantees (atomic, digest-checked,
mirrored, bit-exact resume); every process reads the full file back and keeps its shard.
"""

from __future__ import annotations

import contextlib

import torch

from vitpipe.errors import ParamError


def shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules that become one FSDP unit each: a ViT's blocks, a ResNet's residual blocks."""
    if hasattr(model, "blocks"):
        return list(model.blocks)
    return [b for name in ("layer1", "layer2", "layer3", "layer4") for b in getattr(model, name, [])]


def shard(model: torch.nn.Module, device: torch.device, world: int) -> torch.nn.Module:
    """fully_shard `model` in place over all `world` processes (one flat device mesh: CPU+gloo
    or CUDA+NCCL). Call before the optimizer is built: its parameters become DTensor shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def gradient_sync(net, sync: bool):
    """Accumulation under DDP: no all-reduce until this process's last micro-batch (no_sync).
    Under FSDP every micro-batch's gradients are reduce-scattered at once: deferring the sync
    would keep whole unsharded gradients on every process, the memory sharding saves."""
    inner = getattr(net, "_orig_mod", net)  # under torch.compile
    if isinstance(inner, torch.nn.parallel.DistributedDataParallel) and not sync:
        return inner.no_sync()
    return contextlib.nullcontext()


def plain(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP's replicated grad norm) as the plain tensor every process agrees on."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of parameters + gradients + optimizer state this process holds (its shards under
    FSDP, everything under DDP). Call between backward and zero_grad, after one optimizer step."""
    params = [p for p in model.parameters()]
    total = sum(_local_bytes(p) for p in params)
    total += sum(_local_bytes(p.grad) for p in params if p.grad is not None)
    total += sum(_local_bytes(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    return total


class Gathered:
    """A full state dict in the shape checkpoint.save expects (an object with state_dict())."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state


def gathered(model, optimizer) -> tuple[Gathered, Gathered]:
    """The full model and optimizer state dicts, on rank 0 (on CPU; empty elsewhere). A
    collective: every process calls it. The optimizer's state is keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return Gathered(msd), Gathered(osd)


def full_model_state(model) -> dict:
    """The full model state dict on rank 0 (empty elsewhere): the final weights. A collective."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full(model, optimizer, model_state: dict, optim_state: dict) -> None:
    """Every process hands in the same full state dicts (it read the checkpoint file) and keeps
    its own shard: the same bytes the shard held when it was saved."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True))


def resolve(parallel: str, world: int, section: str, fits_replicated=None) -> str:
    """ddp | fsdp for this run, "none" for one process (nothing to replicate or shard). `auto`
    shards only where the replicated state does not fit (`fits_replicated()`, asked only then)."""
    if parallel not in ("ddp", "fsdp", "auto"):
        raise ParamError(f"{section}.parallel", parallel, "one of: ddp, fsdp, auto")
    if world == 1:
        return "none"
    if parallel == "auto":
        return "ddp" if fits_replicated is None or fits_replicated() else "fsdp"
    return parallel


def replicated_fits(job, recipe, device: torch.device) -> bool:
    """`parallel: auto`: does the whole training state plus one micro-batch fit this device (the
    cost model, vitpipe.costmodel.sharding)? A network the cost model cannot describe: assume so."""
    from vitpipe.costmodel import sharding as cost
    from vitpipe.hardware.probe import profile_of
    from vitpipe.models import model_config

    spec, size, classes = job.run_config.get("spec"), job.run_config.get("image_size"), job.weights_meta.get("num_classes")
    if not (spec and size and classes):
        return True
    precision = recipe.precision if recipe.precision in ("bf16", "fp16") else "fp32"
    return cost.fits_replicated(model_config(spec, classes, size), recipe.micro_batch, profile_of(device), precision,
                                recipe.optimizer, checkpointing=recipe.activation_checkpointing)
