"""The batches a run trains on, made ahead of the step that needs them.

A background thread gathers each micro-batch's images from the prepared store (in RAM or
memory-mapped), shifts and flips them in uint8 (large images in chunks over `augment_threads`) and, on a GPU, writes them into pinned
buffers and copies them across the bus on a side stream, while the training loop runs the
steps before. The loop gets uint8 images on its device and converts and normalises them
there: a quarter of float32's bytes cross the bus, and the float work runs on the GPU.

Which images and which augmentation a micro-batch gets is a pure function of
(seed, step, micro-batch): SampleStream for the order, a generator seeded from (seed, step)
for the random draws, made for the whole batch, each image taking the draw of its place in
the sorted batch: how the batch is split into micro-batches changes no image. Prefetching changes only *when* a batch is made, never its numbers,
so a run resumed at step k (whose pipeline starts at k) trains on the same batches as an
uninterrupted one, and `prefetch=0` (made on demand, in the loop's thread) gives the same
numbers as any depth. On the CPU the thread runs only where torch leaves a core free.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import NamedTuple

import numpy as np
import torch

from vitpipe.data.prepared_store import SampleStream, Split
from vitpipe.hardware.probe import cpu_count

PREFETCH = 4  # micro-batches made ahead: enough to hide a slow one, little device memory (uint8)
AUGMENT_THREADS = 4  # at most, per process on a GPU (2 threads: 1.5x one at 224 px here; docs/training.md)


def augment_threads(device: torch.device) -> int:
    """Threads that gather, shift and flip a micro-batch's large images: on a GPU, the cores
    this process's share of the machine leaves beside its loop thread (torchrun's
    LOCAL_WORLD_SIZE processes share it), at most AUGMENT_THREADS; on the CPU one, the step
    has the cores."""
    import os

    if device.type != "cuda":
        return 1
    share = cpu_count() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(AUGMENT_THREADS, share - 1))


def spare_core() -> bool:
    """Whether this process has a core that torch's threads leave free. When the step uses
    every core (the CPU default), a producer thread takes one from OpenMP's team mid-step
    and the whole step waits for it: on 2 cores that cost 10 % of the step for 1 % of work.
    Then the batches are made on demand, in the loop's thread."""
    return torch.get_num_threads() < cpu_count()


def augmentation_generator(seed: int, step: int) -> torch.Generator:
    """The random draws of the batch of `step` (all its micro-batches): a function of the two,
    nothing else."""
    return torch.Generator().manual_seed(seed * 7_919 + step * 131)


class MicroBatch(NamedTuple):
    step: int
    m: int
    x: torch.Tensor  # uint8 NCHW on the device (CUDA), or float32 normalised (CPU)
    y: torch.Tensor
    host_s: float  # host seconds spent making it: gather, augment, pin, launch the copy
    ready: object = None  # CUDA: the event its copy recorded on the side stream


class InputPipeline:
    """The micro-batches of this process, in training order from step `start`: `get(step, m)`
    returns the next one as (x float32 normalised on the device, y), made `prefetch`
    micro-batches ahead by a background thread (0: made on demand)."""

    def __init__(
        self,
        data: Split,
        seed: int,
        batch_size: int,
        micro_batch: int,
        mine: list[int],
        augment: bool,
        device: torch.device,
        start: int,
        steps: int,
        channels_last: bool = False,
        prefetch: int | None = None,
        threads: int | None = None,
    ):
        self.data, self.seed, self.batch_size, self.micro_batch = data, seed, batch_size, micro_batch
        self.mine, self.augment, self.device, self.channels_last = list(mine), augment, device, channels_last
        self.stream = SampleStream(len(data), seed)
        self.threads = augment_threads(device) if threads is None else threads  # the same bytes for any number
        self.mean, self.std = data.mean.to(device), data.std.to(device)
        self.cuda = device.type == "cuda"
        self.order = ((s, m) for s in range(start, steps) for m in self.mine)  # what the producer makes next
        if prefetch is None:  # on the CPU only with a core the training step leaves free (see spare_core)
            prefetch = PREFETCH if self.cuda or spare_core() else 0
        self.prefetch = prefetch
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.host_s = self.wait_s = 0.0  # since the last take_times(): what the step log reports
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device)
            self.pinned = [
                torch.empty((micro_batch, 3, *data.x.shape[1:3]), dtype=torch.uint8, pin_memory=True)
                for _ in range(max(1, prefetch) + 2)
            ]  # a ring: more than the queue can hold
            self.pinned_free = [None] * len(self.pinned)  # the event after which each may be overwritten
            self.slot = 0

    # -- the producer side: pure functions of (seed, step, m), then the move to the device

    def indices(self, step: int, m: int) -> tuple[np.ndarray, tuple[np.ndarray, int]]:
        """Micro-batch m's sample indices and their draws: each image's place in its sorted batch."""
        idx = self.stream.take(step * self.batch_size, self.batch_size)
        place = np.empty(len(idx), dtype=np.int64)
        place[np.argsort(idx, kind="stable")] = np.arange(len(idx))
        mine = slice(m * self.micro_batch, (m + 1) * self.micro_batch)
        return idx[mine], (place[mine], len(idx))

    def make(self, step: int, m: int) -> MicroBatch:
        t = time.perf_counter()
        gen = augmentation_generator(self.seed, step)
        idx, draws = self.indices(step, m)
        if not self.cuda:
            x, y = self.data.images(idx, self.augment, gen, draws=draws, threads=self.threads)
            return MicroBatch(step, m, self.data.normalise(x), y, time.perf_counter() - t)
        slot = self.slot
        self.slot = (slot + 1) % len(self.pinned)
        if self.pinned_free[slot] is not None:
            self.pinned_free[slot].synchronize()  # its last copy to the device has finished
        x, y = self.data.images(idx, self.augment, gen, out=self.pinned[slot], draws=draws, threads=self.threads)
        with torch.cuda.stream(self.copy_stream):
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)  # pageable and tiny: a synchronous copy of a few bytes
            ready = torch.cuda.Event()
            ready.record(self.copy_stream)
        self.pinned_free[slot] = ready
        return MicroBatch(step, m, x, y, time.perf_counter() - t, ready)

    def _produce(self):
        torch.set_num_threads(1)  # per thread: the training step keeps the cores it was given
        if self.cuda and self.device.index is not None:
            torch.cuda.set_device(self.device)
        try:
            for step, m in self.order:
                if not self._put(self.make(step, m)):
                    return
        except BaseException as e:  # noqa: BLE001 — handed to the training loop, which raises it
            self._put(e)

    def _put(self, item) -> bool:
        """Queue `item` once there is room; False when the pipeline is closing."""
        while not self.stopping.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    # -- the consumer side: the training loop's thread

    def get(self, step: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = time.perf_counter()
        if self.prefetch <= 0:
            item = self.make(*next(self.order))
        else:
            if self.thread is None:
                self.thread = threading.Thread(target=self._produce, name="vitpipe-input", daemon=True)
                self.thread.start()
            item = self.queue.get()
            if isinstance(item, BaseException):
                raise item
        if (item.step, item.m) != (step, m):  # the loop and the pipeline disagree on the order: a bug, not data
            raise RuntimeError(
                f"input pipeline out of order: made step {item.step} micro-batch {item.m}, "
                f"the loop wants step {step} micro-batch {m}"
            )
        x, y = item.x, item.y
        if self.cuda:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(item.ready)
            x.record_stream(current)  # its memory stays the loop's until the loop's stream is done with it
            y.record_stream(current)
            x = self.data.normalise(x, self.mean, self.std)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        self.host_s += item.host_s
        self.wait_s += time.perf_counter() - t  # blocked for data (prefetch 0: all of its making)
        return x, y

    def take_times(self) -> tuple[float, float]:
        """(host seconds making the batches, seconds the loop waited for them) since the last call."""
        times = self.host_s, self.wait_s
        self.host_s = self.wait_s = 0.0
        return times

    def close(self):
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
