"""Atomic writes: a temp file in the same folder, then os.replace, so a killed stage
never leaves a truncated file for DVC to cache."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ""):
    """Yield a temp path next to `path`; on success fsync and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are ordinary files
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def torch_save(path, obj) -> None:
    import torch

    with atomic_path(path, suffix=".pt") as tmp:
        try:
            # through a file object: torch names the archive's root folder after a path it is
            # given (here the random temp name), which made every save of the same weights other
            # bytes, so DVC saw a rerun's outputs, and every study reading them, as changed
            with open(tmp, "wb") as f:
                torch.save(obj, f)
        except RuntimeError as e:  # torch's zip writer reports a full disk as a RuntimeError
            if "write" not in str(e).lower() and "pos" not in str(e).lower():
                raise
            raise OSError(errno.ENOSPC, f"writing failed ({' '.join(str(e).split())[:120]})", str(path)) from None
