"""The checkpoint store's durable mirror: any fsspec filesystem (a mounted Drive folder, s3://,
gs://, az://, ssh://, or `dvc`: the project's default DVC remote). Same layout as the local
store (vitpipe.checkpoints.store):

    <root>/<fingerprint>/step-00001200.pt        a checkpoint
    <root>/<fingerprint>/step-00001200.dcp/      or a sharded run's (DCP's files and rest.pt)
    <root>/<fingerprint>/step-00001200.json      its manifest (size, sha256; a folder's: each file's), written once verified
    <root>/<fingerprint>/finished/<name>         a finished run's outputs (weights, metrics, step logs)
    <root>/<fingerprint>/finished.json           the finished record's manifest, written once verified

Every upload is read back and compared (size and sha256) before its manifest is written: a torn
upload has no manifest and is never taken for anything. A folder checkpoint goes file by file,
each read back, then its manifest; it comes back file by file into a temp folder, each
verified, renamed into place only once all are. Mirror URLs and DVC remotes can carry
credentials: `redact` removes them from every URL or error this module lets out.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from urllib.parse import unquote, urlsplit

from vitpipe.checkpoints.manifest import Damaged, check_name, confined, parse_record, parse_step, read_json
from vitpipe.errors import UserError
from vitpipe.settings import check_address, redact  # noqa: F401  (redact: this module's helper too)

ENV_MIRROR = "VITPIPE_CHECKPOINT_MIRROR"
DVC_REMOTE_SUBDIR = "vitpipe-checkpoints"
RECORD = "finished"  # <fp>/finished.json and <fp>/finished/<name>
FOLDER = ".dcp"  # <fp>/step-00001200.dcp/: a sharded checkpoint, one folder of files
CHUNK = 8 << 20

# fsspec protocol -> the vitpipe extra that installs its filesystem
EXTRAS = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gs",
    "gcs": "gs",
    "az": "az",
    "abfs": "az",
    "abfss": "az",
    "adl": "az",
    "ssh": "ssh",
    "sftp": "ssh",
}
# DVC remote settings that are credentials (never shown), and the s3fs options they become
DVC_S3_CREDENTIALS = {"access_key_id": "key", "secret_access_key": "secret", "session_token": "token"}


def url_secrets(url: str) -> list[str]:
    """The credentials a URL carries: its password, user name and query values, raw and decoded."""
    try:
        parts = urlsplit(str(url))
    except ValueError:
        return []
    found = [parts.password, parts.username, *(v for kv in parts.query.split("&") for v in kv.split("=")[1:])]
    return [s for raw in found if raw for s in (raw, unquote(raw))]


def warn(msg: str) -> None:
    print(f"vitpipe: warning: {msg}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return copy_hashing(f, None)[1]


def mismatch(path: Path, size: int, sha256: str) -> str | None:
    """Why the file at `path` is not the one its manifest describes; None when it is. Every
    file was read back and matched when it was written, so a mismatch is a later change."""
    got = path.stat().st_size if path.is_file() else None
    if got != size:
        return f"{'missing' if got is None else f'{got} bytes'}, written as {size} bytes"
    if sha256_file(path) != sha256:
        return "its content does not match the sha256 its manifest holds (changed after it was written)"
    return None


def copy_hashing(src, dst) -> tuple[int, str]:
    """Copy file object `src` into `dst` (None: only read it); (bytes, sha256)."""
    h, size = hashlib.sha256(), 0
    for chunk in iter(lambda: src.read(CHUNK), b""):
        h.update(chunk)
        size += len(chunk)
        if dst is not None:
            dst.write(chunk)
    return size, h.hexdigest()


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def resolve(url: str) -> tuple[str, dict, list[str]]:
    """(url, storage options, secrets). `dvc` means the project's default DVC remote, reusing
    its configuration (endpoint and credentials for S3), under <remote>/vitpipe-checkpoints.
    Keys in an s3 URL (s3://KEY:SECRET@bucket/...) become s3fs's key and secret."""
    if url == "dvc":
        return _resolve_dvc()
    url, secrets = url.rstrip("/"), url_secrets(url)
    parts = urlsplit(url) if "://" in url else None
    if parts is not None and parts.scheme in ("s3", "s3a") and parts.username:
        options = {"key": unquote(parts.username), "secret": unquote(parts.password or "")}
        return f"{parts.scheme}://{parts.hostname}{parts.path}", options, secrets
    return url, {}, secrets


def _resolve_dvc() -> tuple[str, dict, list[str]]:
    try:
        from dvc.repo import Repo

        with Repo() as repo:
            conf = repo.config
            name = conf["core"].get("remote")
            if not name:
                raise UserError(
                    f"{ENV_MIRROR}=dvc, but this project has no default DVC remote; "
                    "set one with `dvc remote add -d <name> <url>`, or give the mirror's URL"
                )
            remote = dict(conf["remote"][name])
    except UserError:
        raise
    except Exception as e:
        raise UserError(
            f"{ENV_MIRROR}=dvc: cannot read the DVC remote ({type(e).__name__}: {redact(e)}); "
            "give the mirror's URL instead"
        ) from None
    secrets = [str(remote[k]) for k in (*DVC_S3_CREDENTIALS, "password", "profile") if remote.get(k)]
    secrets += url_secrets(remote["url"]) + url_secrets(remote.get("endpointurl", ""))
    base, options, more = resolve(str(remote["url"]))
    if base.startswith("s3://"):
        if remote.get("endpointurl"):
            options.setdefault("client_kwargs", {})["endpoint_url"] = remote["endpointurl"]
        if remote.get("region"):
            options.setdefault("client_kwargs", {})["region_name"] = remote["region"]
        for dvc_key, fs_key in (*DVC_S3_CREDENTIALS.items(), ("profile", "profile")):
            if remote.get(dvc_key):
                options[fs_key] = remote[dvc_key]
    elif "://" not in base and not os.path.isabs(base):
        base = str((Path(".dvc") / base).resolve())  # DVC resolves a relative local remote from .dvc/
    return f"{base}/{DVC_REMOTE_SUBDIR}", options, secrets + more


class Mirror:
    """A durable copy of the checkpoint store. `shown` is its URL without credentials; every
    error this class raises or warns with is already redacted."""

    def __init__(self, url: str, timeout_s: float = 30.0):
        import fsspec

        given, self.timeout_s = url.rstrip("/"), timeout_s
        try:
            url = check_address(url)
        except ValueError as e:
            raise UserError(f"checkpoint mirror: {e}; or unset {ENV_MIRROR}") from None
        url, options, self.secrets = resolve(url)
        self.secrets += [str(v) for k, v in options.items() if k in ("key", "secret", "token")]
        self.shown = self.scrub(url if given == "dvc" else given)  # the user's URL, without credentials
        protocol = url.split("://")[0] if "://" in url else "file"
        if protocol == "s3":  # fail fast on an unreachable endpoint instead of minutes of retries
            options.setdefault(
                "config_kwargs", {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 2}}
            )
        try:
            self.fs, root = fsspec.core.url_to_fs(url, **options)
        except ImportError as e:
            extra = EXTRAS.get(protocol)
            hint = f"pip install 'vitpipe[{extra}]'" if extra else f"install the fsspec filesystem for {protocol}://"
            raise UserError(
                f"checkpoint mirror {self.shown} needs a package that is not installed "
                f"({self.scrub(e)}): {hint}, or unset {ENV_MIRROR}"
            ) from None
        except ValueError as e:
            raise UserError(
                f"checkpoint mirror {self.shown} is not a URL fsspec knows ({self.scrub(e)}); set "
                f"{ENV_MIRROR} to a folder, s3://…, gs://…, az://… or ssh://…"
            ) from None
        self.root = root.rstrip("/")

    def scrub(self, text) -> str:
        return redact(text, self.secrets)

    def error(self, e: Exception) -> str:
        """An exception of the filesystem as one line without credentials."""
        return f"{type(e).__name__}: {self.scrub(' '.join(str(e).split()))[:200]}"

    def where(self, fp: str) -> str:
        return f"{self.shown}/{fp}"

    def timed(self, fn):
        """fn() or TimeoutError: a hung network call must not hang the stage."""
        pool = ThreadPoolExecutor(1)
        try:
            return pool.submit(fn).result(timeout=self.timeout_s)
        except FutureTimeout:
            raise TimeoutError(f"no answer in {self.timeout_s:g} s (VITPIPE_MIRROR_TIMEOUT_S)") from None
        finally:
            pool.shutdown(wait=False)

    def shown_path(self, path: str) -> str:
        """A path in the mirror as the user's URL shows it."""
        return f"{self.shown}/{path[len(self.root) + 1 :]}"

    def _read_json(self, path: str):
        """A manifest's JSON (Damaged, naming it, when it is not JSON)."""
        return read_json(self.timed(lambda: self.fs.cat_file(path)), self.shown_path(path))

    def _put_verified(self, src: Path | object, dst: str) -> tuple[int, str]:
        """Upload a file (a path or an open binary file), read it back, compare; (size, sha256)."""
        self.fs.makedirs(dst.rsplit("/", 1)[0], exist_ok=True)
        with open(src, "rb") if isinstance(src, (str, Path)) else src as f, self.fs.open(dst, "wb") as out:
            size, digest = copy_hashing(f, out)
        if self.fs.size(dst) != size:
            raise OSError(f"{self.shown}/{dst[len(self.root) + 1 :]}: uploaded {self.fs.size(dst)} bytes of {size}")
        with self.fs.open(dst, "rb") as back:
            if copy_hashing(back, None)[1] != digest:
                raise OSError(f"{self.shown}: the uploaded bytes differ from the file (sha256)")
        return size, digest

    def _get_verified(self, src: str, dst: Path, size: int, sha256: str) -> None:
        """Download to dst; ValueError (dst removed) unless it matches size and sha256."""
        self.timed(lambda: self.fs.get_file(src, str(dst)))
        why = mismatch(dst, size, sha256)
        if why:
            dst.unlink(missing_ok=True)
            raise ValueError(f"{self.shown}/{src[len(self.root) + 1 :]} does not match its manifest: {why}")

    # -- checkpoints ------------------------------------------------------------------------

    def checkpoints(self, fp: str) -> dict[int, dict]:
        """step -> manifest of every verified upload of run `fp`; foreign manifests are skipped
        with a warning."""
        found = {}
        for f in self.timed(lambda: self.fs.glob(f"{self.root}/{fp}/step-*.json")):
            shown = self.shown_path(f)
            try:
                man = parse_step(self._read_json(f), shown, mirrored=True)
                step = man["step"]
            except Damaged as e:
                warn(f"ignoring {shown} in the checkpoint mirror: not a vitpipe manifest ({e})")
                continue
            if man.get("fingerprint") != fp:
                warn(
                    f"ignoring {shown} in the checkpoint mirror: it belongs to another run "
                    f"(fingerprint {man.get('fingerprint')!r}, this run is {fp})"
                )
                continue
            found[step] = man
        return found

    def get_checkpoint(self, fp: str, step: int, manifest: dict, dst: Path) -> None:
        """Download a checkpoint to dst, verified; a folder's (manifest["files"]) file by file
        into the folder dst (ValueError on the first that does not match)."""
        if "files" not in manifest:
            self._get_verified(f"{self.root}/{fp}/{step_name(step)}.pt", dst, manifest["size"], manifest["sha256"])
            return
        dst.mkdir(parents=True, exist_ok=True)
        where = f"{self.where(fp)}/{step_name(step)}.json"
        for name, meta in manifest["files"].items():
            target = confined(dst, name, where)  # a manifest never writes outside dst
            target.parent.mkdir(parents=True, exist_ok=True)
            self._get_verified(
                f"{self.root}/{fp}/{step_name(step)}{FOLDER}/{name}", target, meta["size"], meta["sha256"]
            )

    def put_checkpoint(self, fp: str, path: Path, step: int, manifest: dict) -> None:
        """Upload a checkpoint, verified, then its manifest (with size and sha256), then drop
        older steps (and torn uploads of them)."""
        if "files" in manifest:
            return self._put_folder(fp, path, step, manifest)
        try:
            f = open(path, "rb")  # open first: a newer save may unlink it, the open file stays readable
        except FileNotFoundError:
            return  # superseded before it could start
        size, digest = self._put_verified(f, f"{self.root}/{fp}/{step_name(step)}.pt")
        self.fs.pipe_file(
            f"{self.root}/{fp}/{step_name(step)}.json", json.dumps(manifest | {"size": size, "sha256": digest}).encode()
        )
        self._drop_older(fp, step)

    def _put_folder(self, fp: str, folder: Path, step: int, manifest: dict) -> None:
        """A sharded checkpoint: each file uploaded and read back against the local manifest's
        size and sha256, then the manifest. Every file is opened first, as a .pt is: a newer
        save may remove the folder, the open files stay readable."""
        remote = f"{self.root}/{fp}/{step_name(step)}"
        with contextlib.ExitStack() as opened:
            try:
                files = {
                    name: opened.enter_context(open(confined(folder, name, f"{folder}.json"), "rb"))
                    for name in manifest["files"]
                }
            except FileNotFoundError:
                return  # superseded before it could start
            if self.fs.exists(
                f"{remote}.json"
            ):  # this step again (another run of this fingerprint): old manifest out first
                self.fs.rm_file(f"{remote}.json")
            if self.fs.exists(f"{remote}{FOLDER}"):
                self.fs.rm(f"{remote}{FOLDER}", recursive=True)
            for name, f in files.items():
                want = manifest["files"][name]
                if self._put_verified(f, f"{remote}{FOLDER}/{name}") != (want["size"], want["sha256"]):
                    raise OSError(f"{folder / name} changed after its checkpoint was written")
        self.fs.pipe_file(f"{remote}.json", json.dumps(manifest).encode())
        self._drop_older(fp, step)

    def _drop_older(self, fp: str, step: int) -> None:
        """Remove the checkpoints (and torn uploads) of steps before `step`."""
        for old in self.fs.glob(f"{self.root}/{fp}/step-*"):
            if old.rsplit("/", 1)[-1].split(".")[0] < step_name(step):
                self._rm(old)

    def _rm(self, path: str) -> None:
        if path.endswith(FOLDER):
            self.fs.rm(path, recursive=True)
        else:
            self.fs.rm_file(path)

    def drop_checkpoints(self, fp: str) -> None:
        for f in self.timed(lambda: self.fs.glob(f"{self.root}/{fp}/step-*")):
            self.timed(lambda f=f: self._rm(f))

    # -- finished records ----------------------------------------------------------------------

    def put_record(self, fp: str, files: dict[str, Path], manifest: dict) -> None:
        """Upload a finished run's files, each verified against the manifest's digests, then
        the manifest: only then does the record exist."""
        for name, path in files.items():
            check_name(name, f"the record of {fp}")
            size, digest = self._put_verified(path, f"{self.root}/{fp}/{RECORD}/{name}")
            want = manifest["files"][name]
            if (size, digest) != (want["size"], want["sha256"]):
                raise OSError(f"{path} changed while it was uploaded")
        self.fs.pipe_file(f"{self.root}/{fp}/{RECORD}.json", json.dumps(manifest).encode())

    def record_file(self, fp: str) -> str:
        return f"{self.where(fp)}/{RECORD}.json"

    def record(self, fp: str) -> dict | None:
        """The finished record's manifest of run `fp`, parsed (Damaged naming the file), or None."""
        path = f"{self.root}/{fp}/{RECORD}.json"
        if not self.timed(lambda: self.fs.exists(path)):
            return None
        return parse_record(self._read_json(path), self.record_file(fp))

    def get_record(self, fp: str, manifest: dict, folder: Path) -> None:
        """Download a record's files into `folder`, each verified (ValueError otherwise)."""
        for name, meta in manifest["files"].items():
            target = confined(folder, name, self.record_file(fp))
            target.parent.mkdir(parents=True, exist_ok=True)
            self._get_verified(f"{self.root}/{fp}/{RECORD}/{name}", target, meta["size"], meta["sha256"])

    # -- every run (`vitpipe checkpoints`) -------------------------------------------------------

    def exists(self) -> bool:
        return bool(self.timed(lambda: self.fs.exists(self.root)))

    def runs(self) -> list[tuple[str, str, dict | None, int, str | None]]:
        """(fingerprint, kind, manifest, bytes, problem): each run's newest verified checkpoint
        and its finished record, if any; a damaged manifest is a row of kind `damaged` with
        its problem (manifest None), never a reason to leave the other runs out."""
        newest: dict[str, dict] = {}
        rows = []
        for f in self.timed(lambda: self.fs.glob(f"{self.root}/*/step-*.json")):
            fp = f.rsplit("/", 2)[-2]
            try:
                man = parse_step(self._read_json(f), self.shown_path(f), mirrored=True)
            except FileNotFoundError:
                continue  # dropped by a newer upload between the listing and the read
            except Damaged as e:
                rows.append((fp, "damaged", None, 0, str(e)))
                continue
            if fp not in newest or man["step"] > newest[fp]["step"]:
                newest[fp] = man
        rows += [(fp, "checkpoint", m, m["size"], None) for fp, m in newest.items()]
        for f in self.timed(lambda: self.fs.glob(f"{self.root}/*/{RECORD}.json")):
            fp = f.rsplit("/", 2)[-2]
            try:
                man = parse_record(self._read_json(f), self.shown_path(f))
            except FileNotFoundError:
                continue
            except Damaged as e:
                rows.append((fp, "damaged", None, 0, str(e)))
                continue
            rows.append((fp, "finished", man, record_size(man), None))
        return sorted(rows, key=lambda r: (r[0], r[1]))

    def remove(self, fp: str) -> None:
        """Everything of run `fp`: checkpoints and finished record."""
        if self.timed(lambda: self.fs.exists(f"{self.root}/{fp}")):
            self.timed(lambda: self.fs.rm(f"{self.root}/{fp}", recursive=True))


def record_size(manifest: dict) -> int:
    """Bytes of a parsed record's files."""
    return sum(f["size"] for f in manifest["files"].values())
