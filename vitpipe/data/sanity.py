"""Data sanity: what the data stages refuse, and what they only warn about.

Refused, on one line (UserError): a folder or archive where no image decodes at all, and a
class with no readable image in the train or the test split: the model could not learn it,
or its accuracy could not be measured, and the other classes would report a clean score.

Warned about (printed, and recorded by preprocess in meta.json and its metrics): a class
with fewer than THIN_FRACTION of the median class's images in the train or the test split.
The median, not the mean, so that a few big classes do not make every other class thin;
10% is a 10x imbalance, far beyond the spread of the supported datasets (CIFAR is balanced,
Oxford-IIIT Pet and digits are within 10%), yet what a class that lost most of its files to
a bad copy or to decoding looks like. A dataset that is imbalanced on purpose only warns.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vitpipe.data.sources import ImageList, SkipImage
from vitpipe.errors import UserError

THIN_FRACTION = 0.10
REQUIRED_SPLITS = ("train", "test")  # val may lack a small class: it only steers training
LISTED = 5  # classes named in one message, then "and N more"


def warn(message: str) -> None:
    print(f"vitpipe: warning: {' '.join(message.split())}", file=sys.stderr, flush=True)


def nothing_decodes(where: str, tried: int, example: str, fix: str) -> UserError:
    return UserError(
        f"{where}: none of the {tried} image files could be decoded (e.g. {example}); "
        f"they are damaged or not images: {fix}"
    )


def require_some_decodable(images: ImageList, where: str, root: Path, fix: str) -> None:
    """Raise unless some image decodes; stops at the first that does, so a good folder costs one decode."""
    first = None
    for i in range(len(images)):
        try:
            images.image(i)
            return
        except SkipImage as e:
            first = first or e
    if first is not None:
        raise nothing_decodes(where, len(images), f"{os.path.relpath(first.path, root)}: {first.reason}", fix)


@dataclass
class SplitCounts:
    """Images per class of one split: given to it, and of those, decoded."""

    assigned: np.ndarray
    kept: np.ndarray
    example: dict[int, str] = field(default_factory=dict)  # class -> one decode error ("path: reason")


def _names(classes, picked) -> str:
    shown = ", ".join(repr(classes[c]) for c in picked[:LISTED])
    return shown + (f" and {len(picked) - LISTED} more" if len(picked) > LISTED else "")


def require_every_class(where: str, classes: list[str], splits: dict[str, SplitCounts]) -> None:
    """Raise if a class has no readable image in a train or test split that is in use."""
    total = sum(s.assigned for s in splits.values())
    for split in REQUIRED_SPLITS:
        s = splits.get(split)
        if s is None or not s.assigned.any():
            continue
        empty = np.flatnonzero(s.kept == 0)
        if not empty.size:
            continue
        c = int(empty[0])
        subject = f"class {_names(classes, empty)} has" if len(empty) == 1 else f"classes {_names(classes, empty)} have"
        if s.assigned[c] == 0:
            why = f"{classes[c]!r} has {total[c]} image(s) in all, none of them in the {split} split"
        else:
            why = f"{classes[c]!r} has {s.assigned[c]} image(s) there and none decodes, e.g. {s.example.get(c, '?')}"
        raise UserError(
            f"{where}: {subject} no readable image in the {split} split ({why}); every class needs "
            f"readable images in both train and test: add some to it or remove the class, then run "
            f"`dvc repro` again"
        )


def thin_classes(where: str, classes: list[str], splits: dict[str, SplitCounts]) -> tuple[list[str], list[str]]:
    """(warning lines, names of the thin classes) for the train and test splits."""
    warnings, thin_names = [], []
    for split in REQUIRED_SPLITS:
        s = splits.get(split)
        if s is None or not s.kept.any():
            continue
        median = float(np.median(s.kept))
        thin = [c for c in range(len(classes)) if 0 < s.kept[c] < THIN_FRACTION * median]
        if thin:
            listing = ", ".join(f"{classes[c]!r} ({s.kept[c]})" for c in thin[:LISTED])
            more = f" and {len(thin) - LISTED} more" if len(thin) > LISTED else ""
            warnings.append(
                f"{where}: {len(thin)} class(es) with under {THIN_FRACTION:.0%} of the median "
                f"{median:g} {split} images per class: {listing}{more}; the model barely learns them "
                f"and their accuracy is noise: add images to them or remove them"
            )
            thin_names += [classes[c] for c in thin if classes[c] not in thin_names]
    return warnings, thin_names
