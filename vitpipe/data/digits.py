"""The embedded default: scikit-learn's handwritten digits (1,797 8x8 images, 10 classes),
real data shipped inside the package, so the pipeline runs with no network at all."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vitpipe.atomic import atomic_path
from vitpipe.data.sources import ArrayImages, RawDataset

FILE = "digits.npz"


class DigitsSource:
    def fetch(self, cfg, raw_dir: Path) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        # 0..16 intensities -> 0..255 uint8, the store's pixel format.
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        with atomic_path(Path(raw_dir) / FILE, suffix=".npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, images=images, labels=digits.target.astype(np.int64))

    def open(self, cfg, raw_dir: Path) -> RawDataset:
        with np.load(Path(raw_dir) / FILE) as z:
            images, labels = z["images"], z["labels"]
        return RawDataset(classes=[str(d) for d in range(10)], splits={"train": ArrayImages(images, labels)})
