"""Oxford-IIIT Pet: 37 cat and dog breeds, ~7,400 photos, with its official trainval/test split.

Two official archives: images.tar.gz (`images/<Breed>_<n>.jpg`) and annotations.tar.gz
(`annotations/trainval.txt`, `test.txt`, `list.txt`). A list line is `Abyssinian_100 1 1 1`:
image name, class id 1..37, species (1 cat, 2 dog), breed id. The class name is the image
name without its number. The photos come in every size and some in odd modes (RGBA,
grayscale, CMYK) or damaged: FileImages converts or skips them, preprocess counts the skips.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vitpipe.data.archives import check_md5, download_cache, obtain, safe_extract
from vitpipe.data.imagefolder import FileImages
from vitpipe.data.sanity import require_some_decodable
from vitpipe.data.sources import RawDataset
from vitpipe.errors import ParamError, UserError

# file -> published md5 (the checksums torchvision verifies too)
BASE_URL = "https://thor.robots.ox.ac.uk/~vgg/data/pets/"
ARCHIVES = {
    "images.tar.gz": "5c4f3ee8e5d25df40f4fd59a7f44e54c",
    "annotations.tar.gz": "95a8c909bbe2e81eed6a22bccdf3f68f",
}
LISTS = {"train": "annotations/trainval.txt", "test": "annotations/test.txt"}
ARCHIVE_HINT = "`data.archive: <folder holding images.tar.gz and annotations.tar.gz>`"


def _needed(member: str) -> bool:
    # The images and the split lists; the trimaps and xmls (segmentation, boxes) are not used.
    is_image = member.startswith("images/") and member.endswith(".jpg")
    return is_image or member in (*LISTS.values(), "annotations/list.txt")


def read_list(path: Path, name: str | None = None) -> list[tuple[str, int]]:
    """(image name, class id) per line of a Pets list file; `#` lines are comments. `name`
    stands for the path in messages."""
    rows = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) < 2 or not fields[1].isdigit():
            raise UserError(
                f"{name or path}:{n}: expected `<image name> <class id> <species> <breed id>`, got {line[:100]!r}"
            )
        rows.append((fields[0], int(fields[1])))
    return rows


def breed(name: str) -> str:
    """`american_pit_bull_terrier_12` -> `american_pit_bull_terrier`."""
    return name.rsplit("_", 1)[0]


class PetsSource:
    def fetch(self, cfg, raw_dir: Path) -> None:
        if cfg.md5 not in ("default", None):
            raise ParamError(
                "data.md5",
                cfg.md5,
                "default or null for pets: its two archives are each checked against their own published md5",
            )
        local = Path(cfg.archive) if cfg.archive else None
        if local is not None and not local.is_dir():
            raise UserError(
                f"data.archive: {local} must be a folder holding both images.tar.gz and "
                f"annotations.tar.gz (the two official Oxford-IIIT Pet archives)"
            )
        base = (cfg.url or BASE_URL).rstrip("/") + "/"
        paths = []
        for name, official_md5 in ARCHIVES.items():
            md5 = official_md5 if cfg.md5 == "default" else None
            if local is not None:
                path = local / name
                if not path.is_file():
                    raise UserError(f"data.archive: {local} has no {name}; download {BASE_URL + name} into it")
                check_md5(path, md5, str(path))  # extracted from where it is: no copy of 800 MB
            else:
                others = {n: BASE_URL + n for n in ARCHIVES if n != name}
                path = obtain(
                    None,
                    base + name,
                    BASE_URL + name,
                    md5,
                    download_cache(raw_dir) / name,
                    ARCHIVE_HINT,
                    companions=others,
                )
            paths.append(path)
        safe_extract(paths, raw_dir, keep=_needed, check=lambda folder: self._check(folder, paths))

    def _check(self, folder: Path, archives: list[Path]) -> None:
        """On the extracted temp folder: a wrong layout, or images that are no images, fail in
        this stage (not the next) and leave raw_dir as it was."""
        raw = self._read(folder, " and ".join(map(str, archives)), "they are not the official Oxford-IIIT Pet archives")
        train, test = raw.splits["train"], raw.splits["test"]
        every = FileImages(train.paths + test.paths, np.concatenate([train.labels, test.labels]))
        require_some_decodable(every, str(archives[0]), folder, f"download {BASE_URL}images.tar.gz again")

    def open(self, cfg, raw_dir: Path) -> RawDataset:
        return self._read(Path(raw_dir), str(raw_dir), "run `dvc repro download` first")

    def _read(self, folder: Path, where: str, fix: str) -> RawDataset:
        rows = {}
        for split, rel in LISTS.items():
            if not (folder / rel).is_file():
                raise UserError(f"{where}: no {rel} found: {fix} (the annotations archive must contain {rel})")
            rows[split] = read_list(folder / rel, f"{where}: {rel}")
        # Class names in class-id order, each checked to be one breed.
        names: dict[int, str] = {}
        for image, class_id in rows["train"] + rows["test"]:
            if names.setdefault(class_id, breed(image)) != breed(image):
                raise UserError(
                    f"{where}: {LISTS['train']}: class id {class_id} names both {names[class_id]} and {breed(image)}"
                )
        ids = sorted(names)
        index = {class_id: i for i, class_id in enumerate(ids)}
        splits = {
            split: FileImages([folder / "images" / f"{image}.jpg" for image, _ in r], [index[c] for _, c in r])
            for split, r in rows.items()
        }
        return RawDataset(classes=[names[c] for c in ids], splits=splits)
