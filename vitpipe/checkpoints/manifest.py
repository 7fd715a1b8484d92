"""The checkpoint store's manifests, read through one typed parser, and the one function that
joins a name from a manifest onto a folder.

Manifests come from places a user does not control (a shared Drive folder, a bucket others
write to) and from a local store that a crash, a disk or a hand may have damaged. Each is
parsed field by field: a wrong one is a `Damaged` error (a ValueError) whose text names the
file and the field, never a KeyError or TypeError deep in the code that uses it. Every name a
manifest gives for a file goes through `confined`, on download, on upload, on verification and
on restore: a name that is absolute, climbs out with `..`, or reaches a symbolic link is
refused, and the path it gives is inside the folder, resolved.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path, PurePosixPath

SHA256 = re.compile(r"^[0-9a-f]{64}$")


class Damaged(ValueError):
    """A manifest, or a name in it, that is not what the store writes; its text names the file
    and the field."""


def confined(folder: Path, name, where: str) -> Path:
    """folder/name, when `name` (from the manifest `where`) stays inside `folder`: relative, no
    empty, `.` or `..` part, no backslash or NUL, no symbolic link on the way, and the resolved
    path inside the resolved folder. Anything else is Damaged naming `where` and the name."""
    parts = check_name(name, where)
    folder = Path(folder)
    here = folder
    for part in parts:
        here = here / part
        if here.is_symlink():
            raise Damaged(f"{where}: {name!r} is a symbolic link in {folder} (to {os.readlink(here)!r}); refused")
    try:
        inside = here.resolve().is_relative_to(folder.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        inside = False
    if not inside:
        raise Damaged(f"{where} names a file outside its folder: {name!r}; refused")
    return here


def check_name(name, where: str) -> list[str]:
    """The part of `confined` that needs no folder: the name's parts, if it is relative and
    has no empty, `.` or `..` part, backslash or NUL."""
    if (
        not isinstance(name, str)
        or not name
        or "\0" in name
        or "\\" in name
        or len(name) > 255
        or PurePosixPath(name).is_absolute()
        or any(part in ("", ".", "..") for part in name.split("/"))
    ):
        raise Damaged(f"{where} names a file outside its folder: {name!r}; refused")
    return name.split("/")


def read_json(text_or_bytes, where: str):
    try:
        return json.loads(text_or_bytes)
    except (ValueError, UnicodeDecodeError) as e:
        raise Damaged(f"{where} is not JSON ({' '.join(str(e).split())[:80]})") from None


def read_file(path: Path):
    """A local manifest's JSON; Damaged when it is not JSON (OSError when it cannot be read)."""
    return read_json(Path(path).read_bytes(), str(path))


def _get(doc: dict, key: str, where: str, kind, required: bool = True):
    if key not in doc:
        if required:
            raise Damaged(f"{where}: field {key!r} is missing")
        return None
    value = doc[key]
    ok = {
        "str": lambda v: isinstance(v, str) and v != "",
        "count": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "time": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0,
        "sha256": lambda v: isinstance(v, str) and SHA256.match(v) is not None,
        "dict": lambda v: isinstance(v, dict),
    }[kind](value)
    if not ok:
        wanted = {
            "str": "a non-empty text",
            "count": "an integer >= 0",
            "time": "a time in seconds",
            "sha256": "a sha256 (64 hex digits)",
            "dict": "a mapping",
        }[kind]
        raise Damaged(f"{where}: field {key!r} is {str(value)[:60]!r}, not {wanted}")
    return value


def _files(doc: dict, where: str) -> dict[str, dict]:
    """The `files` field: name -> {size, sha256}; each name as `confined` takes it (syntax only)."""
    files = _get(doc, "files", where, "dict")
    for name, meta in files.items():
        check_name(name, where)
        if not isinstance(meta, dict):
            raise Damaged(
                f"{where}: field 'files' holds {name!r} as {str(meta)[:40]!r}, not a mapping of size and sha256"
            )
        _get(meta, "size", f"{where}: files[{name!r}]", "count")
        _get(meta, "sha256", f"{where}: files[{name!r}]", "sha256")
    return files


def _common(doc, where: str) -> dict:
    if not isinstance(doc, dict):
        raise Damaged(f"{where} is a {type(doc).__name__}, not a manifest (a mapping)")
    _get(doc, "fingerprint", where, "str")
    for key, kind in (("stage", "str"), ("written", "time"), ("clone", "str"), ("total_steps", "count")):
        _get(doc, key, where, kind, required=False)
    return doc


def parse_step(doc, where: str, mirrored: bool = False) -> dict:
    """A checkpoint's manifest: fingerprint, step, total_steps, size; a folder's `files` (each
    with size and sha256); a mirrored file's sha256."""
    _common(doc, where)
    _get(doc, "step", where, "count")
    _get(doc, "size", where, "count")
    if "files" in doc:
        _files(doc, where)
    elif mirrored:
        _get(doc, "sha256", where, "sha256")
    return doc


def parse_record(doc, where: str) -> dict:
    """A finished record's manifest: kind, fingerprint, total_steps, config, files."""
    _common(doc, where)
    _get(doc, "total_steps", where, "count")
    if doc.get("kind") != "finished":
        raise Damaged(f"{where}: field 'kind' is {str(doc.get('kind'))[:40]!r}, not 'finished'")
    _get(doc, "config", where, "dict")
    _files(doc, where)
    return doc
