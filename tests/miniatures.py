"""Miniature datasets in the exact official formats, for the data tests.

CIFAR: the python archives' layout, with batches pickled as Python 2 wrote them (protocol 2,
byte strings as BINSTRING, numpy 1's module name), so the real reader is what is tested; and
`repack_cifar`, what a user's Python 3 re-pack of those files looks like.
Pets: images.tar.gz + annotations.tar.gz with the list files, including awkward images.
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


class Py2Pickler(pickle._Pickler):
    """Pickles every str and bytes as a Python 2 `str` (SHORT_BINSTRING/BINSTRING opcodes)."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        data = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def py2_pickle(obj) -> bytes:
    f = io.BytesIO()
    Py2Pickler(f, protocol=2).dump(obj)
    # numpy 1 (what wrote the real files) lives at numpy.core; GLOBAL opcodes are text lines.
    return f.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def add_dir(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    tar.addfile(info)


def cifar_batch(rng, n: int, num_classes: int, label_key: bytes, label: bytes) -> dict:
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(x) for x in rng.permutation(np.arange(n) % num_classes)]  # as balanced as n allows
    batch = {
        b"batch_label": label,
        label_key: labels,
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [x // 5 for x in labels]
    return batch


def make_cifar10(path: Path, per_batch: int = 4, n_test: int = 6, seed: int = 0, extra: dict | None = None) -> dict:
    """cifar-10-python.tar.gz in miniature; returns {"train": batch dicts, "test": ..., "classes"}."""
    rng = np.random.default_rng(seed)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    train = [cifar_batch(rng, per_batch, 10, b"labels", f"training batch {i} of 5".encode()) for i in range(1, 6)]
    test = cifar_batch(rng, n_test, 10, b"labels", b"testing batch 1 of 1")
    members = {f"data_batch_{i}": b for i, b in enumerate(train, 1)}
    members["test_batch"] = test
    members["batches.meta"] = {
        b"num_cases_per_batch": per_batch,
        b"label_names": [c.encode() for c in classes],
        b"num_vis": 3072,
    }
    members.update(extra or {})
    with tarfile.open(path, "w:gz") as tar:
        add_dir(tar, "cifar-10-batches-py")
        for name, obj in members.items():
            data = obj if isinstance(obj, bytes) else py2_pickle(obj)
            add_bytes(tar, f"cifar-10-batches-py/{name}", data)
        add_bytes(tar, "cifar-10-batches-py/readme.html", b"<html></html>")
    return {"train": train, "test": [test], "classes": classes}


def repack_cifar(src: Path, dest: Path, protocol: int, encoding: str = "bytes", tar_mode: str = "w:gz") -> None:
    """Every pickle of a CIFAR archive loaded by Python 3 (`encoding`) and dumped again with
    `protocol`, as a user re-packing the official files would. The source is our own miniature."""
    with tarfile.open(src) as old, tarfile.open(dest, tar_mode) as new:
        for m in old.getmembers():
            if not m.isreg():
                new.addfile(m)
                continue
            data = old.extractfile(m).read()
            if not m.name.endswith(".html"):
                data = pickle.dumps(pickle.loads(data, encoding=encoding), protocol=protocol)
            add_bytes(new, m.name, data)


def make_cifar100(path: Path, n_train: int = 12, n_test: int = 5, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    classes = [f"class_{i:02d}" for i in range(100)]
    train = cifar_batch(rng, n_train, 100, b"fine_labels", b"training batch 1 of 1")
    test = cifar_batch(rng, n_test, 100, b"fine_labels", b"testing batch 1 of 1")
    meta = {
        b"fine_label_names": [c.encode() for c in classes],
        b"coarse_label_names": [f"super_{i}".encode() for i in range(20)],
    }
    with tarfile.open(path, "w:gz") as tar:
        add_dir(tar, "cifar-100-python")
        for name, obj in (("train", train), ("test", test), ("meta", meta)):
            add_bytes(tar, f"cifar-100-python/{name}", py2_pickle(obj))
    return {"train": [train], "test": [test], "classes": classes}


def image_bytes(mode: str, size=(20, 14), fmt: str = "JPEG", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
    im = rgb if mode == "RGB" else rgb.convert(mode)
    f = io.BytesIO()
    im.save(f, format=fmt)
    return f.getvalue()


PETS_CLASSES = ["Abyssinian", "american_bulldog", "Bengal"]  # class ids 1, 2, 3


def make_pets(folder: Path, replace: dict[str, bytes] | None = None) -> dict:
    """images.tar.gz + annotations.tar.gz in the official layout, with odd images; `replace`
    gives some images (by name) other bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    good = image_bytes("RGB")
    truncated = good[: len(good) // 2]
    images = {  # name: bytes
        "Abyssinian_1": good,
        "Abyssinian_2": image_bytes("RGB", (31, 40), seed=1),
        "Abyssinian_3": image_bytes("RGBA", fmt="PNG"),  # a PNG named .jpg, with alpha
        "american_bulldog_10": image_bytes("L"),  # grayscale
        "american_bulldog_11": image_bytes("CMYK"),  # CMYK JPEG
        "american_bulldog_12": truncated,  # truncated: skipped
        "Bengal_5": image_bytes("P", fmt="PNG"),  # palette
        "Bengal_6": b"not an image at all",  # undecodable: skipped
        "Bengal_7": image_bytes("RGB", (8, 50), seed=2),
        **(replace or {}),
    }
    class_id = {"Abyssinian": 1, "american_bulldog": 2, "Bengal": 3}
    species = {"Abyssinian": 1, "american_bulldog": 2, "Bengal": 1}
    trainval = ["Abyssinian_1", "Abyssinian_3", "american_bulldog_10", "american_bulldog_12", "Bengal_5", "Bengal_6"]
    test = ["Abyssinian_2", "american_bulldog_11", "Bengal_7"]

    def lines(names):
        return "".join(f"{n} {class_id[n.rsplit('_', 1)[0]]} {species[n.rsplit('_', 1)[0]]} 1\n" for n in names)

    with tarfile.open(folder / "images.tar.gz", "w:gz") as tar:
        add_dir(tar, "images")
        for name, data in images.items():
            add_bytes(tar, f"images/{name}.jpg", data)
        add_bytes(tar, "images/Abyssinian_1.mat", b"MATLAB 5.0")  # the real archive has a few of these
    header = "#Image CLASS-ID SPECIES BREED ID\n#ID: 1:37 Class ids\n"
    with tarfile.open(folder / "annotations.tar.gz", "w:gz") as tar:
        add_dir(tar, "annotations")
        add_bytes(tar, "annotations/README", b"Oxford-IIIT Pet annotations")
        add_bytes(tar, "annotations/list.txt", (header + lines(trainval + test)).encode())
        add_bytes(tar, "annotations/trainval.txt", lines(trainval).encode())
        add_bytes(tar, "annotations/test.txt", lines(test).encode())
        add_dir(tar, "annotations/trimaps")
        add_bytes(tar, "annotations/trimaps/Abyssinian_1.png", image_bytes("L", fmt="PNG"))
        add_bytes(tar, "annotations/xmls/Abyssinian_1.xml", b"<annotation/>")
    return {"trainval": trainval, "test": test, "skipped": {"train": 2, "test": 0}}
