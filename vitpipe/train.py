"""The one training loop, used by pretrain, train_scratch and finetune.

One readable loop: warmup + cosine LR, gradient accumulation over micro-batches, mixed
precision, grad clipping, periodic evaluation, a per-step log that `dvc plots` reads, and a
checkpoint every `checkpoint_every` steps (and on SIGTERM/SIGINT) that a re-run resumes
from exactly: the data order is a pure function of (seed, step), and every RNG is restored.
Under torchrun it is DistributedDataParallel; only rank 0 writes anything.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
from dataclasses import dataclass, asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from vitpipe import checkpoint
from vitpipe.atomic import torch_save, write_json, write_text
from vitpipe.data.prepared_store import SampleStream, Split
from vitpipe.errors import UserError
from vitpipe.evaluate import accuracy
from vitpipe.params import TrainParams
from vitpipe.telemetry import Sampler, now

# Keys of a recipe that do not change the numbers a run produces: a checkpoint written
# under other values of these is still the same run.
NOT_IN_FINGERPRINT = ("checkpoint_every", "eval_every", "resume", "compile")

TRAIN_COLUMNS = ("step", "loss", "lr", "img_per_s", "img_per_s_per_device", "elapsed_s", "eta_s", "memory_mb")
EVAL_COLUMNS = ("step", "val_acc", "val_loss", "elapsed_s")


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
    """Linear warmup to recipe.lr, then cosine decay to 0 at recipe.steps."""
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


class StopRequested:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the end of the step and exits."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class StepLog:
    """Append-only TSV; on resume, rows after the checkpoint's step are dropped first."""

    def __init__(self, path: Path, columns, resume_step: int | None):
        self.path, self.columns = path, columns
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if resume_step is not None and path.exists():
            lines = path.read_text().splitlines()[1:]
            rows = [line for line in lines if line and int(float(line.split("\t")[0])) <= resume_step]
        write_text(path, "\t".join(columns) + "\n" + "".join(r + "\n" for r in rows))
        self.file = open(path, "a", buffering=1 << 16)

    def write(self, **row):
        self.file.write("\t".join(_fmt(row[c]) for c in self.columns) + "\n")

    def flush(self):
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self):
        self.file.close()


def _fmt(v) -> str:
    return str(v) if isinstance(v, int) else f"{v:.6g}"


def fit(model: torch.nn.Module, data: Split, recipe: TrainParams, paths: RunPaths, *, val: Split | None,
        run_config: dict, fresh_key: str, weights_meta: dict, desc: str, quiet: bool = False) -> dict:
    """Train `model` on `data` for recipe.steps optimizer steps; returns the metrics it wrote."""
    d = setup_distributed()
    device = pick_device(d)
    torch.manual_seed(recipe.seed)
    config = {k: v for k, v in asdict(recipe).items() if k not in NOT_IN_FINGERPRINT} | run_config
    ckpt = None if recipe.resume == "fresh" else checkpoint.load_for_resume(paths.checkpoint, config, fresh_key)

    model.to(device)
    if recipe.activation_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise UserError(f"{fresh_key.split('.')[0]}.activation_checkpointing: this model "
                            f"({type(model).__name__}) has no activation checkpointing; set it to false")
        model.set_grad_checkpointing(True)
    if device.type == "cuda" and not hasattr(model, "patch_embed"):
        model.to(memory_format=torch.channels_last)  # CNNs run faster channels-last on tensor cores
    optimizer = make_optimizer(model, recipe)
    amp_dtype = autocast_dtype(recipe.precision)
    scaler = torch.amp.GradScaler(device.type) if recipe.precision == "fp16" else None

    start, elapsed0 = 0, 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        checkpoint.set_rng_state(ckpt["rng"])
        start, elapsed0 = ckpt["step"], ckpt["elapsed_s"]
        if d.main and not quiet:
            print(f"[{desc}] resuming from {paths.checkpoint} at step {start}/{recipe.steps}", file=sys.stderr)

    net = model
    if d.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if recipe.compile:
        net = torch.compile(net)

    B, mb, accum = recipe.batch_size, recipe.micro_batch, recipe.accum_steps
    mine = list(range(d.rank, accum, d.world))  # this process's micro-batches of each step
    loss_scale = mb / B * d.world                # DDP averages over processes; this restores the global mean
    stream = SampleStream(len(data), recipe.seed)

    log = eval_log = bar = None
    if d.main:
        log = StepLog(paths.plots / "train.tsv", TRAIN_COLUMNS, start if ckpt else None)
        eval_log = StepLog(paths.plots / "eval.tsv", EVAL_COLUMNS, start if ckpt else None) if val is not None else None
        if not quiet:
            from tqdm import tqdm

            bar = tqdm(total=recipe.steps, initial=start, desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0)

    last_good = start if ckpt else None
    skipped_steps, loss_value, rate = 0, float("nan"), None
    best_val, last_val = None, None
    t_run = now()
    with Sampler(device) as sampler, StopRequested() as stop:
        step = start
        while step < recipe.steps:
            t0 = now()
            lr = lr_at(step, recipe)
            for g in optimizer.param_groups:
                g["lr"] = lr
            net.train()
            idx = stream.take(step * B, B)
            step_loss = torch.zeros((), device=device)
            try:
                for n, m in enumerate(mine):
                    gen = torch.Generator().manual_seed(recipe.seed * 7_919 + step * 131 + m)
                    x, y = data.batch(idx[m * mb:(m + 1) * mb], augment=recipe.augment, generator=gen)
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    sync = n == len(mine) - 1 or d.world == 1
                    with (contextlib.nullcontext() if sync else net.no_sync()):
                        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                            loss = F.cross_entropy(net(x), y, label_smoothing=recipe.label_smoothing)
                        (scaler.scale(loss * loss_scale) if scaler else loss * loss_scale).backward()
                    step_loss += loss.detach() * (mb / B)
            except torch.OutOfMemoryError:
                raise UserError(oom_message(model, recipe, device)) from None
            if d.world > 1:
                torch.distributed.all_reduce(step_loss)
            loss_value = step_loss.item()
            if not math.isfinite(loss_value):
                where = f"the last good checkpoint is step {last_good} in {paths.checkpoint}" if last_good else "no checkpoint was written yet"
                raise TrainingDiverged(f"[{desc}] loss is {loss_value} at step {step + 1} ({where}); "
                                       f"lower {fresh_key.split('.')[0]}.lr or use precision fp32/bf16")
            if scaler:
                scaler.unscale_(optimizer)
            if recipe.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            if scaler:
                scale_before = scaler.get_scale()
                scaler.step(optimizer)
                scaler.update()
                skipped_steps += scaler.get_scale() < scale_before  # overflow: the scaler skipped this step
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            dt = now() - t0
            rate = B / dt if rate is None else 0.9 * rate + 0.1 * B / dt
            elapsed = elapsed0 + now() - t_run
            if d.main:
                log.write(step=step, loss=loss_value, lr=lr, img_per_s=B / dt, img_per_s_per_device=B / dt / d.world,
                          elapsed_s=elapsed, eta_s=(recipe.steps - step) * B / rate, memory_mb=sampler.step_memory_mb())
                if bar:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.3f}", img_s=f"{rate:.0f}", mem_mb=f"{sampler.step_memory_mb():.0f}", refresh=False)
            if val is not None and (step % recipe.eval_every == 0 or step == recipe.steps) and d.main:
                last_val = accuracy(model, val, device, amp_dtype=amp_dtype)
                best_val = max(best_val or 0.0, last_val["top1"])
                eval_log.write(step=step, val_acc=last_val["top1"], val_loss=last_val["loss"], elapsed_s=elapsed)
                eval_log.flush()
            stopping = stop.signal is not None
            if step % recipe.checkpoint_every == 0 or stopping or step == recipe.steps:
                if d.main:
                    log.flush()
                    checkpoint.save(paths.checkpoint, model=model, optimizer=optimizer, scaler=scaler, step=step,
                                    elapsed_s=elapsed, config=config, finished=step == recipe.steps)
                last_good = step
                if d.world > 1:
                    torch.distributed.barrier()
            if stopping:
                if d.main:
                    print(f"\n[{desc}] stopped by signal {stop.signal} at step {step}; checkpoint saved to "
                          f"{paths.checkpoint}; run the stage again to resume", file=sys.stderr)
                sys.exit(128 + stop.signal)

    wall = elapsed0 + now() - t_run
    metrics = {}
    if d.main:
        if bar:
            bar.close()
        log.close()
        if eval_log:
            eval_log.close()
        n_params = sum(p.numel() for p in model.parameters())
        metrics = {
            "steps": recipe.steps,
            "batch_size": B,
            "train_loss": round(loss_value, 5),
            "wall_time_s": round(wall, 2),
            "img_per_s": round(recipe.steps * B / wall, 2) if wall > 0 else 0.0,
            "img_per_s_per_device": round(recipe.steps * B / wall / d.world, 2) if wall > 0 else 0.0,
            "devices": d.world,
            "device": device.type,
            "params": n_params,
            "skipped_steps": int(skipped_steps),
        }
        if last_val is not None:
            metrics |= {"val_acc": round(last_val["top1"], 5), "best_val_acc": round(best_val, 5)}
        metrics |= sampler.summary()
        torch_save(paths.weights, {"state_dict": model.state_dict(), **weights_meta})
        write_json(paths.metrics, metrics)
    if d.world > 1:
        torch.distributed.barrier()
    return metrics


def oom_message(model, recipe: TrainParams, device: torch.device) -> str:
    """CUDA ran out of memory: say what the compute model plans for this device instead."""
    msg = f"CUDA out of memory at micro_batch={recipe.micro_batch} (batch_size={recipe.batch_size})"
    try:
        from vitpipe.compute import plan_for_module

        advice = plan_for_module(model, recipe, device)
        return f"{msg}; {advice}"
    except Exception:
        return f"{msg}; lower micro_batch (batch_size is kept by gradient accumulation) or use precision bf16"
