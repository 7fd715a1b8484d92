"""CIFAR-10 and CIFAR-100 from the official "python version" archives.

The archives hold pickled batches written by Python 2: dicts with bytes keys (b"data",
b"labels" or b"fine_labels", b"filenames", b"batch_label") whose b"data" is a uint8 N x 3072
array of CHW planes. Pickles can run code, so they are read with an unpickler that only
rebuilds what those files contain (dicts, lists, strings, numbers and numpy arrays) and
refuses any other global. A Python 3 re-pack (`pickle.dump(batch, f, protocol=0..5)`) is
read too: below protocol 3 it spells each bytes object `_codecs.encode(<str>, "latin1")`
(and b"" as `bytes()`), which are allowed in exactly that form. The batches are read
straight from the tar: nothing is extracted.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
from pathlib import Path

import numpy as np

from vitpipe.data.archives import check_tar_end, damage_is_user_error, obtain, open_tar, resolve_md5
from vitpipe.data.sources import ImageList, RawDataset
from vitpipe.errors import UserError

BASE_URL = "https://www.cs.toronto.edu/~kriz/"


def _numpy(module: str, name: str):
    """numpy's unpickling helper: numpy._core.<module>.<name> (numpy 2) or numpy.core's (numpy 1)."""
    for package in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{package}.{module}"), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy's unpickling helper {module}.{name} was not found")


class RefusedGlobal(pickle.UnpicklingError):
    """Its message completes "member … tries to …"."""


def _latin1(text, encoding="utf-8", errors="strict") -> bytes:
    """`_codecs.encode` as Python 3 pickles bytes, and nothing else: text, "latin1", strict."""
    if not isinstance(text, str) or encoding != "latin1" or errors != "strict":
        raise RefusedGlobal(
            f"call `_codecs.encode` with {type(text).__name__}, {encoding!r}, {errors!r} "
            f"(a Python 3 pickle of bytes only ever uses a str, 'latin1')"
        )
    return text.encode("latin1")


def _empty_bytes(*args) -> bytes:
    """`bytes()`, as Python 3 pickles b"" below protocol 3; `bytes(n)` would allocate n bytes."""
    if args:
        raise RefusedGlobal(f"call `bytes` with arguments {args!r:.60} (a pickle of b'' calls it with none)")
    return b""


# The only globals a CIFAR batch references: numpy's array reconstruction (protocol 5:
# _frombuffer), and for a Python 3 re-pack below protocol 3 the two spellings of bytes. Both
# numpy 1 and numpy 2 module names map to whatever this numpy provides.
NUMPY_PACKAGES = ("numpy.core", "numpy._core")
ALLOWED_GLOBALS = {
    **{(f"{p}.multiarray", "_reconstruct"): _numpy("multiarray", "_reconstruct") for p in NUMPY_PACKAGES},
    **{(f"{p}.numeric", "_frombuffer"): _numpy("numeric", "_frombuffer") for p in NUMPY_PACKAGES},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1,
    ("__builtin__", "bytes"): _empty_bytes,  # protocol < 3 writes Python 2's module name
    ("builtins", "bytes"): _empty_bytes,
}


class BatchUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR batches: any global outside ALLOWED_GLOBALS is refused."""

    def find_class(self, module: str, name: str):
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"load `{module}.{name}`") from None


def load_batch(f, archive: Path, member: str) -> dict:
    """Unpickle one batch (Python 2's, str -> bytes, or a Python 3 re-pack) or refuse it with a UserError."""
    try:
        batch = BatchUnpickler(f, encoding="bytes").load()
    except RefusedGlobal as e:
        raise UserError(
            f"{archive}: member {member} tries to {e}, which a CIFAR batch never does; refusing to "
            f"unpickle it: the archive was tampered with or is not CIFAR. Use the official "
            f"archive (`data.md5: default` checks it)"
        ) from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        MemoryError,
        RecursionError,
        UnicodeError,
    ) as e:
        raise UserError(
            f"{archive}: member {member} is not a readable CIFAR batch "
            f"({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        ) from None
    if not isinstance(batch, dict):
        raise UserError(f"{archive}: member {member} is not a CIFAR batch (a {type(batch).__name__}, not a dict)")
    # A re-pack of batches loaded with encoding="latin1" has str keys: the same batch.
    return {k.encode("latin1", "replace") if isinstance(k, str) else k: v for k, v in batch.items()}


class CifarSource:
    """A CIFAR python archive. The two datasets differ only in the names below."""

    name: str
    filename: str
    md5: str
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: bytes
    names_key: bytes

    @property
    def url(self) -> str:
        return BASE_URL + self.filename

    def member(self, name: str) -> str:
        return f"{self.folder}/{name}"

    def fetch(self, cfg, raw_dir: Path) -> None:
        local = cfg.archive
        if local and Path(local).is_dir():  # a folder that holds the official file
            local = Path(local) / self.filename
            if not local.is_file():
                raise UserError(f"data.archive: {cfg.archive} is a folder without {self.filename} in it")
        if local:
            self.check_layout(Path(local))  # before the copy replaces anything in raw_dir
        dest = obtain(
            local,
            cfg.url or self.url,
            self.url,
            resolve_md5(cfg.md5, self.md5),
            Path(raw_dir) / self.filename,
            archive_hint=f"`data.archive: <path to {self.filename}>`",
        )
        if not local:
            try:
                self.check_layout(dest)
            except UserError:
                dest.unlink()  # don't leave an unusable archive in the stage's output
                raise

    def check_layout(self, archive: Path) -> None:
        """The archive reads to its end, undamaged, and holds every batch."""
        wanted = [self.member(n) for n in (*self.train, *self.test, self.meta)]
        with damage_is_user_error(archive), open_tar(archive) as tar:
            names = {os.path.normpath(m.name) for m in tar}  # "./x/y" in some re-packs
            check_tar_end(archive, tar)
        missing = [m for m in wanted if m not in names]
        if missing:
            raise UserError(
                f"{archive} is not the {self.name} python archive: it lacks {', '.join(missing)} "
                f"(expected {self.folder}/ with {', '.join((*self.train, *self.test, self.meta))})"
            )

    def _read_members(self, archive: Path, names: tuple[str, ...]) -> list[dict]:
        """Unpickle the named members, in the order given, in one pass over the whole tar."""
        wanted = {self.member(n): i for i, n in enumerate(names)}
        found: list[dict | None] = [None] * len(names)
        with damage_is_user_error(archive), open_tar(archive) as tar:
            for m in tar:
                name = os.path.normpath(m.name)
                if name in wanted:
                    if not m.isreg():
                        raise UserError(f"{archive}: member {m.name} is not a regular file")
                    with tar.extractfile(m) as f:
                        # Buffered in full (<= 160 MB): pickle's many small reads from a gzip stream are slow.
                        found[wanted[name]] = load_batch(io.BytesIO(f.read()), archive, name)
            check_tar_end(archive, tar)
        for n, batch in zip(names, found):
            if batch is None:
                raise UserError(f"{archive} has no member {self.member(n)}: not the {self.name} python archive")
        return found

    def stack(self, archive: Path, names: tuple[str, ...], batches: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        """(pixels uint8 N x 3072, labels int64 N) of several batches, checked."""
        datas, labels = [], []
        for name, batch in zip(names, batches):
            data, y = batch.get(b"data"), batch.get(self.label_key)
            where = f"{archive}: {self.member(name)}"
            if not (
                isinstance(data, np.ndarray)
                and data.dtype == np.uint8
                and data.ndim == 2
                and data.shape[1] == 3 * 32 * 32
            ):
                raise UserError(f"{where}: b'data' is not a uint8 N x 3072 array")
            y = np.asarray(y if isinstance(y, (list, np.ndarray)) else [], dtype=np.int64)
            if y.ndim != 1 or len(y) != len(data):
                raise UserError(f"{where}: {len(data)} images but {len(y)} labels under {self.label_key!r}")
            datas.append(data)
            labels.append(y)
        return np.concatenate(datas), np.concatenate(labels)

    def load(self, archive: Path, members: tuple[str, ...]) -> np.ndarray:
        """Pixels of `members` (for a process that did not inherit them from `open`)."""
        data, _ = self.stack(archive, members, self._read_members(archive, members))
        _PIXELS[_cache_key(str(archive), members)] = data
        return data

    def open(self, cfg, raw_dir: Path) -> RawDataset:
        archive = Path(raw_dir) / self.filename
        if not archive.is_file():
            raise UserError(f"{archive} not found: run `dvc repro download` first")
        meta, *batches = self._read_members(archive, (self.meta, *self.train, *self.test))
        names = meta.get(self.names_key)
        if not isinstance(names, list) or not names:
            raise UserError(f"{archive}: {self.member(self.meta)} has no {self.names_key!r} list")
        classes = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
        splits = {}
        for split, members in (("train", self.train), ("test", self.test)):
            data, labels = self.stack(archive, members, batches[: len(members)])
            batches = batches[len(members) :]
            if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
                raise UserError(f"{archive}: {split} labels outside 0..{len(classes) - 1}")
            _PIXELS[_cache_key(str(archive), members)] = data
            splits[split] = CifarImages(archive, self, members, labels)
        return RawDataset(classes=classes, splits=splits)


# Pixels per (archive, members), filled by `open` in the main process. Preprocess workers
# fork from it and so share the array instead of receiving a copy with every task.
_PIXELS: dict[tuple, np.ndarray] = {}


class CifarImages(ImageList):
    """One split of a CIFAR archive: labels up front, pixels from the archive (cached per process)."""

    def __init__(self, archive: Path, source: CifarSource, members: tuple[str, ...], labels: np.ndarray):
        self.archive, self.source, self.members = str(archive), source, members
        self.labels = labels
        self.key = _cache_key(self.archive, members)

    def _data(self) -> np.ndarray:
        data = _PIXELS.get(self.key)
        return data if data is not None else self.source.load(Path(self.archive), self.members)

    def image(self, i: int) -> np.ndarray:
        return self._data()[i].reshape(3, 32, 32).transpose(1, 2, 0)  # CHW planes -> HWC


def _cache_key(archive: str, members) -> tuple:
    st = os.stat(archive)
    return (os.path.realpath(archive), st.st_size, st.st_mtime_ns, tuple(members))


class Cifar10Source(CifarSource):
    name = "CIFAR-10"
    filename = "cifar-10-python.tar.gz"
    md5 = "c58f30108f718f92721af3b95e74349a"
    folder = "cifar-10-batches-py"
    train = tuple(f"data_batch_{i}" for i in range(1, 6))
    test = ("test_batch",)
    meta = "batches.meta"
    label_key = b"labels"
    names_key = b"label_names"


class Cifar100Source(CifarSource):
    name = "CIFAR-100"
    filename = "cifar-100-python.tar.gz"
    md5 = "eb9058c3a382ffc7106e4002c42a8d85"
    folder = "cifar-100-python"
    train = ("train",)
    test = ("test",)
    meta = "meta"
    label_key = b"fine_labels"
    names_key = b"fine_label_names"
