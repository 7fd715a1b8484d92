"""The prepared store: uint8 NHWC arrays per split + meta.json, and the batches training reads.

Layout of data/prepared/<dataset>/:
  {train,val,test}_x.npy  uint8 N x H x W x 3      {train,val,test}_y.npy  int64 N
  meta.json  classes, sizes, per-channel mean/std  samples.png  a grid of training images
Small splits are held in RAM as one tensor; big ones stay memory-mapped. Either way a batch
is a gather + one float conversion: no PIL, no per-image Python in the loop.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

SPLITS = ("train", "val", "test")
IN_RAM_BYTES = 2 << 30  # splits below 2 GiB are loaded; above, memory-mapped
SMALL_IMAGE = 48 * 48  # pixels up to which augmentation gathers all windows at once (faster than a loop per image)


class PreparedStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.exists():
            from vitpipe.errors import UserError

            raise UserError(f"{meta_path} not found: run `dvc repro preprocess` first")
        self.meta = json.loads(meta_path.read_text())
        self.classes: list[str] = self.meta["classes"]
        self.num_classes: int = self.meta["num_classes"]
        self.image_size: int = self.meta["image_size"]

    def split(self, name: str) -> "Split":
        x = np.load(self.root / f"{name}_x.npy", mmap_mode="r")
        y = np.load(self.root / f"{name}_y.npy")
        if x.nbytes <= IN_RAM_BYTES:
            x = np.ascontiguousarray(x)
        return Split(x, y, self.meta["mean"], self.meta["std"], hflip=self.meta.get("hflip", True))


class Split:
    """One split of the store and the normalised float batches made from it."""

    def __init__(self, x: np.ndarray, y: np.ndarray, mean, std, hflip: bool = True):
        self.x, self.y = x, torch.from_numpy(np.asarray(y, dtype=np.int64))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.y)

    def fraction(self, fraction: float, seed: int) -> "Split":
        """A stratified `fraction` of this split (every class kept in proportion, at least one
        image each), the same for the same seed: how much data a model needs, with the
        val and test splits left as they are."""
        if fraction >= 1:
            return self
        y = self.y.numpy()
        rng = np.random.default_rng(seed)
        keep = [
            rng.permutation(np.flatnonzero(y == c))[: max(1, round(fraction * int((y == c).sum())))]
            for c in np.unique(y)
        ]
        idx = np.sort(np.concatenate(keep))
        out = Split(np.asarray(self.x[idx]), y[idx], [0.0] * 3, [1.0] * 3, self.hflip)
        out.mean, out.std = self.mean, self.std  # the store's normalisation, not the subset's
        return out

    def batch(self, idx: np.ndarray, augment: bool = False, generator: torch.Generator | None = None):
        """(images float32 NCHW normalised, labels int64) for sample indices `idx`."""
        x, y = self.images(idx, augment, generator)
        return self.normalise(x), y

    def images(
        self,
        idx: np.ndarray,
        augment: bool = False,
        generator: torch.Generator | None = None,
        out: torch.Tensor | None = None,
        draws: tuple[np.ndarray, int] | None = None,
        threads: int = 1,
    ):
        """(images uint8 NCHW, labels int64) for sample indices `idx`, augmented in uint8 (a
        quarter of float32's bytes to move); into `out` (a pinned buffer, say) when given.
        `draws`: (which of its batch's random draws each image of `idx` takes, the batch's size),
        for a micro-batch whose augmentation must not depend on how its batch is split. `threads`:
        how many threads shift and flip large images (the same bytes for any number)."""
        order = np.argsort(np.asarray(idx), kind="stable")
        idx = np.asarray(idx)[order]  # sorted: sequential reads from a memmap; order within a batch is irrelevant
        y = self.y[torch.from_numpy(idx)]
        h, w = self.x.shape[1:3]
        if augment and h * w > SMALL_IMAGE:  # each image read by the thread that shifts it: no serial gather
            x = StoreRows(self.x, idx)
        else:
            x = torch.from_numpy(np.ascontiguousarray(self.x[idx])).permute(0, 3, 1, 2)
        if augment:
            x = shift_and_flip(
                x,
                generator,
                self.hflip,
                out=out,
                draws=None if draws is None else (draws[0][order], draws[1]),
                threads=threads,
            )
        elif out is not None:
            x = out[: len(idx)].copy_(x)
        return x, y

    def normalise(self, x: torch.Tensor, mean: torch.Tensor | None = None, std: torch.Tensor | None = None):
        """uint8 images -> float32, normalised by the store's statistics (`mean`/`std`: the
        same, already on x's device)."""
        out = x.to(torch.float32, copy=True)  # normalised in place: the same operations as (x - mean) / std
        return out.sub_(self.mean if mean is None else mean).div_(self.std if std is None else std)


class StoreRows:
    """Images `idx` of an NHWC uint8 store as N CHW views, each read only when indexed: large
    images are gathered by the threads that shift them, in parallel (one serial gather of a
    224 px micro-batch of 256 was 7 ms of the producer's 43 and capped two threads at 1.35x)."""

    def __init__(self, store: np.ndarray, idx: np.ndarray):
        self.store, self.idx = store, idx
        h, w, c = store.shape[1:]
        self.shape, self.dtype = (len(idx), c, h, w), torch.uint8

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self.store[self.idx[i]]).transpose(2, 0, 1)  # numpy: a read-only memmap stays so


def shift_and_flip(
    x: torch.Tensor | StoreRows,
    generator: torch.Generator | None,
    hflip: bool,
    out: torch.Tensor | None = None,
    draws: tuple[np.ndarray, int] | None = None,
    threads: int = 1,
) -> torch.Tensor:
    """Random translation by up to 1/8 of the side (zero-padded crop), and a random
    horizontal flip where the dataset allows it; into `out` when given. Small images: one
    numpy gather from a strided view of all windows of a padded copy; large ones: one window
    copy per image (no padded copy), spread over `threads`. The same draws, the same numbers.
    `draws` (which, total):
    the draws are made for `total` images and image i takes draw which[i] (a micro-batch's
    share of its whole batch's draws); None: n draws, in order."""
    n, c, h, w = x.shape
    pad = max(1, h // 8)
    total, which = (n, slice(None)) if draws is None else (draws[1], torch.from_numpy(np.asarray(draws[0])))
    dy = torch.randint(0, 2 * pad + 1, (total,), generator=generator)[which]  # row offset into the padded image
    dx = torch.randint(0, 2 * pad + 1, (total,), generator=generator)[which]
    flip = (torch.rand(total, generator=generator) < 0.5)[which] if hflip else torch.zeros(n, dtype=torch.bool)
    if h * w <= SMALL_IMAGE:
        # numpy, not torch: its fancy index copies each window as a block, where torch's index
        # kernel goes element by element, and a flip is a negative stride, not a torch.where
        # (a 32-image 32 px batch: 60 µs against 181)
        padded = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=np.uint8)
        padded[:, :, pad : pad + h, pad : pad + w] = x.numpy()
        sn, sc, sh, sw = padded.strides
        windows = np.lib.stride_tricks.as_strided(
            padded, (n, 2 * pad + 1, 2 * pad + 1, c, h, w), (sn, sh, sw, sc, sh, sw), writeable=False
        )
        shifted = windows[np.arange(n), dy.numpy(), dx.numpy()]
        flipped = flip.numpy()
        shifted[flipped] = shifted[flipped][..., ::-1]
        if out is None:
            return torch.from_numpy(shifted)
        return out[:n].copy_(torch.from_numpy(shifted))
    out = torch.empty((n, c, h, w), dtype=x.dtype) if out is None else out[:n]
    shifts = list(zip((dy - pad).tolist(), (dx - pad).tolist(), flip.tolist()))
    src, dst = (x.numpy() if isinstance(x, torch.Tensor) else x), out.numpy()  # numpy's copies release the GIL

    def copy_windows(first: int, end: int):
        dst[first:end] = 0  # the zero padding
        for i in range(first, end):
            sy, sx, f = shifts[i]
            window = src[i][:, max(0, sy) : h + min(0, sy), max(0, sx) : w + min(0, sx)]
            if f:  # flipped after the shift: the window lands mirrored, at the mirrored columns
                dst[i, :, max(0, -sy) : h - max(0, sy), max(0, sx) : w - max(0, -sx)] = window[..., ::-1]
            else:
                dst[i, :, max(0, -sy) : h - max(0, sy), max(0, -sx) : w - max(0, sx)] = window

    in_chunks(copy_windows, n, threads)
    return out


def in_chunks(work, n: int, threads: int) -> None:
    """work(first, end) over 0..n in `threads` contiguous chunks at once (the copies release the
    GIL); each image is one chunk's alone, so the bytes are the same for any number of threads.
    Large images only: their per-image time is memory copies (a 224 px micro-batch of 256: about
    26 ms on one core here), where an all-windows gather measured slower (33 ms, the padded copy)."""
    if threads <= 1 or n < 2 * threads:
        work(0, n)
        return
    bounds = np.linspace(0, n, threads + 1).astype(int).tolist()
    list(_pool(threads).map(work, bounds[:-1], bounds[1:]))


_POOLS: dict = {}


def _pool(threads: int):
    from concurrent.futures import ThreadPoolExecutor

    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="vitpipe-augment")
    return _POOLS[threads]


class SampleStream:
    """The data order of a run as a pure function of (seed, position): sample k of the
    infinite stream is permutation_{k // n}[k % n]. A resumed run asks for the same
    positions and gets the same batches, with no loader state to save."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).numpy()
        return self._perm

    def take(self, start: int, count: int) -> np.ndarray:
        out = np.empty(count, dtype=np.int64)
        filled = 0
        while filled < count:
            pos = start + filled
            epoch, offset = divmod(pos, self.n)
            chunk = self._permutation(epoch)[offset : offset + count - filled]
            out[filled : filled + len(chunk)] = chunk
            filled += len(chunk)
        return out


def write_sample_grid(
    x: np.ndarray, y: np.ndarray, classes: list[str], path: Path, per_class: int = 4, max_classes: int = 10
) -> None:
    """A PNG of `per_class` training images for up to `max_classes` classes, labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vitpipe.atomic import atomic_path

    shown = sorted(set(int(c) for c in np.unique(y)))[:max_classes]
    fig, axes = plt.subplots(per_class, len(shown), figsize=(1.2 * len(shown), 1.2 * per_class + 0.4), squeeze=False)
    for col, c in enumerate(shown):
        idx = np.flatnonzero(y == c)[:per_class]
        for row in range(per_class):
            ax = axes[row][col]
            ax.axis("off")
            if row < len(idx):
                ax.imshow(x[idx[row]], interpolation="nearest")
        axes[0][col].set_title(classes[c][:12], fontsize=8)
    fig.suptitle(f"Training samples ({x.shape[1]}x{x.shape[2]} px)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
