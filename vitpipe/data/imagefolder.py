"""A user's own images: a folder of class sub-folders (`cats/x.jpg`, `dogs/y.png` …), given
as the folder itself or as a tar/zip of it. Also home of FileImages, the ImageList over image
files that Oxford-IIIT Pet uses too.

Image files come in every mode and quality; decoding converts any mode to RGB and turns an
undecodable or truncated file into SkipImage, which preprocess counts instead of crashing.
The download stage refuses a folder where no image decodes at all; preprocess refuses a
class left with none (vitpipe.data.sanity).
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from vitpipe.data.archives import check_md5, is_archive, safe_extract, staging_dir
from vitpipe.data.sanity import require_some_decodable, warn
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
        raise SkipImage(path, _reason(e)) from None


def _reason(e: Exception) -> str:
    """Why an image did not decode, without its path (the caller names the file)."""
    if isinstance(e, UnidentifiedImageError):
        return "not an image, or a format PIL cannot read"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror  # "No such file or directory", without the path
    return " ".join(str(e).split()) or type(e).__name__


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


NO_IMAGES = ".no-images"  # left in a class folder whose files are no images: preprocess warns about it
UNREADABLE_FIX = "put readable image files (JPEG, PNG, …) in the class sub-folders"


class ImageFolderSource:
    def fetch(self, cfg, raw_dir: Path) -> None:
        raw_dir = Path(raw_dir)
        if not cfg.archive:
            raise UserError(
                "data.dataset: imagefolder needs `data.archive`: a folder of class sub-folders "
                "(cats/…, dogs/…) or a .tar/.zip of one; or set `data.dataset: digits`, "
                "the embedded default that needs no network"
            )
        src = Path(cfg.archive)
        left_out: list[str] = []  # files that are not images, relative to the class root or archive

        def finish(folder: Path) -> None:  # in the temp folder: a bad input leaves raw_dir as it was
            _mark_imageless(folder, left_out)
            raw = _scan(folder, f"data.archive: {src}")
            for line in raw.warnings:
                warn(line)
            require_some_decodable(raw.splits["train"], f"data.archive: {src}", class_root(folder), UNREADABLE_FIX)

        def keep(name: str) -> bool:
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                return True
            left_out.append(name)
            return False

        if src.is_dir():
            with staging_dir(raw_dir) as tmp:
                left_out += _copy_images(class_root(src), tmp)
                finish(tmp)
        elif is_archive(src):
            if cfg.md5 not in (None, "default"):  # a user's archive has no published checksum
                check_md5(src, cfg.md5, str(src))
            safe_extract(src, raw_dir, keep=keep, check=finish)
        else:
            empty = " (it is empty)" if src.is_file() and src.stat().st_size == 0 else ""
            raise UserError(f"data.archive: {src} is neither a folder nor a tar/zip archive{empty}")

    def open(self, cfg, raw_dir: Path) -> RawDataset:
        raw_dir = Path(raw_dir)
        if not raw_dir.is_dir():
            raise UserError(f"{raw_dir} not found: run `dvc repro download` first")
        return _scan(raw_dir, str(raw_dir))


def _scan(folder: Path, where: str) -> RawDataset:
    """Classes and image files under folder; `where` names it in messages."""
    root = class_root(folder)
    classes, paths, labels, warnings, imageless = [], [], [], [], []
    for sub in sorted((p for p in root.iterdir() if p.is_dir() and _visible(p)), key=lambda p: p.name):
        files = sorted(
            p
            for p in sub.rglob("*")
            if is_image_file(p) and all(_visible(q) for q in p.relative_to(sub).parents if q.name)
        )
        if files:
            labels += [len(classes)] * len(files)
            classes.append(sub.name)
            paths += files
        else:
            imageless.append(sub.name)
            held = (sub / NO_IMAGES).read_text() if (sub / NO_IMAGES).is_file() else "it is empty"
            warnings.append(
                f"{where}: sub-folder {sub.name!r} holds no image files ({held}), so it is not a class "
                f"and is left out: convert its images to JPEG or PNG, or move it out of the folder"
            )
    if len(classes) < 2:
        without = f" (sub-folders without image files: {', '.join(imageless)})" if imageless else ""
        raise UserError(
            f"{where}: found {len(classes)} class folder(s) with images{without}; an image folder needs "
            f"at least two sub-folders of images (JPEG, PNG, …), one per class"
        )
    return RawDataset(classes=classes, splits={"train": FileImages(paths, labels)}, warnings=warnings)


def _mark_imageless(folder: Path, left_out: list[str]) -> None:
    """Give each would-be class folder that held files but no image files a NO_IMAGES note of
    what it held: a folder of .heic photos would otherwise vanish without a word."""
    root = class_root(folder)
    base = root.relative_to(folder).parts
    held: dict[str, Counter] = {}
    for name in left_out:
        parts = PurePosixPath(name).parts
        suffix = PurePosixPath(name).suffix.lower()
        if (
            len(parts) > len(base) + 1
            and parts[: len(base)] == base
            and suffix
            and all(_visible(Path(p)) for p in parts)
            and not (root / parts[len(base)]).is_dir()
        ):
            held.setdefault(parts[len(base)], Counter())[suffix] += 1
    for name, suffixes in held.items():
        (root / name).mkdir()
        (root / name / NO_IMAGES).write_text(", ".join(f"{n} {s}" for s, n in suffixes.most_common()))


def _copy_images(src: Path, dest: Path) -> list[str]:
    """Copy the class sub-folders' image files (links followed, nothing else); return the
    other files' paths, relative to src."""
    left_out = []
    for path in src.rglob("*"):
        rel = path.relative_to(src)
        if len(rel.parts) < 2 or not all(_visible(Path(p)) for p in rel.parts) or not path.is_file():
            continue
        if is_image_file(path):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest / rel)
        else:
            left_out.append(rel.as_posix())
    return left_out
