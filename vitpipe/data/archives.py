"""Getting archives in safely: streamed md5 checks, downloads and imports that are verified
before they land, and extraction that refuses any member that could write outside its folder.

Extraction checks every member itself (absolute paths, `..`, links that leave the folder,
device and fifo files) instead of relying on tarfile's extraction filters, which Python only
has from 3.12 (and 3.11.4+). Everything lands in a temp folder beside the destination and is
renamed into place at the end, so a refused, damaged or interrupted extraction leaves nothing
behind. A tar is read to its very end (the end-of-archive block, the compressor's checksum):
tarfile alone stops quietly at a truncated or garbled header and calls that the end.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable

from vitpipe.atomic import atomic_path
from vitpipe.errors import UserError

try:
    from lzma import LZMAError
except ImportError:  # a Python built without lzma cannot open .xz at all
    LZMAError = zlib.error

CHUNK = 1 << 20  # 1 MiB reads: streamed, never a whole archive in RAM
TIMEOUT_S = 30  # per socket operation; a stalled server fails instead of hanging
EMBEDDED_HINT = "or set `data.dataset: digits`, the embedded default that needs no network"


# ---------------------------------------------------------------- checksums


def md5_file(path: str | os.PathLike) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_md5(path: str | os.PathLike, expected: str | None, what: str | None = None) -> None:
    """Raise UserError unless `path` hashes to `expected` (None: accept anything)."""
    if expected is None:
        return
    actual = md5_file(path)
    if actual != expected.lower():
        raise UserError(md5_mismatch(what or Path(path).name, actual, expected))


def md5_mismatch(what: str, actual: str, expected: str) -> str:
    return (
        f"{what}: md5 is {actual}, expected {expected.lower()}. The file is corrupt, truncated or "
        f"not the official one: download it again, or, for a re-packed archive in the same "
        f"format, set `data.md5: null` to accept it (or `data.md5: <its md5>` to pin it)"
    )


# ---------------------------------------------------------------- import and download


def _stream_into(dest: Path, chunks: Iterable[bytes], md5: str | None, what: str) -> None:
    """Write chunks to a temp file beside dest, hashing as they pass; rename only if the md5 fits."""
    h = hashlib.md5(usedforsecurity=False)
    with atomic_path(dest, suffix=".part") as tmp:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                h.update(chunk)
                f.write(chunk)
        if md5 is not None and h.hexdigest() != md5.lower():
            raise UserError(md5_mismatch(what, h.hexdigest(), md5))


def _read_chunks(f) -> Iterable[bytes]:
    while chunk := f.read(CHUNK):
        yield chunk


def import_file(src: str | os.PathLike, dest: str | os.PathLike, md5: str | None) -> Path:
    """Copy a local file (the user's `data.archive`) to dest, verified on the way."""
    src, dest = Path(src), Path(dest)
    if not src.is_file():
        raise UserError(f"data.archive: {src} is not a file (give the path of the downloaded archive)")
    with open(src, "rb") as f:
        _stream_into(dest, _read_chunks(f), md5, str(src))
    return dest


def offline_message(files: dict[str, str], archive_hint: str, reason: str) -> str:
    """One message for every failed download: what to fetch, where to put it, which param."""
    listing = " and ".join(f"{url}" for url in files.values())
    return (
        f"could not download {', '.join(files)} ({reason}). To work offline, download {listing} "
        f"on a machine with network access, put {'them in one folder' if len(files) > 1 else 'it'} on "
        f"this machine (e.g. data/downloads/) and set {archive_hint} in params.yaml "
        f"(or `dvc exp run -S data.archive=<path>`); {EMBEDDED_HINT}"
    )


def download(
    url: str,
    dest: str | os.PathLike,
    md5: str | None,
    *,
    official_url: str | None = None,
    archive_hint: str | None = None,
    companions: dict[str, str] | None = None,
) -> Path:
    """Stream `url` to dest (temp file, md5 verified, renamed). Network failures -> UserError
    naming the official file (and `companions`, name -> URL, needed with it), where to put
    it and `data.archive`."""
    dest = Path(dest)
    hint = archive_hint or f"`data.archive: <path to {dest.name}>`"
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "vitpipe"})
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            _stream_into(dest, _read_chunks(response), md5, f"{dest.name} downloaded from {url}")
    except (urllib.error.URLError, OSError, ValueError) as e:  # HTTPError, timeouts, resets, bad URLs
        if isinstance(e, urllib.error.HTTPError):
            reason = f"HTTP {e.code} {e.reason}"
        else:
            reason = getattr(e, "reason", None) or e
        files = {dest.name: official_url or url, **(companions or {})}
        raise UserError(offline_message(files, hint, f"{url}: {reason}")) from None
    return dest


# ---------------------------------------------------------------- damaged archives

MAGIC = (
    (b"PK\x03\x04", "zip"),
    (b"PK\x05\x06", "zip"),
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ\x00", "xz"),
)


def archive_kind(path: str | os.PathLike) -> str | None:
    """zip, gzip, bzip2, xz or tar from the first bytes (a truncated file still has them), else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(263)
    except OSError:
        return None
    kind = next((k for magic, k in MAGIC if head.startswith(magic)), None)
    return kind or ("tar" if head[257:262] == b"ustar" else None)


def damaged(archive, detail) -> UserError:
    return UserError(
        f"{archive} is damaged (truncated or corrupt: {detail}); nothing was extracted from it. "
        f"Download or copy it again (or re-pack it), then run the stage again"
    )


@contextlib.contextmanager
def damage_is_user_error(archive):
    """Format and decompression errors while reading `archive` -> one UserError. An OSError
    with an errno is the machine's (disk full, permissions) and passes through."""
    try:
        yield
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, LZMAError) as e:
        raise damaged(archive, e) from None
    except OSError as e:
        if e.errno is not None:
            raise
        raise damaged(archive, e) from None  # gzip's BadGzipFile (CRC), bz2's "Invalid data stream"


class _TarInfo(tarfile.TarInfo):
    """Marks its TarFile when the end-of-archive block is read, which tells a proper end from
    the quiet stop tarfile makes at a truncated or garbled header."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.end_seen = True
            raise


TAR_MODES = {"gzip": "r:gz", "bzip2": "r:bz2", "xz": "r:xz", "tar": "r:"}


def open_tar(archive: Path) -> tarfile.TarFile:
    """A tar in any compression, for reading once from start to end (then `check_tar_end`)."""
    kind = archive_kind(archive)
    try:
        # The mode of the compression its first bytes name, so that an error is that one's own.
        return tarfile.open(archive, TAR_MODES.get(kind, "r:*"), tarinfo=_TarInfo)
    except (tarfile.TarError, OSError, EOFError, zlib.error, LZMAError) as e:
        if isinstance(e, OSError) and e.errno is not None:  # missing or unreadable: the machine's words
            raise UserError(f"{archive} cannot be read: {e.strerror}") from None
        if os.path.getsize(archive) == 0:
            raise damaged(archive, "the file is empty") from None
        if kind not in TAR_MODES:
            raise UserError(f"{archive} is not a tar archive (.tar, .tar.gz, .tar.bz2 or .tar.xz)") from None
        raise damaged(archive, e) from None


def check_tar_end(archive: Path, tar: tarfile.TarFile) -> None:
    """After the last member: the end-of-archive block must be there, and the stream must read
    to its end (where gzip checks its CRC and length). Call inside damage_is_user_error."""
    if not getattr(tar, "end_seen", False):
        raise damaged(archive, f"no end-of-archive block after member {len(tar.members)}")
    while tar.fileobj.read(CHUNK):
        pass


# ---------------------------------------------------------------- safe extraction


def _refuse(archive: Path, member: str, why: str) -> UserError:
    return UserError(
        f"refusing to extract {archive}: member {member!r} {why}. "
        f"Nothing was extracted; use an archive you trust, in the official layout"
    )


def _member_parts(archive: Path, name: str) -> tuple[str, ...]:
    """The path components of a member name, or a refusal if it could leave the folder."""
    unix = name.replace("\\", "/")  # zips made on Windows use backslashes
    if unix.startswith("/") or (len(unix) > 1 and unix[1] == ":"):
        raise _refuse(archive, name, "has an absolute path")
    parts = tuple(p for p in PurePosixPath(unix).parts if p not in ("", "."))
    if ".." in parts:
        raise _refuse(archive, name, "contains `..`")
    return parts


def _inside(root: Path, path: Path) -> bool:
    """True if path (after following every link that exists on disk) stays under root."""
    root = Path(os.path.realpath(root))
    real = Path(os.path.realpath(path))
    return real == root or root in real.parents


def _check_link_target(archive: Path, root: Path, member: str, parts: tuple[str, ...], target: str) -> None:
    """Refuse a symlink member whose target is absolute or resolves outside root."""
    if target.startswith("/") or (len(target) > 1 and target[1] == ":"):
        raise _refuse(archive, member, f"is a link to an absolute path ({target})")
    if not _inside(root, root.joinpath(*parts[:-1], target)):  # realpath: `..` applies after links
        raise _refuse(archive, member, f"is a link pointing outside the folder ({target})")


def _check_all_links(archive: Path, root: Path) -> None:
    """After extraction: every link still resolves inside root. A link checked when it was
    written can be redirected by a later one (`a -> later/../x`, then `later -> .`)."""
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            if path.is_symlink() and not _inside(root, path):
                raise _refuse(archive, str(path.relative_to(root)), "is a link that ends up outside the folder")


class _Writer:
    """Creates members under root, checking on disk that no earlier link redirects them."""

    def __init__(self, archive: Path, root: Path):
        self.archive, self.root = archive, root

    def _path(self, member: str, parts: tuple[str, ...]) -> Path:
        # realpath of the parent follows every link already on disk, so this also catches
        # `link -> ..` followed by `link/evil` (folders created after it stay inside too).
        path = self.root.joinpath(*parts)
        if not _inside(self.root, path.parent):
            raise _refuse(self.archive, member, "would be written through a link pointing outside the folder")
        return path

    def directory(self, member: str, parts):
        if parts:
            path = self._path(member, parts)
            if not _inside(self.root, path):
                raise _refuse(self.archive, member, "is a folder that resolves outside the folder")
            path.mkdir(parents=True, exist_ok=True)

    def file(self, member: str, parts, source, mode: int):
        path = self._path(member, parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.is_dir():
            raise _refuse(self.archive, member, "replaces a link or folder written earlier")
        with open(path, "wb") as out:
            shutil.copyfileobj(source, out, CHUNK)
        # Keep only permission bits (no setuid/setgid/sticky), always owner-readable.
        os.chmod(path, (mode & 0o755) | 0o600)

    def symlink(self, member: str, parts, target: str):
        _check_link_target(self.archive, self.root, member, parts, target)
        path = self._path(member, parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            raise _refuse(self.archive, member, "replaces a file written earlier")
        os.symlink(target, path)

    def hardlink(self, member: str, parts, target: str):
        # Tar hard links name another member, relative to the archive root: copy that file.
        target_parts = _member_parts(self.archive, target)
        source = self.root.joinpath(*target_parts)
        if not _inside(self.root, source) or not source.is_file():
            raise _refuse(
                self.archive,
                member,
                f"is a hard link to {target!r}, which is outside the folder or not a file extracted before it",
            )
        with open(source, "rb") as f:
            self.file(member, parts, f, source.stat().st_mode)


def _extract_tar(archive: Path, writer: _Writer, keep: Callable[[str], bool] | None) -> None:
    with damage_is_user_error(archive), open_tar(archive) as tar:
        for m in tar:
            parts = _member_parts(archive, m.name)
            if m.ischr() or m.isblk() or m.isfifo() or m.isdev():
                raise _refuse(archive, m.name, "is a device or fifo file")
            if keep is not None and not keep("/".join(parts)):  # folders come with the files kept
                continue
            if m.isdir():
                writer.directory(m.name, parts)
            elif m.issym():
                writer.symlink(m.name, parts, m.linkname)
            elif m.islnk():
                writer.hardlink(m.name, parts, m.linkname)
            elif m.isreg():
                with tar.extractfile(m) as f:
                    writer.file(m.name, parts, f, m.mode)
            else:
                raise _refuse(archive, m.name, f"has an unsupported type ({m.type!r})")
        check_tar_end(archive, tar)


def _open_zip(archive: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(archive)
    except zipfile.BadZipFile:  # the magic said zip: its central directory, at the end, is missing
        raise damaged(archive, "the zip directory at its end is missing or unreadable") from None
    except OSError as e:
        raise UserError(f"{archive} cannot be read: {e.strerror or e}") from None


def _extract_zip(archive: Path, writer: _Writer, keep: Callable[[str], bool] | None) -> None:
    with damage_is_user_error(archive), _open_zip(archive) as zf:
        for info in zf.infolist():
            parts = _member_parts(archive, info.filename)
            mode = info.external_attr >> 16  # unix mode bits, 0 when made on Windows
            kind = stat.S_IFMT(mode)
            if kind in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
                raise _refuse(archive, info.filename, "is a device, fifo or socket file")
            if keep is not None and not keep("/".join(parts)):
                continue
            try:
                if info.is_dir():
                    writer.directory(info.filename, parts)
                elif kind == stat.S_IFLNK:  # zip stores a symlink's target as the member's content
                    writer.symlink(info.filename, parts, zf.read(info).decode("utf-8", "replace"))
                else:
                    with zf.open(info) as f:  # reading to the end checks the member's CRC
                        writer.file(info.filename, parts, f, mode or 0o644)
            except RuntimeError as e:  # NotImplementedError (a subclass): deflate64 and the like; else encrypted
                unsupported = isinstance(e, NotImplementedError)
                why = "its compression method is not supported" if unsupported else "it is encrypted"
                raise UserError(
                    f"{archive}: member {info.filename!r} cannot be read ({why}); nothing was "
                    f"extracted. Re-pack it as a plain (unencrypted, deflate) zip or a tar.gz"
                ) from None


def is_archive(path: str | os.PathLike) -> bool:
    """A zip or tar (any compression), judged by its first bytes, so a damaged one still counts."""
    return Path(path).is_file() and archive_kind(path) is not None


def safe_extract(
    archives: str | os.PathLike | Iterable[str | os.PathLike],
    dest: str | os.PathLike,
    keep: Callable[[str], bool] | None = None,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Extract one archive (or several, merged) so that `dest` holds their contents.

    Tar (any compression) or zip. Every member is checked before it is written; `keep`
    (member path -> bool) skips members that are not needed; `check(folder)` may refuse the
    extracted whole (its layout, its images). All goes into a temp folder in dest's parent,
    renamed over dest at the end: on refusal or error dest is left as it was.
    """
    dest = Path(dest)
    if isinstance(archives, (str, os.PathLike)):
        archives = [archives]
    dest.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".extract", dir=dest.parent))
    try:
        for archive in map(Path, archives):
            writer = _Writer(archive, tmp)
            if archive_kind(archive) == "zip":
                _extract_zip(archive, writer, keep)
            else:
                _extract_tar(archive, writer, keep)
            _check_all_links(archive, tmp)
        if check is not None:
            check(tmp)
        _replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _clear_stale(dest: Path) -> None:
    """Temp folders a killed run (SIGKILL, power loss) left beside dest."""
    for suffix in ("extract", "stage", "old"):
        for stale in dest.parent.glob(f".{glob.escape(dest.name)}.*.{suffix}"):
            shutil.rmtree(stale, ignore_errors=True)


def _replace_dir(new: Path, dest: Path) -> None:
    """Put folder `new` at `dest`, replacing what was there, never leaving a mix of both."""
    if dest.exists() or dest.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
        os.rmdir(old)
        os.replace(dest, old)
        os.replace(new, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, dest)


@contextlib.contextmanager
def staging_dir(dest: str | os.PathLike):
    """A temp folder beside dest that becomes dest when the block succeeds (else vanishes)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".stage", dir=dest.parent))
    try:
        yield tmp
        _replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_md5(cfg_md5: str | None, official: str) -> str | None:
    """`data.md5`: "default" -> the official checksum, None -> no check, else that checksum."""
    if cfg_md5 == "default":
        return official
    return cfg_md5.lower() if cfg_md5 else None


def download_cache(raw_dir: str | os.PathLike) -> Path:
    """data/downloads/: archives that are extracted elsewhere are kept here, so a re-run of
    the download stage reuses a verified copy instead of fetching it again."""
    return Path(raw_dir).parent.parent / "downloads"


def obtain(
    local: str | os.PathLike | None,
    url: str,
    official_url: str,
    md5: str | None,
    dest: str | os.PathLike,
    archive_hint: str,
    companions: dict[str, str] | None = None,
) -> Path:
    """The verified archive at dest: the user's local copy when given (`data.archive`),
    else a download. A copy already at dest with the expected md5 is reused."""
    dest = Path(dest)
    if md5 is not None and dest.is_file() and md5_file(dest) == md5.lower():
        return dest
    if local:
        return import_file(local, dest, md5)
    return download(url, dest, md5, official_url=official_url, archive_hint=archive_hint, companions=companions)
