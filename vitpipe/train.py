"""The one training loop, used by pretrain, train_scratch and finetune.

One readable loop: warmup + cosine LR, gradient accumulation over micro-batches, mixed
precision, grad clipping, periodic evaluation, a per-step log that `dvc plots` reads, and a
checkpoint every `checkpoint_every` steps (and on SIGTERM/SIGINT) that a re-run resumes
from exactly: the data order is a pure function of (seed, step), and every RNG is restored.
Under torchrun it is DistributedDataParallel; only rank 0 writes anything.

The host waits for the device only every LOG_EVERY steps (and before evaluation and
checkpoints): the losses are read back then, so the CPU prepares the next batches while
the GPU is still busy.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vitpipe import checkpoint
from vitpipe.atomic import torch_save, write_json, write_text
from vitpipe.data.prepared_store import SampleStream, Split, shift_and_flip
from vitpipe.errors import ParamError, UserError
from vitpipe.evaluate import accuracy
from vitpipe.params import TrainParams
from vitpipe.telemetry import Sampler, now

# Keys of a recipe that do not change the numbers a run produces: a checkpoint written
# under other values of these is still the same run.
NOT_IN_FINGERPRINT = ("checkpoint_every", "eval_every", "resume", "compile")

TRAIN_COLUMNS = ("step", "loss", "lr", "img_per_s", "img_per_s_per_device", "elapsed_s", "eta_s", "memory_mb")
EVAL_COLUMNS = ("step", "val_acc", "val_loss", "elapsed_s")

LOG_EVERY = 10  # steps between host syncs (loss read-back, log rows, NaN check, stop agreement)


class TrainingDiverged(UserError):
    pass


@dataclass
class RunPaths:
    checkpoint: Path  # persist: true, resumed from
    weights: Path     # the trained model (state_dict + what evaluate needs to rebuild it)
    metrics: Path     # flat JSON summary
    plots: Path       # folder of train.tsv / eval.tsv


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(d: Dist) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


def lr_at(step: int, recipe: TrainParams) -> float:
    """Linear warmup to recipe.lr, then cosine decay to 0 at recipe.steps. A pure function of
    the step: resuming the step resumes the schedule, so there is no scheduler state."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return 0.5 * recipe.lr * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, recipe: TrainParams) -> torch.optim.Optimizer:
    # No weight decay on biases, norms, position embeddings and tokens (as in timm / the ViT paper).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "pos_embed" in name or "token" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum)
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.999))


def autocast_dtype(precision: str):
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def prepare_model(model: torch.nn.Module, recipe: TrainParams, section: str) -> str:
    """Fused attention on, activation checkpointing if asked; returns the attention kind."""
    attention = [m for m in model.modules() if hasattr(m, "fused_attn")]  # timm's Attention blocks
    for m in attention:
        m.fused_attn = True  # F.scaled_dot_product_attention: flash / memory-efficient kernels
    if recipe.activation_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ParamError(f"{section}.activation_checkpointing", True,
                             f"false for this model ({type(model).__name__} has no activation checkpointing)")
        model.set_grad_checkpointing(True)
    return "sdpa" if attention else "none"


def device_batch(data: Split, idx, augment: bool, generator, device: torch.device, mean, std):
    """Split.batch with the float work moved to `device`: the (augmented) uint8 images cross
    the bus, 4x fewer bytes than float32, from pinned memory without blocking the host;
    conversion and normalisation run on the GPU. Same numbers as Split.batch."""
    idx = np.sort(np.asarray(idx))
    x = torch.from_numpy(np.ascontiguousarray(data.x[idx])).permute(0, 3, 1, 2)
    y = data.y[torch.from_numpy(idx)]
    if augment:
        x = shift_and_flip(x, generator, data.hflip)  # zero padding is 0 in uint8 as in float
    if device.type == "cuda":
        x, y = x.pin_memory(), y.pin_memory()
    x = x.to(device, non_blocking=True).float()
    return (x - mean) / std, y.to(device, non_blocking=True)


class StopRequested:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at its next sync and exits. A second
    signal exits at once (the last checkpoint stays intact: saves are atomic)."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        import signal

        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise SystemExit(128 + signum)
        self.signal = signum

    def __exit__(self, *exc):
        import signal

        for s, h in self._old.items():
            signal.signal(s, h)


class StepLog:
    """A TSV that `dvc plots` reads. Its rows also go into every checkpoint, so a resumed run
    rewrites exactly the rows up to its checkpoint, whatever happened to the file."""

    def __init__(self, path: Path, columns, rows: list[str]):
        self.columns, self.rows = columns, list(rows)
        write_text(path, "\t".join(columns) + "\n" + "".join(r + "\n" for r in self.rows))
        self.file = open(path, "a")

    def write(self, **row):
        line = "\t".join(_fmt(row[c]) for c in self.columns)
        self.rows.append(line)
        self.file.write(line + "\n")

    def flush(self):
        self.file.flush()

    def close(self):
        self.file.close()


def _fmt(v) -> str:
    return str(v) if isinstance(v, int) else f"{v:.6g}"


def fit(model: torch.nn.Module, data: Split, recipe: TrainParams, paths: RunPaths, *, val: Split | None,
        run_config: dict, fresh_key: str, weights_meta: dict, desc: str, quiet: bool = False) -> dict:
    """Train `model` on `data` for recipe.steps optimizer steps; returns the metrics it wrote."""
    d = setup_distributed()
    try:
        return _fit(d, model, data, recipe, paths, val, run_config, fresh_key, weights_meta, desc, quiet)
    finally:
        if d.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _fit(d: Dist, model, data, recipe, paths, val, run_config, fresh_key, weights_meta, desc, quiet) -> dict:
    section = fresh_key.split(".")[0]
    device = pick_device(d)
    B, mb = recipe.batch_size, recipe.micro_batch
    if recipe.accum_steps % d.world:
        raise ParamError(f"{section}.micro_batch", mb, f"a size that splits batch_size={B} into a multiple of "
                         f"{d.world} micro-batches (one share per process)")
    # What makes this run this run: the params that change its numbers, the weights it starts
    # from (fine-tuning from other pretrained weights is another run) and the data it reads.
    config = ({k: v for k, v in asdict(recipe).items() if k not in NOT_IN_FINGERPRINT} | run_config
              | {"world": d.world, "init_weights": checkpoint.tensors_digest(model.state_dict().values()),
                 "train_labels": checkpoint.tensors_digest([data.y]), "train_images": list(data.x.shape)})
    ckpt = None if recipe.resume == "fresh" else checkpoint.load_for_resume(paths.checkpoint, config, fresh_key)
    start = ckpt["step"] if ckpt else 0
    if d.world > 1:  # every process must resume the same step: the checkpoint needs a shared filesystem
        seen = torch.tensor([start, -start], device=device)
        torch.distributed.all_reduce(seen, op=torch.distributed.ReduceOp.MAX)
        if seen[0].item() != -seen[1].item():
            raise UserError(f"processes found different checkpoints at {paths.checkpoint} (steps {-seen[1].item()}.."
                            f"{seen[0].item()}): every node must see the same file (a shared filesystem)")
    if d.main:
        checkpoint.remove_stale_temps(paths.checkpoint)
    torch.manual_seed(recipe.seed + d.rank)  # dropout etc. differ per process; data order does not
    random.seed(recipe.seed + d.rank)
    np.random.seed(recipe.seed + d.rank)

    attention = prepare_model(model, recipe, section)
    model.to(device)
    channels_last = device.type == "cuda" and not hasattr(model, "patch_embed")
    if channels_last:
        model.to(memory_format=torch.channels_last)  # CNNs run faster channels-last on tensor cores
        torch.backends.cudnn.benchmark = True
    optimizer = make_optimizer(model, recipe)
    amp_dtype = autocast_dtype(recipe.precision)
    scaler = torch.amp.GradScaler(device.type) if recipe.precision == "fp16" else None

    elapsed0, rows, extra = 0.0, {"train": [], "eval": []}, {}
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            if scaler is not None:
                scaler.load_state_dict(ckpt["scaler"])
            checkpoint.set_rng_state(ckpt["rng"][d.rank], device)
        except Exception as e:
            raise UserError(f"checkpoint {paths.checkpoint} does not fit this run ({type(e).__name__}: {str(e)[:160]}); "
                            f"delete it or set {fresh_key}: fresh") from None
        elapsed0, rows, extra = ckpt["elapsed_s"], ckpt["log"], ckpt["extra"]
        if d.main and not quiet:
            print(f"[{desc}] resuming from {paths.checkpoint} at step {start}/{recipe.steps}", file=sys.stderr)

    net = model
    if d.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                        gradient_as_bucket_view=True)
    if recipe.compile:
        net = torch.compile(net)

    mine = list(range(d.rank, recipe.accum_steps, d.world))  # this process's micro-batches of each step
    loss_scale = mb / B * d.world                              # DDP averages over processes; this restores the global mean
    stream = SampleStream(len(data), recipe.seed)
    mean, std = data.mean.to(device), data.std.to(device)

    def batch(idx, step, m):
        gen = torch.Generator().manual_seed(recipe.seed * 7_919 + step * 131 + m)  # augmentation: a function of (step, micro-batch)
        if device.type == "cpu":
            return data.batch(idx, augment=recipe.augment, generator=gen)
        x, y = device_batch(data, idx, recipe.augment, gen, device, mean, std)
        return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), y

    log = eval_log = bar = None
    if d.main:
        log = StepLog(paths.plots / "train.tsv", TRAIN_COLUMNS, rows["train"])
        eval_log = StepLog(paths.plots / "eval.tsv", EVAL_COLUMNS, rows["eval"]) if val is not None else None
        if not quiet:
            from tqdm import tqdm

            bar = tqdm(total=recipe.steps, initial=start, desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0)

    def save_checkpoint(step: int, finished: bool = False):
        rng = [checkpoint.rng_state(device)]
        if d.world > 1:
            rng = [None] * d.world
            torch.distributed.all_gather_object(rng, checkpoint.rng_state(device))
        if d.main:
            log.flush()
            checkpoint.save(paths.checkpoint, model=model, optimizer=optimizer, scaler=scaler, step=step,
                            elapsed_s=elapsed0 + now() - t_run, config=config, rng=rng, finished=finished,
                            log={"train": log.rows, "eval": eval_log.rows if eval_log else []},
                            extra={"best_val": best_val, "skipped_steps": skipped})
        return step

    last_good = start if ckpt else None
    skipped, best_val, last_val = extra.get("skipped_steps", 0), extra.get("best_val"), None
    loss_value = float("nan")
    pending = []  # (step, lr, loss, grad norm, host time) of steps not read back yet
    t_run = t_window = now()
    with Sampler(device) as sampler, StopRequested() as stop:
        step = start
        try:
            while step < recipe.steps:
                lr = lr_at(step, recipe)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                idx = stream.take(step * B, B)
                step_loss = torch.zeros((), device=device)
                for n, m in enumerate(mine):
                    x, y = batch(idx[m * mb:(m + 1) * mb], step, m)
                    # DDP all-reduces gradients once per step: after this process's last micro-batch
                    with net.no_sync() if d.world > 1 and n < len(mine) - 1 else contextlib.nullcontext():
                        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                            loss = F.cross_entropy(net(x), y, label_smoothing=recipe.label_smoothing)
                        (scaler.scale(loss * loss_scale) if scaler else loss * loss_scale).backward()
                    step_loss += loss.detach() * (mb / B)
                if scaler:
                    scaler.unscale_(optimizer)  # clip the true gradients
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip or float("inf"))
                if scaler:
                    scaler.step(optimizer)  # skips the update when fp16 gradients overflowed
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                pending.append((step, lr, step_loss, norm, now()))

                evaluating = val is not None and (step % recipe.eval_every == 0 or step == recipe.steps)
                checkpointing = step % recipe.checkpoint_every == 0 and step < recipe.steps
                if not (step % LOG_EVERY == 0 or evaluating or checkpointing or step == recipe.steps):
                    continue

                # Host sync, at the same steps in every process: read back, check, log, agree on stopping.
                flag = torch.tensor([float(stop.signal is not None)], device=device)
                shared = torch.cat([torch.stack([p[2] for p in pending]), flag])
                if d.world > 1:
                    torch.distributed.all_reduce(shared)  # sums each process's share of the loss, and the flags
                shared, norms = shared.tolist(), torch.stack([p[3] for p in pending]).tolist()
                t_sync = now()
                rate = B * len(pending) / (t_sync - t_window)
                seconds_per_step = (t_sync - t_run) / (step - start)
                memory_mb = sampler.step_memory_mb()
                for (s, lr_s, _, _, t), loss_s, norm_s in zip(pending, shared, norms):
                    if not math.isfinite(loss_s) or (not math.isfinite(norm_s) and scaler is None):
                        where = (f"the last good checkpoint is step {last_good} in {paths.checkpoint}" if last_good
                                 else "no checkpoint was written yet")
                        what = f"loss is {loss_s}" if not math.isfinite(loss_s) else f"gradient norm is {norm_s}"
                        raise TrainingDiverged(
                            f"[{desc}] {what} at step {s} ({where}); resuming it with the same params diverges "
                            f"the same way: lower {section}.lr or use precision fp32/bf16, with {section}.resume: fresh")
                    skipped += not math.isfinite(norm_s)  # fp16 overflow: the scaler skipped this update
                    loss_value = loss_s
                    if d.main:
                        log.write(step=s, loss=loss_s, lr=lr_s, img_per_s=rate, img_per_s_per_device=rate / d.world,
                                  elapsed_s=elapsed0 + t - t_run, eta_s=(recipe.steps - s) * seconds_per_step,
                                  memory_mb=memory_mb)
                pending.clear()
                if bar:
                    bar.update(step - bar.n)
                    bar.set_postfix(loss=f"{loss_value:.3f}", img_s=f"{rate:.0f}", **sampler.live(), refresh=False)
                if log:
                    log.flush()
                if evaluating and d.main:
                    last_val = accuracy(model, val, device, amp_dtype=amp_dtype)
                    best_val = max(best_val or 0.0, last_val["top1"])
                    eval_log.write(step=step, val_acc=last_val["top1"], val_loss=last_val["loss"],
                                   elapsed_s=elapsed0 + now() - t_run)
                    eval_log.flush()
                stopping = shared[-1] > 0 and step < recipe.steps
                if checkpointing or stopping:
                    last_good = save_checkpoint(step)
                if stopping:
                    if d.world > 1:
                        torch.distributed.barrier()  # nobody exits before rank 0 has saved
                    if d.main:
                        print(f"\n[{desc}] stopped by signal at step {step}; checkpoint saved to "
                              f"{paths.checkpoint}; run the stage again to resume", file=sys.stderr)
                    sys.exit(128 + (stop.signal or 15))
                t_window = now()  # img/s counts training only, not evaluation or checkpoints
        except torch.OutOfMemoryError:
            raise UserError(oom_message(recipe, section, run_config, weights_meta.get("num_classes"), device, d.world)) from None

        # Outputs first, then the finished checkpoint: killed in between, a re-run resumes
        # from the last periodic checkpoint and writes them again.
        wall = elapsed0 + now() - t_run
        metrics = {}
        if d.main:
            if bar:
                bar.close()
            metrics = {
                "steps": recipe.steps,
                "batch_size": B,
                "train_loss": round(loss_value, 5),
                "wall_time_s": round(wall, 2),
                "img_per_s": round(recipe.steps * B / wall, 2) if wall > 0 else 0.0,
                "img_per_s_per_device": round(recipe.steps * B / wall / d.world, 2) if wall > 0 else 0.0,
                "devices": d.world,
                "device": device.type,
                "params": sum(p.numel() for p in model.parameters()),
                "skipped_steps": int(skipped),
                "attention": attention,
            }
            if last_val is not None:
                metrics |= {"val_acc": round(last_val["top1"], 5), "best_val_acc": round(best_val, 5)}
            metrics |= sampler.summary()
            torch_save(paths.weights, {"state_dict": model.state_dict(), **weights_meta})
            write_json(paths.metrics, metrics)
        save_checkpoint(step, finished=True)
        if d.main:
            log.close()
            if eval_log:
                eval_log.close()
    if d.world > 1:
        torch.distributed.barrier()
    return metrics


def device_profile(device: torch.device):
    """The compute model's profile of this CUDA device: a known one matched by name (closest
    memory), with the memory this device really has (a MIG slice, a 40 vs 80 GB part)."""
    from vitpipe.devices import DEVICES, MiB, Device

    props = torch.cuda.get_device_properties(device)
    known = [p for p in DEVICES.values() if re.search(rf"\b{p.name.split('-')[0]}\b", props.name, re.IGNORECASE)]
    if known:
        best = min(known, key=lambda p: abs(p.memory_bytes - props.total_memory))
        return replace(best, memory_bytes=props.total_memory)
    return Device("this", props.name, props.total_memory, {}, 0.0, reserve_bytes=600 * MiB)


def oom_message(recipe: TrainParams, section: str, run_config: dict, num_classes: int, device: torch.device,
                world: int = 1, profile=None) -> str:
    """CUDA ran out of memory: what the compute model plans for this device instead."""
    msg = f"CUDA out of memory at micro_batch={recipe.micro_batch} (batch_size={recipe.batch_size})"
    generic = (f"lower {section}.micro_batch (batch_size is kept by gradient accumulation), or set {section}.precision: bf16 "
               f"or {section}.activation_checkpointing: true")
    try:
        from vitpipe import compute
        from vitpipe.models import model_config

        profile = profile or device_profile(device)
        cfg = model_config(run_config["spec"], num_classes, run_config["image_size"])
        per_device = recipe.batch_size // world
        where = f"{profile.label} ({profile.memory_bytes / 2**30:.1f} GiB)"
        advice = []
        options = [(recipe.precision, recipe.activation_checkpointing)]
        if recipe.precision == "fp32":
            options.append(("bf16", recipe.activation_checkpointing))
        if not recipe.activation_checkpointing and hasattr(cfg, "patch"):
            options.append((options[-1][0], True))
        for precision, ckpt in options:
            p = compute.plan(cfg, per_device, profile, precision=precision, optimizer=recipe.optimizer,
                             checkpointing=ckpt)
            micro = p["micro_batch"]
            if (precision, ckpt) == options[0] and micro >= recipe.micro_batch:
                # the model's estimate is optimistic here: suggest the next smaller micro-batch
                micro = max([k for k in range(1, recipe.micro_batch) if per_device % k == 0], default=0)
            setting = f"{section}.precision: {precision}" + (f", {section}.activation_checkpointing: true" if ckpt else "")
            if micro:
                advice.append(f"{setting}, {section}.micro_batch: {micro} ({per_device // micro} accumulation steps)")
            else:
                advice.append(f"{setting}: nothing fits, even micro_batch 1")
            if micro and (precision, ckpt) == options[0]:
                break  # the current settings fit with a smaller micro-batch: that is the advice
        return (f"{msg}; the compute model's plan for batch {per_device} per device on {where}: "
                + "; or ".join(advice))
    except Exception:
        return f"{msg}; {generic}"
