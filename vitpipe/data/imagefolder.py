"""A user's own images: a folder of class sub-folders (`cats/x.jpg`, `dogs/y.png` …), given
as the folder itself or as a tar/zip of it. Also home of FileImages, the ImageList over image
files that Oxford-IIIT Pet uses too.

Image files come in every mode and quality; decoding converts any mode to RGB and turns an
undecodable or truncated file into SkipImage, which preprocess counts instead of crashing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

from vitpipe.data.archives import check_md5, is_archive, safe_extract, staging_dir
from vitpipe.data.sources import ImageList, RawDataset, SkipImage, to_rgb
from vitpipe.errors import UserError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}


def decode_image(path: str | Path) -> np.ndarray:
    """Any image file -> HxWx3 uint8 RGB, or SkipImage if it cannot be decoded in full."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, not come back half grey
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith("I;16"):  # 16-bit grayscale: keep the high byte
                return to_rgb((np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8))
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")  # palette transparency must go through RGBA first
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise SkipImage(f"{path}: {e}") from None


class FileImages(ImageList):
    """Image files on disk: paths and labels up front, pixels decoded one at a time."""

    def __init__(self, paths: list[str | Path], labels):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = [str(p) for p in paths]
        self.labels = np.asarray(labels, dtype=np.int64)

    def image(self, i: int) -> np.ndarray:
        return decode_image(self.paths[i])


def _visible(path: Path) -> bool:
    # Skip .DS_Store, ._AppleDouble files and the __MACOSX folder that macOS puts in zips.
    return not path.name.startswith((".", "__MACOSX"))


def is_image_file(path: Path) -> bool:
    return path.is_file() and _visible(path) and path.suffix.lower() in IMAGE_EXTENSIONS


def class_root(folder: Path) -> Path:
    """The folder whose sub-folders are the classes: descends through a single wrapping
    folder (`flowers.zip` -> `flowers/daisy/…`)."""
    while True:
        subdirs = [p for p in folder.iterdir() if p.is_dir() and _visible(p)]
        has_images = any(is_image_file(p) for p in folder.iterdir())
        if len(subdirs) == 1 and not has_images and any(p.is_dir() for p in subdirs[0].iterdir()):
            folder = subdirs[0]
        else:
            return folder


class ImageFolderSource:
    def fetch(self, cfg, raw_dir: Path) -> None:
        raw_dir = Path(raw_dir)
        if not cfg.archive:
            raise UserError("data.dataset: imagefolder needs `data.archive`: a folder of class sub-folders "
                            "(cats/…, dogs/…) or a .tar/.zip of one; or set `data.dataset: digits`, "
                            "the embedded default that needs no network")
        src = Path(cfg.archive)
        if src.is_dir():
            with staging_dir(raw_dir) as tmp:
                _copy_images(class_root(src), tmp)
        elif is_archive(src):
            if cfg.md5 not in (None, "default"):  # a user's archive has no published checksum
                check_md5(src, cfg.md5, str(src))
            safe_extract(src, raw_dir, keep=lambda name: Path(name).suffix.lower() in IMAGE_EXTENSIONS)
        else:
            raise UserError(f"data.archive: {src} is neither a folder nor a tar/zip archive")
        self.open(cfg, raw_dir)  # fail in this stage, not the next, if there are no classes

    def open(self, cfg, raw_dir: Path) -> RawDataset:
        raw_dir = Path(raw_dir)
        if not raw_dir.is_dir():
            raise UserError(f"{raw_dir} not found: run `dvc repro download` first")
        root = class_root(raw_dir)
        classes, paths, labels = [], [], []
        for folder in sorted((p for p in root.iterdir() if p.is_dir() and _visible(p)), key=lambda p: p.name):
            files = sorted(p for p in folder.rglob("*") if is_image_file(p)
                           and all(_visible(q) for q in p.relative_to(folder).parents if q.name))
            if files:
                labels += [len(classes)] * len(files)
                classes.append(folder.name)
                paths += files
        if len(classes) < 2:
            raise UserError(f"data.archive: found {len(classes)} class folder(s) with images under {root}; "
                            f"an image folder needs at least two sub-folders of images, one per class")
        return RawDataset(classes=classes, splits={"train": FileImages(paths, labels)})


def _copy_images(src: Path, dest: Path) -> None:
    """Copy the class sub-folders' image files (links followed, nothing else)."""
    for path in src.rglob("*"):
        rel = path.relative_to(src)
        if len(rel.parts) >= 2 and all(_visible(Path(p)) for p in rel.parts) and is_image_file(path):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest / rel)
