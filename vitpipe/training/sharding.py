"""How a model is spread over the processes of a run: replicated (DDP) or sharded (FSDP2).

`parallel: ddp` keeps the whole training state (weights, gradients, optimizer state) on every
process and all-reduces gradients. `parallel: fsdp` shards that state over the processes with
PyTorch's `fully_shard` (one unit per block its model family names, plus the root), so each
process holds about 1/world of it and gathers a block's weights only while it runs.
`auto` asks the cost model (vitpipe.costmodel.sharding) at run time: DDP where it fits the
device, FSDP where only sharding does.

What the loop needs stays the same for both: a gradient-sync switch for accumulation, a plain
tensor for the clipped norm, the full (gathered) model state for the final weights, and the
bytes of state this process holds (`state_bytes_per_process`).

Checkpoints of a sharded run are never gathered: every process writes its own shards of the
model and optimizer state with torch.distributed.checkpoint (DCP, `save_sharded`) into one
folder of the checkpoint store, and reads back what it holds (`load_sharded`): at the same
number of processes the very bytes it saved (a resume is bit-exact), at another number the
slices DCP reshards for it. Not across engines: DDP's and a single process's checkpoints are
one full-state file of other runs (their fingerprints differ: `parallel` is ddp or none).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from vitpipe import precisions
from vitpipe.errors import ParamError


def shard(
    model: torch.nn.Module,
    device: torch.device,
    world: int,
    param_dtype: torch.dtype | None = None,
    compile_units: bool = False,
) -> bool:
    """fully_shard `model` in place over all `world` processes (one flat device mesh: CPU+gloo
    or CUDA+NCCL), as torchtitan does. Call before the optimizer is built: its parameters
    become DTensor shards. Returns whether the units were compiled (else compile the whole).

    - The units are the family's (Family.shard_units: ViT blocks, ResNet residual blocks,
      ConvNeXt stage blocks), then the root holds the rest.
    - `model` may still be on the host: fully_shard moves each unit's parameters to `device`
      as it shards them, so the device never holds more than one whole unit besides the shards
      (a model too large for one device starts).
    - Parameters are made contiguous first: FSDP2 shards dim 0 of a contiguous tensor and
      refuses channels-last weights; a CNN's input stays channels-last, and cuDNN picks the
      layout from its input or weight, so the convolutions still run NHWC.
    - MixedPrecisionPolicy: weights all-gathered in the run's precision (`param_dtype`; half
      the bytes of fp32 under bf16/fp16), gradients reduce-scattered in fp32.
    - compile_units: each unit compiled before it is sharded (FSDP's hooks stay outside the
      graphs); compiling the sharded whole breaks the graph at every all-gather."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from vitpipe.models import shard_units

    with torch.no_grad():
        for p in model.parameters():
            if not p.is_contiguous():
                p.data = p.data.contiguous()
    mesh = init_device_mesh(device.type, (world,))
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    units = shard_units(model)
    for unit in units:
        if compile_units:
            unit.compile()  # in place: the module (and its state-dict names) stay
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return compile_units and bool(units)


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


def save_sharded(folder, model, optimizer, rank: int, world: int) -> dict[str, dict | None]:
    """Every process writes its shards of the model and optimizer state (keyed by parameter
    name) into `folder`, one file each, plus DCP's .metadata. A collective: it returns only
    after every process's writes are done, so rank 0 may then commit the folder. Returns each
    file DCP's metadata points into with its size and sha256 for the manifest, hashed by the
    processes in turn (each a 1/world share, not rank 0 alone); None for one its hasher could
    not see (a store the nodes do not share: rank 0 finds it missing and says so)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from vitpipe.checkpoints.mirror import sha256_file

    model_state, optim_state = get_state_dict(model, optimizer)  # sharded (DTensor) state, nothing gathered
    metadata = dcp.save({"model": model_state, "optimizer": optim_state}, storage_writer=dcp.FileSystemWriter(folder))
    names = sorted({info.relative_path for info in metadata.storage_data.values()})  # the same list on every rank
    mine = {}
    for name in names[rank::world]:
        path = Path(folder) / name
        mine[name] = {"size": path.stat().st_size, "sha256": sha256_file(path)} if path.is_file() else None
    shares = [None] * world
    torch.distributed.all_gather_object(shares, mine)
    return {name: digest for share in shares for name, digest in share.items()}


def load_sharded(folder, model, optimizer) -> None:
    """Every process reads its shards back from `folder`: the bytes it saved when the number of
    processes is the one that wrote it, else the slices DCP reshards for this one. A collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)  # the shapes to fill (creates AdamW's state)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, storage_reader=dcp.FileSystemReader(folder))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_model_state(model) -> dict:
    """The full model state dict on rank 0 (empty elsewhere): the final weights. A collective."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def resolve(parallel: str, world: int, section: str, fits_replicated=None) -> str:
    """ddp | fsdp for this run, "none" for one process (nothing to replicate or shard). `auto`
    shards only where the replicated state does not fit (`fits_replicated()`, asked only then).
    One process with `fsdp` shards only onto a process group its caller started itself: the GPU
    proof runs the sharded path (FSDP2, DCP, NCCL) so on its one GPU; a stage never starts one."""
    if parallel not in ("ddp", "fsdp", "auto"):
        raise ParamError(f"{section}.parallel", parallel, "one of: ddp, fsdp, auto")
    if world == 1:
        return "fsdp" if parallel == "fsdp" and torch.distributed.is_initialized() else "none"
    if parallel == "auto":
        return "ddp" if fits_replicated is None or fits_replicated() else "fsdp"
    return parallel


def replicated_fits(job, recipe, device: torch.device) -> bool:
    """`parallel: auto`: does the whole training state plus one micro-batch fit this device (the
    cost model, vitpipe.costmodel.sharding)? A network the cost model cannot describe: assume so."""
    from vitpipe.costmodel import sharding as cost
    from vitpipe.hardware.probe import profile_of
    from vitpipe.models import model_config

    spec, size, classes = (
        job.run_config.get("spec"),
        job.run_config.get("image_size"),
        job.weights_meta.get("num_classes"),
    )
    if not (spec and size and classes):
        return True
    precision = recipe.precision if precisions.get(recipe.precision).autocast else "fp32"
    return cost.fits_replicated(
        model_config(spec, classes, size),
        recipe.micro_batch,
        profile_of(device),
        precision,
        recipe.optimizer,
        checkpointing=recipe.activation_checkpointing,
    )
