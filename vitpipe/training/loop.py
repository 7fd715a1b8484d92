"""The one training loop, used by pretrain, train_scratch and finetune.

One readable loop: warmup + cosine LR, gradient accumulation over micro-batches, mixed
precision, grad clipping, periodic evaluation, a per-step log that `dvc plots` reads, and a
checkpoint every `checkpoint_every` steps (and on SIGTERM/SIGINT) that a re-run resumes
from exactly: the data order is a pure function of (seed, step), and every RNG is restored.
Under torchrun it is DistributedDataParallel, or FSDP2 with `parallel: fsdp` (training/sharding.py);
only rank 0 writes anything, but for a sharded run's checkpoint: every process writes its shards.

The host waits for the device only every LOG_EVERY steps (and before evaluation and
checkpoints): the losses are read back then, so the CPU prepares the next batches while
the GPU is still busy; vitpipe.training.input_pipeline makes them ahead in a background
thread, the same numbers as made on demand.
"""

from __future__ import annotations

import json
import math
import random
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from vitpipe import precisions
from vitpipe.atomic import torch_save, write_json
from vitpipe.checkpoints import format as checkpoint
from vitpipe.checkpoints import store as checkpoint_store
from vitpipe.checkpoints.store import CheckpointStore
from vitpipe.data.prepared_store import Split
from vitpipe.errors import ParamError, UserError
from vitpipe.evaluation.classification import accuracy
from vitpipe.hardware import precision
from vitpipe.hardware.core_share import CoreShare
from vitpipe.hardware.telemetry import Sampler, now
from vitpipe.params import TrainParams
from vitpipe.training import sharding
from vitpipe.training.distributed import (
    Dist,
    is_lost_peer,
    lost_peer_message,
    pick_device,
    seed_everything,
    setup_distributed,
)
from vitpipe.training.input_pipeline import InputPipeline
from vitpipe.training.oom import oom_message
from vitpipe.training.recipe import (
    autocast_dtype,
    lr_at,
    make_optimizer,
    nondeterministic_op,
    prepare_model,
    use_deterministic_kernels,
)
from vitpipe.training.steplog import EVAL_COLUMNS, TRAIN_COLUMNS, StepLog

# Keys of a recipe that do not change the numbers a run produces: a checkpoint written
# under other values of these is still the same run. The number of processes is in it, but
# for a sharded run (see Run.__init__).
NOT_IN_FINGERPRINT = (
    "checkpoint_every",
    "eval_every",
    "resume",
    "compile",
    "nnodes",
    "rdzv_timeout_s",
    "collective_timeout_s",
)

# How the batch is split (micro_batch x accumulation) is not in it either where the split
# changes only float rounding (see split_changes_result): a run resumes or is restored on a
# GPU that fits another micro-batch. A variant's own recipe keys are in the recipe, merged.
RECIPE_IN_SPEC = ("pretrain", "finetune")

LOG_EVERY = 10  # steps between host syncs (loss read-back, log rows, NaN check, stop agreement)


class TrainingDiverged(UserError):
    pass


@dataclass
class RunPaths:
    weights: Path | None  # the trained model (state_dict + what evaluate needs to rebuild it); None: a
    # measuring fit whose weights nobody reads (the GPU proof's): not gathered, written or recorded
    metrics: Path  # flat JSON summary
    plots: Path  # folder of train.tsv / eval.tsv


@dataclass
class TrainingJob:
    """One training run as a stage asks for it: the network, its data and recipe, where it
    writes, and what else makes it this run."""

    model: torch.nn.Module
    data: Split
    recipe: TrainParams
    paths: RunPaths
    val: Split | None  # None or empty: no validation
    run_config: dict  # the rest of the run's identity (spec, dataset, sizes): part of its fingerprint
    fresh_key: str  # the param that starts it over ("train.resume"); its section names the errors
    weights_meta: dict  # saved beside the final weights (what evaluate needs to rebuild the network)
    desc: str  # the stage's name as DVC shows it ("train_scratch@0")
    quiet: bool = False  # no progress bar
    store_dir: Path | None = None  # the checkpoint store's folder; None: the machine's (VITPIPE_CHECKPOINT_DIR, ...)


class Pending(NamedTuple):
    """A step's results still on the device: read back at the next host sync."""

    step: int
    lr: float
    loss: torch.Tensor
    grad_norm: torch.Tensor
    host_time: float
    data_s: float = 0.0  # host seconds making its batches (in the background when prefetching)
    wait_s: float = 0.0  # seconds the step waited for them


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


# Out of device memory inside a library: cuBLAS, cuDNN and the CUDA runtime report a failed
# allocation as a plain RuntimeError, not torch.OutOfMemoryError; the remedy is the same plan.
ALLOCATION_FAILURES = (
    "CUBLAS_STATUS_ALLOC_FAILED",
    "CUBLAS_STATUS_NOT_INITIALIZED",  # cublasCreate without memory
    "CUDNN_STATUS_ALLOC_FAILED",
    "CUDNN_STATUS_NOT_ENOUGH_WORKSPACE",
    "CUDA error: out of memory",
    "CUDA out of memory",
)


def channels_last_for(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether the run feeds `model` channels-last images (and, replicated, keeps its weights so):
    a CNN on CUDA."""
    from vitpipe.models import prefers_channels_last

    return device.type == "cuda" and prefers_channels_last(model)


def split_changes_result(model: torch.nn.Module) -> bool:
    """Whether splitting a batch into other micro-batches changes a run's numbers beyond float
    rounding. Accumulating micro-batch gradients, each loss scaled by its share, is the same
    update as the whole batch's, and the data and augmentation are drawn per batch; but
    BatchNorm normalises by each micro-batch's own statistics (and updates its running ones
    per micro-batch), and dropout / drop-path draw their masks per micro-batch forward."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            return True
        if (isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0) or getattr(m, "drop_prob", 0) > 0:
            return True
    return False


def is_allocation_failure(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or any(k in str(e) for k in ALLOCATION_FAILURES)


def fit(job: TrainingJob) -> dict:
    """Train `job.model` on `job.data` for recipe.steps optimizer steps; returns the metrics it
    wrote. Checkpoints go to the machine's checkpoint store (vitpipe.checkpoints.store),
    keyed by the run's fingerprint."""
    d = setup_distributed(job.recipe.collective_timeout_s)
    try:
        run = Run(d, job)
        if run.restored is not None:  # finished on some machine sharing the store or its mirror
            return run.restored
        with (
            Sampler(run.device) as run.sampler,
            StopRequested() as run.stop,
            CoreShare(run.device, run.store.root / ".running", d.world) as run.cores,
        ):
            try:
                while run.step < run.recipe.steps:
                    run.train_step()
                    if run.at_sync():
                        run.sync()
                return run.finish()
            except RuntimeError as e:  # torch.OutOfMemoryError is one
                if d.world > 1 and is_lost_peer(e):
                    raise UserError(
                        lost_peer_message(d.rank, run.section, run.recipe.collective_timeout_s, e)
                    ) from None
                if op := nondeterministic_op(e):
                    raise ParamError(
                        f"{run.section}.deterministic",
                        True,
                        f"false: {op} has no deterministic kernel on {run.device.type} in this torch",
                    ) from None
                if not is_allocation_failure(e):
                    raise
                raise UserError(
                    oom_message(
                        run.recipe,
                        run.section,
                        job.run_config,
                        job.weights_meta.get("num_classes"),
                        run.device,
                        d.world,
                    )
                ) from None
            finally:
                run.input.close()
                if run.bar is not None:
                    run.bar.close()  # an error's line then starts on a line of its own
    finally:
        if d.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class Run:
    """One training run: setup and resume in __init__, then train_step / sync / finish."""

    def __init__(self, d: Dist, job: TrainingJob):
        model, data, recipe, desc = job.model, job.data, job.recipe, job.desc
        val = job.val if job.val is not None and len(job.val) else None  # data.split val 0: no validation
        self.d, self.model, self.data, self.recipe, self.paths, self.val = d, model, data, recipe, job.paths, val
        self.run_config, self.weights_meta, self.desc, self.quiet = job.run_config, job.weights_meta, desc, job.quiet
        self.section, self.fresh_key = job.fresh_key.split(".")[0], job.fresh_key
        self.device = pick_device(d)
        use_deterministic_kernels(recipe.deterministic, self.device)
        # auto -> the precision this device runs natively; bf16 on a card without it is a param error
        recipe = self.recipe = replace(
            recipe, precision=precision.resolve(recipe.precision, self.device, f"{self.section}.precision")
        )
        # ddp | fsdp (auto: what the cost model says fits); "none" for one process
        recipe = self.recipe = replace(
            recipe,
            parallel=sharding.resolve(
                recipe.parallel, d.world, self.section, lambda: sharding.replicated_fits(job, recipe, self.device)
            ),
        )
        if recipe.accum_steps % d.world:
            raise ParamError(
                f"{self.section}.micro_batch",
                recipe.micro_batch,
                f"a size that splits batch_size="
                f"{recipe.batch_size} into a multiple of {d.world} micro-batches (one share per process)",
            )
        # What makes this run this run: the params that change its numbers, the weights it starts
        # from (fine-tuning from other pretrained weights is another run) and the data it reads.
        # The number of processes too under DDP: per-process RNG streams and the order of the
        # all-reduced sums depend on it, and its full-state file resumes bit-exact only there. Not
        # for a sharded run: its global batch, data order (self.mine) and LR schedule do not depend
        # on it, and DCP reshards its checkpoint for another count (see build).
        self.sharded = recipe.parallel == "fsdp"
        # deterministic: false is every run before the key existed (their checkpoints still resume)
        skip = (
            NOT_IN_FINGERPRINT
            + (("nproc",) if self.sharded else ())
            + (() if recipe.deterministic else ("deterministic",))
        )
        skip += () if split_changes_result(model) else ("micro_batch",)
        spec = job.run_config.get("spec")
        identity = job.run_config | (
            {"spec": {k: v for k, v in spec.items() if k not in RECIPE_IN_SPEC}} if isinstance(spec, dict) else {}
        )
        self.config = (
            {k: v for k, v in asdict(recipe).items() if k not in skip}
            | identity
            | ({} if self.sharded else {"world": d.world})
            | {
                "init_weights": checkpoint.tensors_digest(model.state_dict().values()),
                "train_labels": checkpoint.tensors_digest([data.y]),
                "train_images": list(data.x.shape),
            }
        )
        self.store = CheckpointStore(
            checkpoint.fingerprint(self.config), desc, recipe.steps, directory=job.store_dir, main=d.main
        )
        self.restored = self.find_finished()
        if self.restored is not None:
            return
        ckpt, where = self.find_checkpoint()
        torch.manual_seed(recipe.seed + d.rank)  # dropout etc. differ per process; data order does not
        random.seed(recipe.seed + d.rank)
        np.random.seed(recipe.seed + d.rank)
        self.build(ckpt)
        self.start = self.step = ckpt["step"] if ckpt else 0
        self.last_good = self.start if ckpt else None
        extra = ckpt["extra"] if ckpt else {}
        self.skipped, self.best_val, self.last_val = (
            extra.get("skipped_steps", 0),
            extra.get("best_val"),
            extra.get("last_val"),
        )
        self.elapsed0, rows = (ckpt["elapsed_s"], ckpt["log"]) if ckpt else (0.0, {"train": [], "eval": []})
        self.open_logs(rows)
        if ckpt and d.main and not job.quiet:
            print(f"[{desc}] resuming from {where} at step {self.start}/{recipe.steps}", file=sys.stderr)
            if ckpt["world"] != d.world:  # a sharded run only: the others have the world in their fingerprint
                print(
                    f"[{desc}] the checkpoint was written by {ckpt['world']} processes, resumed by {d.world}: "
                    f"resharded by torch.distributed.checkpoint; from here the numbers are this run's up to the "
                    f"order of reductions (not bit-exact)",
                    file=sys.stderr,
                )
        self.mine = list(range(d.rank, recipe.accum_steps, d.world))  # this process's micro-batches of each step
        self.loss_scale = recipe.micro_batch / recipe.batch_size * d.world  # DDP averages over processes
        self.input = InputPipeline(
            data,
            recipe.seed,
            recipe.batch_size,
            recipe.micro_batch,
            self.mine,
            recipe.augment,
            self.device,
            self.start,
            recipe.steps,
            channels_last=self.channels_last,
        )
        self.loss_value, self.pending = extra.get("train_loss", float("nan")), []  # Pending steps, not read back yet
        self.t_run = self.t_window = now()

    def outputs(self) -> dict[str, Path]:
        """The run's outputs by name, as its finished record holds them."""
        outs = {
            "weights": self.paths.weights,
            "metrics": self.paths.metrics,
            "train.tsv": self.paths.plots / "train.tsv",
        }
        outs = {name: path for name, path in outs.items() if path is not None}
        return outs | ({"eval.tsv": self.paths.plots / "eval.tsv"} if self.val is not None else {})

    def find_finished(self) -> dict | None:
        """The metrics of this fingerprint's finished run, its outputs restored, when the local
        store or the mirror holds a record that verifies; None: train. Rank 0 decides (and
        applies resume: fresh); every process returns with it."""
        d, metrics = self.d, None
        if d.main:
            if self.recipe.resume == "fresh":
                self.store.discard()
            # verified before any output is replaced: its weights must load into this model's shapes
            record = self.store.finished_record({k: v.shape for k, v in self.model.state_dict().items()})
            if record is not None and not self.outputs().keys() <= record.manifest["files"].keys():
                record = None  # a measuring fit's record (no weights) makes no stage's outputs: train
            if record is not None:
                self.store.restore(record, self.outputs())
                self.store.release()
                metrics = json.loads(self.paths.metrics.read_text())
                print(
                    f"[{self.desc}] restored the finished run {self.store.fingerprint} from {record.where}",
                    file=sys.stderr,
                    flush=True,
                )
        if d.world > 1:
            done = torch.tensor([float(metrics is not None)], device=self.device)
            torch.distributed.broadcast(done, 0)
            if done.item() and metrics is None:
                metrics = {}  # as finish() returns on every rank but 0
        return metrics

    def checkpoint_path(self, step: int) -> Path:
        """A step's checkpoint: a sharded run's folder (DCP's shards and rest.pt), else a file."""
        return self.store.folder(step) if self.sharded else self.store.path(step)

    def find_checkpoint(self) -> tuple[dict | None, str]:
        """The newest checkpoint of this fingerprint (rank 0 looks, locally and in the mirror, and
        verifies it; every process then loads the same step from the shared local store)."""
        d, fix = (
            self.d,
            (
                f"remove it with `vitpipe checkpoints rm {self.store.fingerprint}` "
                f"or set {self.fresh_key}: fresh to start this stage over"
            ),
        )
        found = failed = None
        if d.main:
            try:
                found = self.store.latest(fix)
            except UserError as e:  # damaged: told to every process first, so that none waits for a step
                failed = e
        step = found.step if found else 0
        if d.world > 1:  # every process must resume the same step: the local store must be shared
            seen = torch.tensor([-1 if failed else step], device=self.device)
            torch.distributed.broadcast(seen, 0)
            step = int(seen.item())
        if failed is not None:
            raise failed
        if step < 0:
            raise SystemExit(2)  # rank 0 stops with the one line that says why
        path = self.checkpoint_path(step)
        if step and not path.exists():
            raise UserError(
                f"rank {d.rank} cannot see {path}: every node must share the checkpoint store "
                f"(set {checkpoint_store.ENV_DIR} to a shared filesystem)"
            )
        if not step:
            return None, ""
        # kept finished (VITPIPE_CHECKPOINT_KEEP): resumes at its end
        ckpt = checkpoint.read(path / checkpoint_store.REST if self.sharded else path, fix)
        if ckpt["fingerprint"] != self.store.fingerprint:
            raise UserError(
                f"checkpoint {path} belongs to another run (fingerprint "
                f"{ckpt['fingerprint']}, expected {self.store.fingerprint}); {fix}"
            )
        ckpt.setdefault("world", len(ckpt["rng"]))
        return ckpt, (found.where if found else str(self.store.dir))

    def build(self, ckpt):
        """Model on the device, optimizer, precision; the checkpoint's states when resuming."""
        model, recipe, device = self.model, self.recipe, self.device
        self.attention = prepare_model(model, recipe, self.section)
        self.amp_dtype = autocast_dtype(recipe.precision)
        # CNNs run faster channels-last on tensor cores: the input always, the weights where
        # replicated (FSDP2 shards contiguous weights only; cuDNN follows the input's layout)
        self.channels_last = channels_last_for(model, device)
        torch.backends.cudnn.benchmark = self.channels_last and not recipe.deterministic  # autotuning picks per process
        self.state_bytes = None
        compiled = False
        if self.sharded:  # before the optimizer (it holds the shards); moves the model to the device unit by unit
            compiled = sharding.shard(
                model, device, self.d.world, param_dtype=self.amp_dtype, compile_units=recipe.compile
            )
        else:
            model.to(device)
            if self.channels_last:
                model.to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(model, recipe)
        # a no-op unless the precision scales its loss (fp16)
        self.scaler = torch.amp.GradScaler(device.type, enabled=precisions.get(recipe.precision).grad_scaler)
        if ckpt is not None:
            path = self.checkpoint_path(ckpt["step"])
            try:
                if self.sharded:  # each process reads its shards (DCP reshards them for another count)
                    sharding.load_sharded(path, model, self.optimizer)
                else:
                    model.load_state_dict(ckpt["model"])
                    self.optimizer.load_state_dict(ckpt["optimizer"])
                self.scaler.load_state_dict(ckpt["scaler"] or {})
                self.restore_rng(ckpt)
            except Exception as e:
                raise UserError(
                    f"checkpoint {path} does not fit this run ({type(e).__name__}: "
                    f"{str(e)[:160]}); set {self.fresh_key}: fresh"
                ) from None
        self.net = model
        if self.d.world > 1 and not self.sharded:
            self.net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True
            )
        if recipe.compile and not compiled:
            self.net = torch.compile(self.net)

    def restore_rng(self, ckpt: dict):
        """This process's RNG states as they were saved. A process the writer did not have (a
        sharded run resumed on more processes) is seeded from (seed, rank, step) instead:
        deterministic, but not the stream an uninterrupted run would have drawn."""
        rank, step = self.d.rank, ckpt["step"]
        if rank < len(ckpt["rng"]):
            checkpoint.set_rng_state(ckpt["rng"][rank], self.device)
            return
        seed_everything(hash((self.recipe.seed, rank, step)) % 2**32)

    def open_logs(self, rows: dict):
        self.log = self.eval_log = self.bar = None
        if not self.d.main:
            return
        self.log = StepLog(self.paths.plots / "train.tsv", TRAIN_COLUMNS, rows["train"])
        if self.val is not None:
            self.eval_log = StepLog(self.paths.plots / "eval.tsv", EVAL_COLUMNS, rows["eval"])
        if not self.quiet:
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.recipe.steps,
                initial=self.start,
                desc=self.desc,
                unit="step",
                dynamic_ncols=True,
                mininterval=1.0,
            )

    def train_step(self):
        """One optimizer step: accumulate this process's micro-batches, clip, update."""
        r, mb = self.recipe, self.recipe.micro_batch
        lr = lr_at(self.step, r)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        step_loss = torch.zeros((), device=self.device)
        for n, m in enumerate(self.mine):
            x, y = self.input.get(self.step, m)  # made ahead, in the background
            # DDP all-reduces gradients once per step: after this process's last micro-batch
            with sharding.gradient_sync(self.net, n == len(self.mine) - 1):
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    loss = F.cross_entropy(self.net(x), y, label_smoothing=r.label_smoothing)
                self.scaler.scale(loss * self.loss_scale).backward()
            step_loss += loss.detach() * (mb / r.batch_size)
        self.scaler.unscale_(self.optimizer)  # clip the true gradients
        norm = sharding.plain(torch.nn.utils.clip_grad_norm_(self.model.parameters(), r.grad_clip or float("inf")))
        self.scaler.step(self.optimizer)  # fp16: skips the update when its gradients overflowed
        self.scaler.update()
        if self.state_bytes is None:  # once: grads and optimizer state exist only now
            self.state_bytes = sharding.state_bytes(self.model, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.pending.append(Pending(self.step, lr, step_loss, norm, now(), *self.input.take_times()))

    def evaluating(self) -> bool:
        every = self.recipe.eval_every  # null: only at the end
        return self.val is not None and ((every and self.step % every == 0) or self.step == self.recipe.steps)

    def checkpointing(self) -> bool:
        return self.step % self.recipe.checkpoint_every == 0 and self.step < self.recipe.steps

    def at_sync(self) -> bool:
        s = self.step
        return s % LOG_EVERY == 0 or self.evaluating() or self.checkpointing() or s == self.recipe.steps

    def sync(self):
        """Host sync, at the same steps in every process: read back, check, log, evaluate,
        checkpoint, agree on stopping."""
        d, r = self.d, self.recipe
        flag = torch.tensor([float(self.stop.signal is not None)], device=self.device)
        shared = torch.cat([torch.stack([p.loss for p in self.pending]), flag])
        if d.world > 1:
            torch.distributed.all_reduce(shared)  # sums each process's share of the loss, and the flags
        shared, norms = shared.tolist(), torch.stack([p.grad_norm for p in self.pending]).tolist()
        t_sync = now()
        rate = r.batch_size * len(self.pending) / (t_sync - self.t_window)
        seconds_per_step = (t_sync - self.t_run) / (self.step - self.start)
        memory_mb = self.sampler.step_memory_mb()
        for (s, lr_s, _, _, t, data_s, wait_s), loss_s, norm_s in zip(self.pending, shared, norms):
            self.check_finite(s, loss_s, norm_s)
            self.skipped += not math.isfinite(norm_s)  # fp16 overflow: the scaler skipped this update
            self.loss_value = loss_s
            if d.main:
                self.log.write(
                    step=s,
                    loss=loss_s,
                    lr=lr_s,
                    img_per_s=rate,
                    img_per_s_per_device=rate / d.world,
                    elapsed_s=self.elapsed0 + t - self.t_run,
                    eta_s=(r.steps - s) * seconds_per_step,
                    memory_mb=memory_mb,
                    data_ms=1e3 * data_s,
                    data_wait_ms=1e3 * wait_s,
                )
        self.pending.clear()
        if self.bar:
            self.bar.update(self.step - self.bar.n)
            self.bar.set_postfix(
                loss=f"{self.loss_value:.3f}", img_s=f"{rate:.0f}", **self.sampler.live(), refresh=False
            )
        if self.log:
            self.log.flush()
        if self.evaluating() and (d.main or self.sharded):  # a sharded forward needs every process
            self.last_val = accuracy(self.model, self.val, self.device, amp_dtype=self.amp_dtype)
            self.best_val = max(self.best_val or 0.0, self.last_val["top1"])
        if self.evaluating() and d.main:
            self.eval_log.write(
                step=self.step,
                val_acc=self.last_val["top1"],
                val_loss=self.last_val["loss"],
                elapsed_s=self.elapsed0 + now() - self.t_run,
            )
            self.eval_log.flush()
        stopping = shared[-1] > 0 and self.step < r.steps
        if self.checkpointing() or stopping:
            self.save_checkpoint()
        if stopping:
            self.stop_now()
        self.cores.rebalance()
        self.t_window = now()  # img/s counts training only, not evaluation or checkpoints

    def check_finite(self, s: int, loss_s: float, norm_s: float):
        if math.isfinite(loss_s) and (math.isfinite(norm_s) or self.scaler.is_enabled()):
            return
        where = (
            f"the last good checkpoint is step {self.last_good} in {self.store.dir}"
            if self.last_good
            else "no checkpoint was written yet"
        )
        what = f"loss is {loss_s}" if not math.isfinite(loss_s) else f"gradient norm is {norm_s}"
        raise TrainingDiverged(
            f"[{self.desc}] {what} at step {s} ({where}); resuming it with the same params "
            f"diverges the same way: lower {self.section}.lr or use precision fp32/bf16, with "
            f"{self.section}.resume: fresh"
        )

    def save_checkpoint(self, finished: bool = False):
        d = self.d
        rng = [checkpoint.rng_state(self.device)]
        if d.world > 1:
            rng = [None] * d.world
            torch.distributed.all_gather_object(rng, checkpoint.rng_state(self.device))
        if self.sharded:  # every process writes its shards into a temp folder; rank 0 adds the rest
            folder = self.store.temp_folder(self.step)
            shards = sharding.save_sharded(folder, self.model, self.optimizer, d.rank, d.world)
            path, model, optimizer = folder / checkpoint_store.REST, None, None
        else:
            path, model, optimizer = self.store.path(self.step), self.model, self.optimizer
        if d.main:
            self.log.flush()
            checkpoint.save(
                path,
                model=model,
                optimizer=optimizer,
                scaler=self.scaler,
                step=self.step,
                elapsed_s=self.elapsed0 + now() - self.t_run,
                config=self.config,
                rng=rng,
                finished=finished,
                log={"train": self.log.rows, "eval": self.eval_log.rows if self.eval_log else []},
                extra={
                    "best_val": self.best_val,
                    "skipped_steps": self.skipped,
                    "train_loss": self.loss_value,
                    "last_val": self.last_val,
                },
            )
            if self.sharded:
                self.store.commit_folder(self.step, shards)  # renamed into place, then its manifest
            else:
                self.store.commit(self.step)
        self.last_good = self.step

    def max_state_bytes(self) -> int:
        """The most parameter + gradient + optimizer-state bytes any process held (0: no step ran)."""
        held = torch.tensor([self.state_bytes or 0], dtype=torch.int64, device=self.device)
        if self.d.world > 1:
            torch.distributed.all_reduce(held, op=torch.distributed.ReduceOp.MAX)
        return int(held.item())

    def stop_now(self):
        if self.d.world > 1:
            torch.distributed.barrier()  # nobody exits before rank 0 has saved
        if self.d.main:
            self.store.wait_for_upload()
            print(
                f"\n[{self.desc}] stopped by signal at step {self.step}; checkpoint saved to "
                f"{self.store.path(self.step)}; run the stage again to resume",
                file=sys.stderr,
            )
        sys.exit(128 + (self.stop.signal or 15))

    def finish(self) -> dict:
        """Outputs first, then the store records them (locally and in the mirror) and the
        checkpoints go: killed in between, a re-run resumes from the last periodic checkpoint
        and writes them again."""
        d, r = self.d, self.recipe
        wall = self.elapsed0 + now() - self.t_run
        metrics = {}
        state_bytes = self.max_state_bytes()
        final = None
        if self.paths.weights is not None:
            final = sharding.full_model_state(self.model) if self.sharded else self.model.state_dict()  # a collective
        if d.main:
            if self.bar:
                self.bar.close()
            metrics = {
                "steps": r.steps,
                "batch_size": r.batch_size,
                "train_loss": round(self.loss_value, 5),
                "wall_time_s": round(wall, 2),
                "img_per_s": round(r.steps * r.batch_size / wall, 2) if wall > 0 else 0.0,
                "img_per_s_per_device": round(r.steps * r.batch_size / wall / d.world, 2) if wall > 0 else 0.0,
                "devices": d.world,
                "device": self.device.type,
                "params": sum(p.numel() for p in self.model.parameters()),
                "train_images": len(self.data),
                "skipped_steps": int(self.skipped),
                "attention": self.attention,
                "precision": r.precision,
                "parallel": r.parallel,
                "state_bytes_per_process": state_bytes,  # weights + grads + optimizer state, the largest process's
            }
            if self.last_val is not None:
                metrics |= {"val_acc": round(self.last_val["top1"], 5), "best_val_acc": round(self.best_val, 5)}
            metrics |= self.sampler.summary()
            if final is not None:
                torch_save(self.paths.weights, {"state_dict": final, **self.weights_meta})
            write_json(self.paths.metrics, metrics)
        if self.store.keep and self.step > self.start:  # resumed at its end: its final checkpoint is there already
            self.save_checkpoint(finished=True)
        if d.main:
            self.log.close()
            if self.eval_log:
                self.eval_log.close()
            self.store.finish(self.outputs(), self.config)
        if d.world > 1:
            torch.distributed.barrier()
        return metrics
