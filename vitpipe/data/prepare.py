"""The preprocess stage's work: split, resize once, and write the prepared store.

Images are decoded and resized in worker processes straight into memory-mapped arrays,
so even CIFAR at 384 px never sits in RAM twice and no epoch ever touches PIL again.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from vitpipe.atomic import write_json
from vitpipe.data.prepared_store import SPLITS, write_sample_grid
from vitpipe.data.sources import ImageList, SkipImage, get_source

CHUNK = 256  # images per worker task: big enough to amortise the pickling of arguments


def resize(img: np.ndarray, size: int) -> np.ndarray:
    """Square resize to size x size (bicubic, antialiased when shrinking)."""
    if img.shape[0] == size and img.shape[1] == size:
        return img
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC))


def stratified_split(labels: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Indices per split with every class spread in proportion (same seed, same split)."""
    rng = np.random.default_rng(seed)
    names = [n for n in fractions if fractions[n] > 0]
    total = sum(fractions[n] for n in names)
    out = {n: [] for n in names}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        bounds = np.cumsum([fractions[n] / total for n in names])
        cuts = np.round(bounds * len(idx)).astype(int)
        for n, lo, hi in zip(names, np.r_[0, cuts[:-1]], cuts):
            out[n].append(idx[lo:hi])
    return {n: np.sort(np.concatenate(v)) for n, v in out.items()}


def _decode_chunk(images: ImageList, indices: np.ndarray, size: int, out_path: str, offset: int):
    """Worker: decode+resize images into rows offset.. of the memmap; return which were skipped."""
    out = np.lib.format.open_memmap(out_path, mode="r+")
    ok = np.ones(len(indices), dtype=bool)
    for j, i in enumerate(indices):
        try:
            out[offset + j] = resize(images.image(int(i)), size)
        except SkipImage:
            ok[j] = False
    out.flush()
    return offset, ok


def write_split(images: ImageList, indices: np.ndarray, size: int, path: Path, workers: int) -> tuple[np.ndarray, int]:
    """Decode `indices` of `images` into `<path>` (uint8 NHWC .npy). Returns kept indices, skipped count."""
    tmp = path.with_name(f".{path.name}.tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(indices), size, size, 3))
    del out
    chunks = [(images, indices[s:s + CHUNK], size, str(tmp), s) for s in range(0, len(indices), CHUNK)]
    ok = np.ones(len(indices), dtype=bool)
    if workers > 1 and len(chunks) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for offset, part in pool.map(_decode_chunk, *zip(*chunks)):
                ok[offset:offset + len(part)] = part
    else:
        for args in chunks:
            offset, part = _decode_chunk(*args)
            ok[offset:offset + len(part)] = part
    if not ok.all():  # compact: drop the rows of skipped images
        arr = np.load(tmp, mmap_mode="r")
        kept = np.lib.format.open_memmap(path.with_name(f".{path.name}.kept.npy"), mode="w+",
                                         dtype=np.uint8, shape=(int(ok.sum()), size, size, 3))
        kept[:] = arr[ok]
        kept.flush()
        del arr, kept
        os.replace(path.with_name(f".{path.name}.kept.npy"), tmp)
    os.replace(tmp, path)
    return indices[ok], int((~ok).sum())


def channel_stats(x: np.ndarray, chunk: int = 1024) -> tuple[list[float], list[float]]:
    """Per-channel mean/std in [0,1] units, streamed over a memmap."""
    s = np.zeros(3)
    s2 = np.zeros(3)
    n = 0
    for i in range(0, len(x), chunk):
        b = np.asarray(x[i:i + chunk], dtype=np.float64) / 255.0
        s += b.sum(axis=(0, 1, 2))
        s2 += (b ** 2).sum(axis=(0, 1, 2))
        n += b.shape[0] * b.shape[1] * b.shape[2]
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean ** 2, 1e-12))
    return mean.round(6).tolist(), std.round(6).tolist()


def prepare(cfg) -> dict:
    """Read cfg.raw_dir through the dataset's source, write cfg.prepared_dir. Returns meta."""
    raw = get_source(cfg.dataset).open(cfg, cfg.raw_dir)
    out_dir = Path(cfg.prepared_dir)
    # Build into a sibling folder and swap it in at the end: never a half-written store.
    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)

    frac = cfg.split
    if "test" in raw.splits:  # official test split kept; val carved from train
        pool = raw.splits["train"]
        parts = stratified_split(pool.labels, {"train": frac["train"], "val": frac["val"]}, cfg.seed)
        plan = {"train": (pool, parts["train"]), "test": (raw.splits["test"], np.arange(len(raw.splits["test"])))}
        if "val" in parts:
            plan["val"] = (pool, parts["val"])
    else:
        pool = raw.splits["train"]
        parts = stratified_split(pool.labels, frac, cfg.seed)
        plan = {n: (pool, parts[n]) for n in parts}

    sizes, skipped = {}, {}
    for name in SPLITS:
        images, idx = plan.get(name, (pool, np.zeros(0, dtype=np.int64)))
        kept, n_skipped = write_split(images, idx, cfg.image_size, tmp_dir / f"{name}_x.npy", cfg.workers)
        np.save(tmp_dir / f"{name}_y.npy", images.labels[kept].astype(np.int64))
        sizes[name], skipped[name] = len(kept), n_skipped

    train_x = np.load(tmp_dir / "train_x.npy", mmap_mode="r")
    mean, std = channel_stats(train_x)
    meta = {
        "dataset": cfg.dataset,
        "classes": list(map(str, raw.classes)),
        "num_classes": len(raw.classes),
        "image_size": cfg.image_size,
        "sizes": sizes,
        "skipped": skipped,
        "skipped_total": sum(skipped.values()),
        "official_test_split": "test" in raw.splits,
        "hflip": cfg.dataset != "digits",  # mirrored digits are other symbols; photos stay photos
        "mean": mean,
        "std": std,
    }
    write_json(tmp_dir / "meta.json", meta)
    train_y = np.load(tmp_dir / "train_y.npy")
    write_sample_grid(train_x, train_y, meta["classes"], tmp_dir / "samples.png")
    del train_x
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp_dir, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, out_dir)
    return meta

