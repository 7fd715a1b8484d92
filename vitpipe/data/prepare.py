"""The preprocess stage's work: split, resize once, and write the prepared store.

Images are decoded and resized in worker processes straight into memory-mapped arrays,
so even CIFAR at 384 px never sits in RAM twice and no epoch ever touches PIL again.
Bad data stops it or is recorded: see vitpipe.data.sanity.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from vitpipe.atomic import write_json
from vitpipe.data import sanity
from vitpipe.data.prepared_store import SPLITS, write_sample_grid
from vitpipe.data.sanity import SplitCounts
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
    """Worker: decode+resize images into rows offset.. of the memmap; return which were
    skipped, and the first decode error of each class that lost an image."""
    out = np.lib.format.open_memmap(out_path, mode="r+")
    ok = np.ones(len(indices), dtype=bool)
    errors: dict[int, str] = {}
    for j, i in enumerate(indices):
        try:
            out[offset + j] = resize(images.image(int(i)), size)
        except SkipImage as e:
            ok[j] = False
            errors.setdefault(int(images.labels[i]), str(e))
    out.flush()
    return offset, ok, errors


def write_split(
    images: ImageList, indices: np.ndarray, size: int, path: Path, workers: int
) -> tuple[np.ndarray, int, dict[int, str]]:
    """Decode `indices` of `images` into `<path>` (uint8 NHWC .npy). Returns kept indices,
    skipped count, and one decode error per class that lost images."""
    tmp = path.with_name(f".{path.name}.tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(indices), size, size, 3))
    del out
    chunks = [(images, indices[s : s + CHUNK], size, str(tmp), s) for s in range(0, len(indices), CHUNK)]
    ok = np.ones(len(indices), dtype=bool)
    errors: dict[int, str] = {}
    if workers > 1 and len(chunks) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(_decode_chunk, *zip(*chunks)))
    else:
        results = [_decode_chunk(*args) for args in chunks]
    for offset, part, part_errors in results:
        ok[offset : offset + len(part)] = part
        for c, message in part_errors.items():
            errors.setdefault(c, message)
    if not ok.all():  # compact: drop the rows of skipped images
        arr = np.load(tmp, mmap_mode="r")
        kept = np.lib.format.open_memmap(
            path.with_name(f".{path.name}.kept.npy"), mode="w+", dtype=np.uint8, shape=(int(ok.sum()), size, size, 3)
        )
        kept[:] = arr[ok]
        kept.flush()
        del arr, kept
        os.replace(path.with_name(f".{path.name}.kept.npy"), tmp)
    os.replace(tmp, path)
    return indices[ok], int((~ok).sum()), errors


def channel_stats(x: np.ndarray, chunk: int = 1024) -> tuple[list[float], list[float]]:
    """Per-channel mean/std in [0,1] units, streamed over a memmap."""
    s = np.zeros(3)
    s2 = np.zeros(3)
    n = 0
    for i in range(0, len(x), chunk):
        b = np.asarray(x[i : i + chunk], dtype=np.float64) / 255.0
        s += b.sum(axis=(0, 1, 2))
        s2 += (b**2).sum(axis=(0, 1, 2))
        n += b.shape[0] * b.shape[1] * b.shape[2]
    mean = s / n
    std = np.sqrt(np.maximum(s2 / n - mean**2, 1e-12))
    return mean.round(6).tolist(), std.round(6).tolist()


def _plan(raw, frac: dict, seed: int) -> dict[str, tuple[ImageList, np.ndarray]]:
    """split name -> (images, indices into them)."""
    pool = raw.splits["train"]
    if "test" in raw.splits:  # official test split kept; val carved from train
        parts = stratified_split(pool.labels, {"train": frac["train"], "val": frac["val"]}, seed)
        plan = {"train": (pool, parts["train"]), "test": (raw.splits["test"], np.arange(len(raw.splits["test"])))}
        if "val" in parts:
            plan["val"] = (pool, parts["val"])
    else:
        plan = {n: (pool, idx) for n, idx in stratified_split(pool.labels, frac, seed).items()}
    return {n: plan.get(n, (pool, np.zeros(0, dtype=np.int64))) for n in SPLITS}


def _per_class(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(labels, minlength=num_classes)[:num_classes]


def prepare(cfg) -> dict:
    """Read cfg.raw_dir through the dataset's source, write cfg.prepared_dir. Returns meta."""
    raw = get_source(cfg.dataset).open(cfg, cfg.raw_dir)
    where, num_classes = str(cfg.raw_dir), len(raw.classes)
    plan = _plan(raw, cfg.split, cfg.seed)
    assigned = {n: _per_class(images.labels[idx], num_classes) for n, (images, idx) in plan.items()}
    # A class missing from a split by the split alone fails now, before any decoding.
    sanity.require_every_class(where, raw.classes, {n: SplitCounts(a, a) for n, a in assigned.items()})

    out_dir = Path(cfg.prepared_dir)
    # Build into a sibling folder and swap it in at the end: never a half-written store.
    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    try:
        meta = _write_store(cfg, raw, plan, assigned, tmp_dir)
        _swap_in(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    for line in meta["warnings"]:
        sanity.warn(line)
    return meta


def _write_store(cfg, raw, plan, assigned, tmp_dir: Path) -> dict:
    where, num_classes = str(cfg.raw_dir), len(raw.classes)
    sizes, skipped, counts = {}, {}, {}
    for name, (images, idx) in plan.items():
        kept, n_skipped, errors = write_split(images, idx, cfg.image_size, tmp_dir / f"{name}_x.npy", cfg.workers)
        np.save(tmp_dir / f"{name}_y.npy", images.labels[kept].astype(np.int64))
        sizes[name], skipped[name] = len(kept), n_skipped
        counts[name] = SplitCounts(assigned[name], _per_class(images.labels[kept], num_classes), errors)
    tried = sum(sizes.values()) + sum(skipped.values())
    if tried and not sum(sizes.values()):
        example = next(e for c in counts.values() for e in c.example.values())
        raise sanity.nothing_decodes(where, tried, example, "run `dvc repro download` again to restore them")
    sanity.require_every_class(where, raw.classes, counts)
    thin_warnings, thin = sanity.thin_classes(where, raw.classes, counts)

    train_x = np.load(tmp_dir / "train_x.npy", mmap_mode="r")
    mean, std = channel_stats(train_x)
    meta = {
        "dataset": cfg.dataset,
        "classes": list(map(str, raw.classes)),
        "num_classes": num_classes,
        "image_size": cfg.image_size,
        "sizes": sizes,
        "skipped": skipped,
        "skipped_total": sum(skipped.values()),
        "class_counts": {n: c.kept.tolist() for n, c in counts.items()},
        "thin_classes": thin,
        "warnings": list(raw.warnings) + thin_warnings,
        "official_test_split": "test" in raw.splits,
        "hflip": cfg.dataset != "digits",  # mirrored digits are other symbols; photos stay photos
        "mean": mean,
        "std": std,
    }
    write_json(tmp_dir / "meta.json", meta)
    train_y = np.load(tmp_dir / "train_y.npy")
    write_sample_grid(train_x, train_y, meta["classes"], tmp_dir / "samples.png")
    del train_x
    return meta


def _swap_in(tmp_dir: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp_dir, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, out_dir)


def sanity_metrics(meta: dict) -> dict:
    """The data-sanity keys of metrics/preprocess.json, flat (DVC metrics skip lists)."""
    return {
        "thin_classes": len(meta["thin_classes"]),
        "thin_class_names": ", ".join(meta["thin_classes"]),
        "data_warnings": len(meta["warnings"]),
    }
