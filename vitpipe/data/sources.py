"""The source interface: how a dataset gets from its origin into `data/raw/<dataset>/`
(the download stage) and from there into images the preprocess stage can resize.

A source is named by `data.dataset`. It does two things, one per stage:
  fetch(cfg, raw_dir)  download or import, verify, and leave the raw inputs in raw_dir
  open(cfg, raw_dir)   read raw_dir back as a RawDataset (labels up front, pixels on demand)
Pixels are decoded one image at a time so a big dataset never sits in RAM twice.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from vitpipe.errors import ParamError

if TYPE_CHECKING:
    from vitpipe.params import DataParams


class SkipImage(Exception):
    """An image that cannot be decoded (truncated, unknown format): counted and left out."""

    def __init__(self, path, reason: str):
        super().__init__(str(path), reason)  # both in args: stays picklable
        self.path, self.reason = str(path), reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class ImageList:
    """One split: `labels` up front, `image(i)` decodes image i as HxWx3 uint8 RGB.
    Subclasses must be picklable: preprocess decodes in worker processes."""

    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> np.ndarray:
        raise NotImplementedError


class ArrayImages(ImageList):
    """Images already in memory: NHW (grayscale) or NHWC uint8."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)

    def image(self, i: int) -> np.ndarray:
        return to_rgb(self.images[i])


def to_rgb(img: np.ndarray) -> np.ndarray:
    """HxW, HxWx1, HxWx3 or HxWx4 uint8 -> HxWx3 uint8."""
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == 1:
        return np.repeat(img, 3, axis=2)
    if img.shape[2] == 4:
        return img[:, :, :3]
    return img


@dataclass
class RawDataset:
    classes: list[str]
    splits: dict[str, ImageList]  # always "train"; "test" when the dataset has an official test split
    warnings: list[str] = field(default_factory=list)  # odd but usable input, recorded by preprocess


class Source(Protocol):
    def fetch(self, cfg: "DataParams", raw_dir: Path) -> None: ...

    def open(self, cfg: "DataParams", raw_dir: Path) -> RawDataset: ...


@dataclass(frozen=True)
class SourceFacts:
    """What a source is, known before anything is downloaded: its code ("module:Class",
    imported on demand so the embedded default never imports the rest), its class count
    (None: read from the data, an image folder) and whether it ships its own test split
    (kept whatever `data.split.test` says)."""

    loader: str
    classes: int | None
    official_test: bool


SOURCES = {
    "digits": SourceFacts("vitpipe.data.digits:DigitsSource", 10, official_test=False),
    "cifar10": SourceFacts("vitpipe.data.cifar:Cifar10Source", 10, official_test=True),
    "cifar100": SourceFacts("vitpipe.data.cifar:Cifar100Source", 100, official_test=True),
    "pets": SourceFacts("vitpipe.data.pets:PetsSource", 37, official_test=True),
    "imagefolder": SourceFacts("vitpipe.data.imagefolder:ImageFolderSource", None, official_test=False),
}


def facts(name: str) -> SourceFacts:
    if name not in SOURCES:
        raise ParamError("data.dataset", name, "one of: " + ", ".join(SOURCES))
    return SOURCES[name]


def get_source(name: str) -> Source:
    module, cls = facts(name).loader.split(":")
    return getattr(importlib.import_module(module), cls)()


def check_split(cfg: "DataParams") -> None:
    """A test split to score on: the source's own, or a `data.split.test` share of its images."""
    if cfg.split["test"] <= 0 and not facts(cfg.dataset).official_test:
        raise ParamError("data.split", cfg.split, f"a test fraction > 0 ({cfg.dataset} has no official test split)")


def class_count(dataset: str, prepared_dir: Path | None = None) -> int | None:
    """Classes of the dataset's head: the source's own count, else (an image folder) its
    prepared meta.json's if there is one, else None."""
    known = facts(dataset).classes
    if known is not None or prepared_dir is None:
        return known
    import json

    try:
        return len(json.loads((Path(prepared_dir) / "meta.json").read_text())["classes"])
    except (OSError, ValueError, KeyError):
        return None
