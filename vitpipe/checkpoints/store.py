"""Where training checkpoints live: a machine-local store keyed by the run's fingerprint,
optionally mirrored to a durable fsspec URL (a mounted Drive folder, s3://, gs://, az://, ssh://).

Checkpoints are not DVC outputs, so every training stage stays in DVC's run-cache, and the
store is shared by the workspace and DVC's queued and --temp experiment copies. Layout, the
same locally and in the mirror:

    <root>/<fingerprint>/step-00001200.pt     the checkpoint (vitpipe.checkpoints.format format)
    <root>/<fingerprint>/step-00001200.json   its manifest: stage, step, total, size, sha256

Locally a checkpoint is written atomically (temp file, rename) and its manifest after it. In
the mirror, an upload counts only once its manifest exists, and the manifest is written only
after the uploaded bytes were read back and matched (size and sha256): a torn upload has no
manifest and is never taken for a checkpoint. Uploads run in one background thread, at most
one in flight, the newest waiting one wins; older checkpoints are dropped only after a newer
one is verified.

Where the store is, is a property of the machine, not of the experiment (params.yaml never
says it, so moving it invalidates no stage): VITPIPE_CHECKPOINT_DIR and
VITPIPE_CHECKPOINT_MIRROR, else a git-ignored `vitpipe.local.yaml` in the project (or a
folder above it: DVC's temp experiment copies live inside the project), else the defaults.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

from vitpipe.atomic import write_json
from vitpipe.errors import UserError

ENV_DIR = "VITPIPE_CHECKPOINT_DIR"
ENV_MIRROR = "VITPIPE_CHECKPOINT_MIRROR"
ENV_KEEP = "VITPIPE_CHECKPOINT_KEEP"
LOCAL_CONFIG = "vitpipe.local.yaml"
MIRROR_TIMEOUT_S = float(os.environ.get("VITPIPE_MIRROR_TIMEOUT_S", "30"))
DVC_REMOTE_SUBDIR = "vitpipe-checkpoints"

# fsspec protocol -> the vitpipe extra that installs its filesystem
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gs", "gcs": "gs", "az": "az", "abfs": "az", "abfss": "az",
          "adl": "az", "ssh": "ssh", "sftp": "ssh"}


def default_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vitpipe" / "checkpoints"


def local_config(start: Path | None = None) -> tuple[dict, Path | None]:
    """The nearest vitpipe.local.yaml at or above `start` (keys: checkpoint_dir, checkpoint_mirror)."""
    import yaml

    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        f = folder / LOCAL_CONFIG
        if f.is_file():
            try:
                doc = yaml.safe_load(f.read_text()) or {}
            except yaml.YAMLError as e:
                raise UserError(f"{f} is not valid YAML: {' '.join(str(e).split())}") from None
            unknown = set(doc) - {"checkpoint_dir", "checkpoint_mirror", "checkpoint_keep"} if isinstance(doc, dict) else {"?"}
            if unknown:
                raise UserError(f"{f}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; allowed: "
                                "checkpoint_dir, checkpoint_mirror, checkpoint_keep")
            return doc, f
    return {}, None


def settings() -> dict:
    """{dir, mirror, keep} from the environment, else vitpipe.local.yaml, else the defaults."""
    conf, _ = local_config()
    directory = os.environ.get(ENV_DIR) or conf.get("checkpoint_dir") or default_dir()
    mirror = os.environ.get(ENV_MIRROR, conf.get("checkpoint_mirror")) or None
    keep = os.environ.get(ENV_KEEP, str(conf.get("checkpoint_keep", ""))).lower() in ("1", "true", "yes")
    return {"dir": Path(directory).expanduser(), "mirror": mirror, "keep": keep}


@dataclass
class Found:
    """A verified checkpoint file, ready to load, and where it came from."""

    path: Path
    step: int
    where: str  # "local store <dir>" or "mirror <url>"


def _name(step: int) -> str:
    return f"step-{step:08d}"


def _warn(msg: str) -> None:
    print(f"vitpipe: warning: {msg}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------
# The mirror: any fsspec filesystem


def resolve_mirror(url: str) -> tuple[str, dict]:
    """(url, storage options). `dvc` means the project's default DVC remote, reusing its
    configuration (endpoint and credentials for S3), under <remote>/vitpipe-checkpoints."""
    if url != "dvc":
        return url.rstrip("/"), {}
    try:
        from dvc.repo import Repo

        with Repo() as repo:
            conf = repo.config
            name = conf["core"].get("remote")
            if not name:
                raise UserError(f"{ENV_MIRROR}=dvc, but this project has no default DVC remote; "
                                "set one with `dvc remote add -d <name> <url>`, or give the mirror's URL")
            remote = dict(conf["remote"][name])
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{ENV_MIRROR}=dvc: cannot read the DVC remote ({type(e).__name__}: {e}); "
                        "give the mirror's URL instead") from None
    base = str(remote["url"]).rstrip("/")
    options = {}
    if base.startswith("s3://"):
        if remote.get("endpointurl"):
            options.setdefault("client_kwargs", {})["endpoint_url"] = remote["endpointurl"]
        if remote.get("region"):
            options.setdefault("client_kwargs", {})["region_name"] = remote["region"]
        for dvc_key, fs_key in (("access_key_id", "key"), ("secret_access_key", "secret"), ("profile", "profile"),
                                ("session_token", "token")):
            if remote.get(dvc_key):
                options[fs_key] = remote[dvc_key]
    elif "://" not in base and not os.path.isabs(base):
        base = str((Path(".dvc") / base).resolve())  # DVC resolves a relative local remote from .dvc/
    return f"{base}/{DVC_REMOTE_SUBDIR}", options


def open_mirror(url: str):
    """(fsspec filesystem, root path within it). A missing extra is one clear UserError."""
    import fsspec

    url, options = resolve_mirror(url)
    protocol = url.split("://")[0] if "://" in url else "file"
    if protocol == "s3":  # fail fast on an unreachable endpoint instead of minutes of retries
        options.setdefault("config_kwargs", {"connect_timeout": 5, "read_timeout": 60,
                                             "retries": {"max_attempts": 2}})
    try:
        fs, root = fsspec.core.url_to_fs(url, **options)
    except ImportError as e:
        extra = EXTRAS.get(protocol)
        hint = f"pip install 'vitpipe[{extra}]'" if extra else f"install the fsspec filesystem for {protocol}://"
        raise UserError(f"checkpoint mirror {url} needs a package that is not installed ({e}): {hint}, "
                        f"or unset {ENV_MIRROR}") from None
    except ValueError as e:
        raise UserError(f"checkpoint mirror {url!r} is not a URL fsspec knows ({e}); set {ENV_MIRROR} to a "
                        "folder, s3://…, gs://…, az://… or ssh://…") from None
    return fs, root.rstrip("/"), url


class Uploader:
    """One background thread; `submit` replaces whatever is still waiting (newest wins)."""

    def __init__(self, store: "CheckpointStore"):
        self.store = store
        self.cond = threading.Condition()
        self.waiting: tuple[Path, int] | None = None
        self.busy = False
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="vitpipe-upload", daemon=True)
        self.thread.start()

    def submit(self, path: Path, step: int) -> None:
        with self.cond:
            self.waiting = (path, step)
            self.cond.notify_all()

    def _run(self):
        while True:
            with self.cond:
                while self.waiting is None and not self.closed:
                    self.cond.wait()
                if self.waiting is None:
                    return
                job, self.waiting, self.busy = self.waiting, None, True
            try:
                self.store._upload(*job)
            except Exception as e:  # never stops training: warn once, keep the local checkpoints
                self.store._mirror_failed("upload", e)
            finally:
                with self.cond:
                    self.busy = False
                    self.cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Wait until nothing is waiting or in flight; False on timeout."""
        end = time.monotonic() + timeout
        with self.cond:
            while self.waiting is not None or self.busy:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
        return True

    def close(self, discard: bool = False) -> None:
        with self.cond:
            if discard:
                self.waiting = None
            self.closed = True
            self.cond.notify_all()


# ---------------------------------------------------------------------------------------
# The store


class CheckpointStore:
    """The checkpoints of one run (one fingerprint): latest(), save(), finish()."""

    def __init__(self, fingerprint: str, stage: str, total_steps: int, directory: Path | None = None,
                 mirror: str | None = None, keep: bool | None = None, main: bool = True):
        conf = settings()
        self.fingerprint, self.stage, self.total = fingerprint, stage, total_steps
        self.root = Path(directory or conf["dir"]).expanduser()
        self.dir = self.root / fingerprint
        self.keep = conf["keep"] if keep is None else keep
        self.main = main
        self.mirror_url = mirror if mirror is not None else conf["mirror"]
        self.fs = self.mirror_root = None
        self._mirror_warned = False
        self.uploader = None
        if main:
            self._check_writable()
            if self.mirror_url:
                self.fs, root, self.mirror_url = open_mirror(self.mirror_url)
                self.mirror_root = f"{root}/{fingerprint}"
                self.uploader = Uploader(self)

    def _check_writable(self) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise UserError(f"checkpoint store {self.root} is not writable ({e.strerror or type(e).__name__}); "
                            f"set {ENV_DIR} to a writable folder") from None
        for tmp in self.dir.glob(".step-*"):  # a save killed mid-write leaves its temp file behind
            tmp.unlink(missing_ok=True)

    def path(self, step: int) -> Path:
        return self.dir / f"{_name(step)}.pt"

    def _mirror_failed(self, what: str, e: Exception) -> None:
        if not self._mirror_warned:
            self._mirror_warned = True
            _warn(f"checkpoint mirror {self.mirror_url} failed ({what}: {type(e).__name__}: "
                  f"{' '.join(str(e).split())[:200]}); training goes on with local checkpoints in {self.dir}")

    # -- reading --------------------------------------------------------------------------

    def local_steps(self) -> list[int]:
        """Steps with a local checkpoint and its manifest (written after the file, atomically)."""
        steps = []
        for m in self.dir.glob("step-*.json"):
            try:
                man = json.loads(m.read_text())
                if man["fingerprint"] == self.fingerprint:
                    steps.append(int(man["step"]))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return sorted(steps)

    def check_local(self, step: int, fix: str) -> None:
        """A local checkpoint whose size is not its manifest's was damaged after it was written."""
        man = json.loads((self.dir / f"{_name(step)}.json").read_text())
        size = self.path(step).stat().st_size if self.path(step).exists() else None
        if size != man["size"]:
            raise UserError(f"checkpoint {self.path(step)} is damaged: "
                            f"{'missing' if size is None else f'{size} bytes'}, written as {man['size']} bytes; {fix}")

    def mirror_manifests(self) -> dict[int, dict]:
        """step -> manifest of every verified upload of this run in the mirror."""
        if self.fs is None:
            return {}
        found = {}
        for f in self._with_timeout(lambda: self.fs.glob(f"{self.mirror_root}/step-*.json")):
            try:
                man = json.loads(self._with_timeout(lambda f=f: self.fs.cat_file(f)))
                step = int(man["step"])
            except (ValueError, KeyError, TypeError):
                _warn(f"ignoring {f} in the checkpoint mirror: not a vitpipe manifest")
                continue
            if man.get("fingerprint") != self.fingerprint:
                _warn(f"ignoring {f} in the checkpoint mirror: it belongs to another run "
                      f"(fingerprint {man.get('fingerprint')!r}, this run is {self.fingerprint})")
                continue
            found[step] = man
        return found

    def _with_timeout(self, fn):
        pool = ThreadPoolExecutor(1)  # a hung network call must not hang the stage
        try:
            return pool.submit(fn).result(timeout=MIRROR_TIMEOUT_S)
        except FutureTimeout:
            raise TimeoutError(f"no answer in {MIRROR_TIMEOUT_S:g} s") from None
        finally:
            pool.shutdown(wait=False)

    def latest(self, fix: str) -> Found | None:
        """The newest checkpoint of this run, local or in the mirror (downloaded and verified).
        A damaged local one is an error that ends with `fix`, never silently skipped."""
        local = self.local_steps()
        if local:
            self.check_local(local[-1], fix)
        best = Found(self.path(local[-1]), local[-1], f"local store {self.dir}") if local else None
        if self.fs is None:
            return best
        try:
            remote = self.mirror_manifests()
        except Exception as e:
            self._mirror_failed("listing", e)
            return best
        for step in sorted(remote, reverse=True):
            if best is not None and step <= best.step:
                break
            try:
                return self._download(step, remote[step])
            except Exception as e:
                _warn(f"ignoring step {step} in the checkpoint mirror {self.mirror_url}: {e}")
        return best

    def _download(self, step: int, man: dict) -> Found:
        src = f"{self.mirror_root}/{_name(step)}.pt"
        tmp = self.dir / f".{_name(step)}.download"
        self._with_timeout(lambda: self.fs.get_file(src, str(tmp)))
        size, digest = tmp.stat().st_size, sha256_file(tmp)
        if size != man["size"] or digest != man["sha256"]:
            tmp.unlink(missing_ok=True)
            raise ValueError(f"{src} does not match its manifest (size {size} vs {man['size']}, sha256 differs: "
                             f"{digest != man['sha256']})")
        os.replace(tmp, self.path(step))
        self._write_manifest(step, size)
        return Found(self.path(step), step, f"mirror {self.mirror_url}")

    # -- writing --------------------------------------------------------------------------

    def _manifest(self, step: int, size: int, **more) -> dict:
        return {"stage": self.stage, "fingerprint": self.fingerprint, "step": step, "total_steps": self.total,
                "size": size, "written": time.time(), **more}

    def _write_manifest(self, step: int, size: int) -> None:
        write_json(self.dir / f"{_name(step)}.json", self._manifest(step, size))

    def commit(self, step: int) -> None:
        """Called after checkpoint.save wrote self.path(step): manifest it, drop older local
        steps, hand it to the uploader."""
        self._write_manifest(step, self.path(step).stat().st_size)
        for old in self.local_steps():
            if old < step:
                self.drop_local(old)
        if self.uploader is not None:
            self.uploader.submit(self.path(step), step)

    def drop_local(self, step: int) -> None:
        (self.dir / f"{_name(step)}.json").unlink(missing_ok=True)  # manifest first: never a manifest without its file
        self.path(step).unlink(missing_ok=True)

    def _upload(self, path: Path, step: int) -> None:
        try:
            f = open(path, "rb")  # open first: a newer save may unlink it, the open file stays readable
        except FileNotFoundError:
            return  # superseded before it could start
        dst = f"{self.mirror_root}/{_name(step)}.pt"
        with f:
            size = os.fstat(f.fileno()).st_size
            digest = hashlib.sha256()
            self.fs.makedirs(self.mirror_root, exist_ok=True)
            with self.fs.open(dst, "wb") as out:
                for chunk in iter(lambda: f.read(8 << 20), b""):
                    digest.update(chunk)
                    out.write(chunk)
        # verify what the mirror holds before anything older is dropped
        if self.fs.size(dst) != size:
            raise OSError(f"{dst}: uploaded {self.fs.size(dst)} bytes of {size}")
        check = hashlib.sha256()
        with self.fs.open(dst, "rb") as back:
            for chunk in iter(lambda: back.read(8 << 20), b""):
                check.update(chunk)
        if check.hexdigest() != digest.hexdigest():
            raise OSError(f"{dst}: the uploaded bytes differ from the checkpoint (sha256)")
        self.fs.pipe_file(f"{self.mirror_root}/{_name(step)}.json",
                          json.dumps(self._manifest(step, size, sha256=digest.hexdigest())).encode())
        for old in self.fs.glob(f"{self.mirror_root}/step-*"):
            name = old.rsplit("/", 1)[-1]
            if name.split(".")[0] < _name(step):  # older steps, and torn uploads of them
                self.fs.rm_file(old)

    def wait_for_upload(self, timeout: float = 120.0) -> None:
        if self.uploader is not None and not self.uploader.drain(timeout):
            _warn(f"the upload to {self.mirror_url} did not finish in {timeout:g} s; the mirror keeps an older step")

    def close(self, discard_waiting: bool = False) -> None:
        """Stop the uploader once what is in flight is done (and what waits, unless discarded)."""
        if self.uploader is not None:
            self.uploader.close(discard=discard_waiting)
            self.uploader.thread.join(timeout=120)  # a hung upload must not hang the stage (daemon thread)
            self.uploader = None

    def discard(self) -> None:
        """Remove every checkpoint of this run, locally and in the mirror; the store stays
        open for the run's next checkpoints."""
        had_uploader = self.uploader is not None
        self.close(discard_waiting=True)
        for f in self.dir.glob("*"):
            f.unlink(missing_ok=True)
        try:
            self.dir.rmdir()
        except OSError:
            pass
        if self.fs is not None:
            try:
                if self._with_timeout(lambda: self.fs.exists(self.mirror_root)):
                    self._with_timeout(lambda: self.fs.rm(self.mirror_root, recursive=True))
            except Exception as e:
                self._mirror_failed("removing a finished run", e)
        if had_uploader:
            self.uploader = Uploader(self)

    def finish(self) -> None:
        """The run's outputs are written: its checkpoints go, unless the user keeps them."""
        if self.keep:
            self.wait_for_upload()
        else:
            self.discard()
        self.close()


# ---------------------------------------------------------------------------------------
# Listing and removal (`vitpipe checkpoints`)


def list_runs(root: Path) -> list[dict]:
    """One row per stored run: stage, fingerprint, step/total, age, size, where."""
    rows = []
    root = Path(root)
    for run in sorted(p for p in root.glob("*") if p.is_dir() and not p.name.startswith(".")):
        mans = []
        for m in run.glob("step-*.json"):
            try:
                mans.append(json.loads(m.read_text()))
            except (OSError, ValueError):
                continue
        if not mans:
            continue
        man = max(mans, key=lambda m: m.get("step", -1))
        rows.append(run_row(man, run.name, sum(f.stat().st_size for f in run.glob("step-*.pt")), str(run)))
    return rows


def run_row(manifest: dict, fingerprint: str, size: int, where: str) -> dict:
    """One `vitpipe checkpoints` row: a run's newest manifest, its size and where it is."""
    return {"stage": manifest.get("stage"), "fingerprint": fingerprint, "step": manifest.get("step"),
            "total_steps": manifest.get("total_steps"), "age_s": time.time() - manifest.get("written", time.time()),
            "size_bytes": size, "where": where}
