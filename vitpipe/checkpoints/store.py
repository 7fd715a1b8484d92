"""Where training checkpoints live: a machine-local store keyed by the run's fingerprint,
optionally mirrored to a durable fsspec URL (vitpipe.checkpoints.mirror: a mounted Drive
folder, s3://, gs://, az://, ssh://, or the project's DVC remote).

Checkpoints are not DVC outputs, so every training stage stays in DVC's run-cache, and the
store is shared by the workspace and DVC's queued and --temp experiment copies. Layout, the
same locally and in the mirror:

    <root>/<fingerprint>/step-00001200.pt     the checkpoint (vitpipe.checkpoints.format format)
    <root>/<fingerprint>/step-00001200.dcp/   or a sharded run's: DCP's files (one per process,
                                              .metadata) and rest.pt (this format, without the
                                              model and optimizer state)
    <root>/<fingerprint>/step-00001200.json   its manifest: stage, step, total, size, sha256
                                              (a folder's: size and sha256 of each of its files)
    <root>/<fingerprint>/finished/            a finished run's outputs: weights, metrics, step logs
    <root>/<fingerprint>/finished.json        their manifest: the run's fingerprint and config,
                                              each file's size and sha256

Locally a checkpoint is written atomically (temp file, rename) and its manifest after it
(`commit()`); a folder checkpoint is written by every process into a hidden temp folder, which
rank 0 renames into place before it writes the manifest (`commit_folder()`). A kill mid-write
leaves only hidden temp files and folders, removed when the store is next opened. A folder's
files are verified against their manifest (size and sha256) before they are loaded.

In the mirror, an upload counts only once its manifest exists, and the manifest is written
only after the uploaded bytes were read back and matched (size and sha256): a torn upload
has no manifest and is never taken for a checkpoint. Uploads run in one background
thread, at most one in flight, the newest waiting one wins; older checkpoints are dropped only
after a newer one is verified.

When a run finishes (`finish()`), its outputs are recorded, locally and in the mirror, and its
checkpoints go: the record is what the run produced, without optimizer state, so that a new
machine sharing the mirror restores the finished run instead of training it again
(`finished_record()`, `restore()`).

Where the store is, is a property of the machine, not of the experiment (params.yaml never
says it, so moving it invalidates no stage): VITPIPE_CHECKPOINT_DIR and
VITPIPE_CHECKPOINT_MIRROR, else a git-ignored `vitpipe.local.yaml` in the project (or a
folder above it: DVC's temp experiment copies live inside the project), else the defaults.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from vitpipe import settings as machine_settings
from vitpipe.atomic import atomic_path, write_json
from vitpipe.checkpoints import format as checkpoint_format
from vitpipe.checkpoints.lock import RunLock, held_by_other, this_clone
from vitpipe.checkpoints.manifest import Damaged, confined, parse_record, parse_step, read_file
from vitpipe.checkpoints.mirror import (
    FOLDER,
    RECORD,
    Mirror,
    copy_hashing,
    mismatch,
    record_size,
    sha256_file,
    warn,
)
from vitpipe.checkpoints.mirror import step_name as _name
from vitpipe.errors import UserError

ENV_DIR = "VITPIPE_CHECKPOINT_DIR"
ENV_KEEP = "VITPIPE_CHECKPOINT_KEEP"
REST = "rest.pt"  # in a sharded checkpoint's folder: everything but the model and optimizer state
DAMAGED = "damaged"  # a listing row's kind for a run whose manifest is damaged


def settings() -> machine_settings.Settings:
    """The machine's settings (vitpipe.settings): the environment, else vitpipe.local.yaml,
    else the defaults, each checked."""
    return machine_settings.load()


@dataclass
class Found:
    """A verified checkpoint file, ready to load, and where it came from."""

    path: Path
    step: int
    where: str  # "local store <dir>" or "mirror <url>"


@dataclass
class Record:
    """A verified finished run: its files in `folder`, by name, and where they came from."""

    folder: Path
    manifest: dict
    where: str  # "local store <dir>" or "mirror <url>"


class Uploader:
    """One background thread uploading one run's checkpoints through the mirror's public
    methods; `submit` replaces whatever is still waiting (newest wins)."""

    def __init__(self, mirror: Mirror, fingerprint: str, on_error):
        self.mirror, self.fingerprint, self.on_error = mirror, fingerprint, on_error
        self.cond = threading.Condition()
        self.waiting: tuple[Path, int, dict] | None = None
        self.busy = False
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="vitpipe-upload", daemon=True)
        self.thread.start()

    def submit(self, path: Path, step: int, manifest: dict) -> None:
        with self.cond:
            self.waiting = (path, step, manifest)
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
                self.mirror.put_checkpoint(self.fingerprint, *job)
            except Exception as e:  # never stops training: warn once, keep the local checkpoints
                self.on_error("upload", e)
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
    """The checkpoints of one run (one fingerprint): latest(), commit(), finish(), and its
    finished record: finished_record(), restore()."""

    def __init__(
        self,
        fingerprint: str,
        stage: str,
        total_steps: int,
        directory: Path | None = None,
        mirror: str | None = None,
        keep: bool | None = None,
        main: bool = True,
    ):
        conf = settings()
        self.fingerprint, self.stage, self.total = fingerprint, stage, total_steps
        self.root = Path(directory or conf.checkpoint_dir).expanduser()
        self.dir = self.root / fingerprint
        self.keep = conf.checkpoint_keep if keep is None else keep
        self.main, self.clone = main, this_clone()
        url = mirror if mirror is not None else conf.checkpoint_mirror
        self.mirror: Mirror | None = None
        self._mirror_warned: set[str] = set()  # the kinds of mirror failure already reported
        self.uploader = None
        self.lock = RunLock(self.root, fingerprint, stage)
        if main:
            if url:
                self.mirror = Mirror(url, conf.mirror_timeout_s)
            self._check_writable()
            self.lock.acquire(wait=conf.checkpoint_wait)  # one writer per run: the store is ours from here
            self._clean()
            if self.mirror is not None:
                self.uploader = self._new_uploader()

    def _new_uploader(self) -> Uploader:
        return Uploader(self.mirror, self.fingerprint, self.mirror_failed)

    def _check_writable(self) -> None:
        if self.dir.is_symlink():
            raise UserError(
                f"checkpoint store {self.dir} is a symbolic link (to {os.readlink(self.dir)!r}), which "
                f"the store never makes; remove it with `vitpipe checkpoints rm {self.fingerprint}`"
            )
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise UserError(
                f"checkpoint store {self.root} is not writable ({e.strerror or type(e).__name__}); "
                f"set {ENV_DIR} to a writable folder"
            ) from None

    def _clean(self) -> None:
        for tmp in [*self.dir.glob(".step-*"), *self.dir.glob(".*.download")]:  # left by a kill mid-write
            _remove(tmp)
        shutil.rmtree(self.dir / f".{RECORD}.download", ignore_errors=True)

    def path(self, step: int) -> Path:
        return self.dir / f"{_name(step)}.pt"

    def folder(self, step: int) -> Path:
        """A sharded run's checkpoint: a folder (see commit_folder)."""
        return self.dir / f"{_name(step)}{FOLDER}"

    def temp_folder(self, step: int) -> Path:
        """Where every process writes a sharded checkpoint before rank 0 renames it into place."""
        return self.dir / f".{_name(step)}{FOLDER}.tmp"

    @property
    def mirror_shown(self) -> str | None:
        """The mirror's URL without credentials (None without a mirror)."""
        return self.mirror.shown if self.mirror is not None else None

    def _ask_mirror(self, what: str, call, default=None):
        """call(mirror)'s result; when the mirror fails, one warning (training goes on with the
        local store) and `default`."""
        try:
            return call(self.mirror)
        except Exception as e:
            self.mirror_failed(what, e)
            return default

    def mirror_failed(self, what: str, e: Exception) -> None:
        """One warning per kind of failure (the mirror not answering; what it holds being
        damaged), so that one kind never hides the other."""
        kind = "damaged" if isinstance(e, ValueError) else "failing"
        if kind not in self._mirror_warned:
            self._mirror_warned.add(kind)
            warn(
                f"checkpoint mirror {self.mirror.shown} failed ({what}: {self.mirror.error(e)}); "
                f"training goes on with local checkpoints in {self.dir}"
            )

    # -- reading --------------------------------------------------------------------------

    def local_steps(self, fix: str | None = None) -> list[int]:
        """Steps with a local checkpoint and its manifest (written after the file, atomically).
        Given `fix`, a damaged manifest is a UserError ending with it; else it is passed over."""
        steps = []
        for m in self.dir.glob("step-*.json"):
            try:
                man = parse_step(read_file(m), str(m))
            except (OSError, Damaged) as e:
                if fix is not None and not isinstance(e, FileNotFoundError):
                    raise UserError(f"checkpoint manifest {_one_line(e)}; {fix}") from None
                continue
            if man["fingerprint"] == self.fingerprint:
                steps.append(man["step"])
        return sorted(steps)

    def check_local(self, step: int, fix: str) -> None:
        """A local checkpoint whose size is not its manifest's was damaged after it was written.
        A folder's files are checked for size and sha256 too (DCP's files carry no digest)."""
        where = self.dir / f"{_name(step)}.json"
        try:
            man = parse_step(read_file(where), str(where))
        except (OSError, Damaged) as e:
            raise UserError(f"checkpoint manifest {_one_line(e)}; {fix}") from None
        if "files" in man:
            return self._check_folder(step, man["files"], fix)
        size = self.path(step).stat().st_size if self.path(step).exists() else None
        if size != man["size"]:
            raise UserError(
                f"checkpoint {self.path(step)} is damaged: "
                f"{'missing' if size is None else f'{size} bytes'}, written as {man['size']} bytes; {fix}"
            )

    def _check_folder(self, step: int, files: dict, fix: str) -> None:
        for name, meta in files.items():
            try:
                path = confined(self.folder(step), name, str(self.dir / f"{_name(step)}.json"))
            except Damaged as e:
                raise UserError(f"{e}; {fix}") from None
            why = mismatch(path, meta["size"], meta["sha256"])
            if why:
                raise UserError(f"checkpoint {path} is damaged: {why}; {fix}")

    def latest(self, fix: str) -> Found | None:
        """The newest checkpoint of this run, local or in the mirror (downloaded and verified).
        A damaged local one is an error that ends with `fix`, never silently skipped."""
        local = self.local_steps(fix)
        if local:
            self.check_local(local[-1], fix)
        best = Found(self._where(local[-1]), local[-1], f"local store {self.dir}") if local else None
        if self.mirror is None:
            return best
        remote = self._ask_mirror("listing", lambda mirror: mirror.checkpoints(self.fingerprint), {})
        for step in sorted(remote, reverse=True):
            if best is not None and step <= best.step:
                break
            man = remote[step]
            sharded = "files" in man
            tmp = self.dir / f".{_name(step)}{FOLDER if sharded else ''}.download"
            try:
                self.mirror.get_checkpoint(self.fingerprint, step, man, tmp)
            except Exception as e:
                _remove(tmp)
                warn(f"ignoring step {step} in the checkpoint mirror {self.mirror.shown}: {self.mirror.error(e)}")
                continue
            path = self.folder(step) if sharded else self.path(step)
            _remove(path)  # a local one without a manifest (killed before it was written)
            os.replace(tmp, path)  # verified: into place, then its manifest
            write_json(
                self.dir / f"{_name(step)}.json",
                self._manifest(step, size=man["size"], **({"files": man["files"]} if sharded else {})),
            )
            return Found(path, step, f"mirror {self.mirror.shown}")
        return best

    def _where(self, step: int) -> Path:
        """The checkpoint of a local step: its folder for a sharded run, else its file."""
        return self.folder(step) if self.folder(step).is_dir() else self.path(step)

    # -- writing --------------------------------------------------------------------------

    def _manifest(self, step: int, **more) -> dict:
        return {
            "stage": self.stage,
            "fingerprint": self.fingerprint,
            "step": step,
            "total_steps": self.total,
            "written": time.time(),
            "clone": self.clone,
            **more,
        }

    def _write_manifest(self, step: int, size: int) -> None:
        write_json(self.dir / f"{_name(step)}.json", self._manifest(step, size=size))

    def commit(self, step: int) -> None:
        """Called after checkpoint.save wrote self.path(step): manifest it, drop older local
        steps, hand it to the uploader."""
        self._write_manifest(step, self.path(step).stat().st_size)
        self._supersede(step, self.path(step), self._manifest(step))

    def _supersede(self, step: int, path: Path, manifest: dict) -> None:
        """`step` is committed (its manifest written): drop older local steps, hand it to the uploader."""
        for old in self.local_steps():
            if old < step:
                self.drop_local(old)
        if self.uploader is not None:
            self.uploader.submit(path, step, manifest)

    def commit_folder(self, step: int, shards: dict | None = None) -> None:
        """Called by rank 0 once every process wrote its shards (and rank 0 rest.pt) into
        temp_folder(step): rename it into place, then write the manifest (each file's size and
        sha256), drop older local steps, hand it to the uploader. `shards`: the files the
        processes wrote, with the digests they took (None: hashed here); one missing here
        means the nodes do not share the store."""
        tmp, folder, shards = self.temp_folder(step), self.folder(step), shards or {}
        present = {f.relative_to(tmp).as_posix(): f for f in sorted(tmp.rglob("*")) if f.is_file()}
        missing = sorted(set(shards) - set(present))
        if missing:
            raise UserError(
                f"{tmp} lacks {', '.join(missing)}, written by other processes: every node must share "
                f"the checkpoint store (set {ENV_DIR} to a shared filesystem)"
            )
        files = {
            name: shards.get(name) or {"size": f.stat().st_size, "sha256": sha256_file(f)}
            for name, f in present.items()
        }
        if folder.exists():  # renamed into place by a run killed before its manifest: never a checkpoint
            self.drop_local(step)
        os.replace(tmp, folder)
        manifest = self._manifest(step, size=sum(m["size"] for m in files.values()), files=files)
        write_json(self.dir / f"{_name(step)}.json", manifest)
        self._supersede(step, folder, manifest)

    def drop_local(self, step: int) -> None:
        (self.dir / f"{_name(step)}.json").unlink(missing_ok=True)  # manifest first: never a manifest without its file
        self.path(step).unlink(missing_ok=True)
        shutil.rmtree(self.folder(step), ignore_errors=True)

    def wait_for_upload(self, timeout: float = 120.0) -> None:
        if self.uploader is not None and not self.uploader.drain(timeout):
            warn(f"the upload to {self.mirror.shown} did not finish in {timeout:g} s; the mirror keeps an older step")

    def close(self, discard_waiting: bool = False) -> None:
        """Stop the uploader once what is in flight is done (and what waits, unless discarded)."""
        if self.uploader is not None:
            self.uploader.close(discard=discard_waiting)
            self.uploader.thread.join(timeout=120)  # a hung upload must not hang the stage (daemon thread)
            self.uploader = None

    def release(self) -> None:
        """Close, and let another process write this run (the process's end does it too)."""
        self.close()
        self.lock.release()

    def discard(self) -> None:
        """Remove everything of this run, checkpoints and finished record, locally and in the
        mirror; the store stays open for the run's next checkpoints."""
        had_uploader = self.uploader is not None
        self.close(discard_waiting=True)
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.mirror is not None:
            self._ask_mirror("removing a run", lambda mirror: mirror.remove(self.fingerprint))
        if had_uploader:
            self.uploader = self._new_uploader()

    # -- the finished record ----------------------------------------------------------------

    def finish(self, outputs: dict[str, Path], config: dict) -> None:
        """The run's outputs are written: record them (`outputs`: name -> file, e.g. weights,
        metrics, train.tsv), locally and in the mirror, then drop the checkpoints, unless the
        user keeps them. The mirror's checkpoints go only once its record is verified."""
        manifest = self._write_record(outputs, config)
        self.close(discard_waiting=not self.keep)
        if self.mirror is not None:

            def upload(mirror):
                mirror.put_record(
                    self.fingerprint, {name: self.dir / RECORD / name for name in manifest["files"]}, manifest
                )
                if not self.keep:  # its checkpoints go only once the record is there, verified
                    mirror.drop_checkpoints(self.fingerprint)

            self._ask_mirror("uploading the finished run", upload)
        if not self.keep:
            for step in self.local_steps():
                self.drop_local(step)
        self.lock.release()  # recorded: a run of this fingerprint waiting for us restores it now

    def _write_record(self, outputs: dict[str, Path], config: dict) -> dict:
        """Copy the outputs into <dir>/finished/, hashing them; the manifest last, atomically."""
        (self.dir / f"{RECORD}.json").unlink(missing_ok=True)  # an older record stops counting first
        files = {}
        for name, src in outputs.items():
            with open(src, "rb") as f, atomic_path(self.dir / RECORD / name) as tmp, open(tmp, "wb") as out:
                size, digest = copy_hashing(f, out)
            files[name] = {"size": size, "sha256": digest}
        manifest = {
            "kind": RECORD,
            "stage": self.stage,
            "fingerprint": self.fingerprint,
            "total_steps": self.total,
            "config": json.loads(json.dumps(config, default=str)),
            "written": time.time(),
            "clone": self.clone,
            "files": files,
        }
        write_json(self.dir / f"{RECORD}.json", manifest)
        return manifest

    def finished_record(self, shapes: dict[str, tuple] | None = None) -> Record | None:
        """This run's finished record, verified: the local one, else the mirror's (downloaded).
        Verified means: a parsed manifest of this run, every name confined to its folder, every
        file matching its size and sha256, and the files being what they claim (`check_outputs`:
        weights that load with weights_only=True into `shapes`, metrics and step logs that
        parse). One that fails is refused with one line naming its manifest; None: train."""
        local = self.dir / f"{RECORD}.json"
        if local.is_file() or local.is_symlink():
            try:
                man = parse_record(read_file(local), str(local))
                self._verify_record(man, self.dir / RECORD, str(local), shapes)
                return Record(self.dir / RECORD, man, f"local store {self.dir}")
            except (OSError, ValueError) as e:
                self._refuse(f"local store {self.dir}", e)
        if self.mirror is None:
            return None
        try:
            man = self.mirror.record(self.fingerprint)
        except Damaged as e:
            self._refuse(f"mirror {self.mirror.shown}", e)
            return None
        except Exception as e:
            self.mirror_failed("looking for a finished run", e)
            return None
        if man is None:
            return None
        folder = self.dir / f".{RECORD}.download"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        where = f"mirror {self.mirror.shown}"
        try:
            self._verify_record(man, None, self.mirror.record_file(self.fingerprint), None)
            self.mirror.get_record(self.fingerprint, man, folder)
            self._verify_record(man, folder, self.mirror.record_file(self.fingerprint), shapes)
        except Exception as e:
            shutil.rmtree(folder, ignore_errors=True)
            self._refuse(where, e if isinstance(e, ValueError) else ValueError(self.mirror.error(e)))
            return None
        (self.dir / f"{RECORD}.json").unlink(missing_ok=True)  # keep it locally too: verified, manifest last
        _remove(self.dir / RECORD)
        os.replace(folder, self.dir / RECORD)
        write_json(self.dir / f"{RECORD}.json", man)
        return Record(self.dir / RECORD, man, where)

    def _verify_record(self, man: dict, folder: Path | None, where: str, shapes: dict | None) -> None:
        """ValueError unless `man` (parsed) is this run's record (its config gives this
        fingerprint) and, given `folder`, every file there is confined, matches the manifest's
        size and sha256, and is what it claims to be."""
        if man["fingerprint"] != self.fingerprint or checkpoint_format.fingerprint(man["config"]) != self.fingerprint:
            raise ValueError(
                f"it belongs to another run (fingerprint {checkpoint_format.fingerprint(man['config'])}, "
                f"this run is {self.fingerprint})"
            )
        if folder is None:
            return
        for name, meta in man["files"].items():
            path = confined(folder, name, where)
            why = mismatch(path, meta["size"], meta["sha256"])
            if why:
                raise ValueError(f"{path} does not match its manifest: {why}")
        check_outputs(folder, man, where, shapes)

    def _refuse(self, where: str, e: Exception) -> None:
        warn(
            f"[{self.stage}] refusing the finished run {self.fingerprint} in {where}: {_one_line(e)}; "
            "training it instead"
        )

    def restore(self, record: Record, outputs: dict[str, Path]) -> None:
        """Put a record's files back as the run's outputs, each atomically (all verified by
        finished_record before the first is replaced)."""
        for name in record.manifest["files"]:
            if name in outputs:
                source = confined(record.folder, name, str(record.folder.parent / f"{RECORD}.json"))
                with open(source, "rb") as f, atomic_path(outputs[name]) as tmp, open(tmp, "wb") as out:
                    shutil.copyfileobj(f, out)


def check_outputs(folder: Path, manifest: dict, where: str, shapes: dict | None) -> None:
    """A record's files are what their names say (Damaged otherwise): `weights` loads with
    weights_only=True and holds a state dict of exactly `shapes` (the run's model), `metrics`
    is a JSON mapping, each `*.tsv` step log a header and rows of as many numbers."""
    import torch

    for name in manifest["files"]:
        path = confined(folder, name, where)
        if name == "weights":
            try:
                payload = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # refused pickle, truncated zip: all one to the user
                raise Damaged(
                    f"{where}: its weights do not load with weights_only=True "
                    f"({type(e).__name__}: {_one_line(e)[:120]})"
                ) from None
            state = payload.get("state_dict") if isinstance(payload, dict) else None
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise Damaged(f"{where}: its weights hold no state dict")
            got = {k: tuple(v.shape) for k, v in state.items()}
            if shapes is not None and got != {k: tuple(v) for k, v in shapes.items()}:
                wrong = sorted(set(got) ^ set(shapes)) or sorted(k for k in got if got[k] != tuple(shapes[k]))
                raise Damaged(f"{where}: its weights do not fit this run's model ({', '.join(wrong[:3])})")
        elif name == "metrics":
            try:
                metrics = read_file(path)
            except Damaged as e:  # it names the download folder: the user needs the record
                raise Damaged(f"{where}: its metrics are not JSON ({str(e).rsplit(' (', 1)[-1]}") from None
            if not isinstance(metrics, dict):
                raise Damaged(f"{where}: its metrics are not a JSON mapping")
        elif name.endswith(".tsv"):
            _check_tsv(path, where)


def _check_tsv(path: Path, where: str) -> None:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise Damaged(f"{where}: step log {path.name} is not text") from None
    if not lines or not lines[0].strip():
        raise Damaged(f"{where}: step log {path.name} has no header")
    width = len(lines[0].split("\t"))
    for i, line in enumerate(lines[1:], start=2):
        cells = line.split("\t")
        if len(cells) != width or not all(_number(c) for c in cells):
            raise Damaged(f"{where}: step log {path.name} line {i} is not {width} numbers")


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text == ""  # an empty cell: a value a step did not have
    return True


def _one_line(e) -> str:
    return " ".join(str(e).split())


def _remove(path: Path) -> None:
    """A file or a folder, if it is there (a symbolic link: the link only)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------
# Listing and removal (`vitpipe checkpoints`)


def list_runs(root: Path) -> list[dict]:
    """One row per stored run and kind (its newest checkpoint; its finished record): stage,
    fingerprint, step/total, age, size, clone, where. A run whose manifest is damaged, or whose
    folder is a symbolic link, is a row of kind `damaged` with its problem: listed, so that
    `rm` can remove it, never a reason to leave the other runs out."""
    rows = []
    root = Path(root)
    for run in sorted(p for p in root.glob("*") if not p.name.startswith(".") and (p.is_dir() or p.is_symlink())):
        if run.is_symlink():
            rows.append(
                damaged_row(
                    run.name,
                    str(run),
                    f"{run} is a symbolic link (to {os.readlink(run)!r}), which the store never makes",
                    run.lstat().st_mtime,
                )
            )
            continue
        newest, problems = None, []
        for m in run.glob("step-*.json"):
            try:
                man = parse_step(read_file(m), str(m))
            except FileNotFoundError:
                continue
            except (OSError, Damaged) as e:
                problems.append((_one_line(e), m))
                continue
            if newest is None or man["step"] > newest["step"]:
                newest = man
        if newest is not None:
            files = [*run.glob("step-*.pt"), *run.glob(f"step-*{FOLDER}/*")]  # a sharded run's: folders
            rows.append(run_row(newest, run.name, sum(f.stat().st_size for f in files if f.is_file()), str(run)))
        record = run / f"{RECORD}.json"
        if record.exists() or record.is_symlink():
            try:
                man = parse_record(read_file(record), str(record))
                rows.append(run_row(man, run.name, record_size(man), str(run), kind=RECORD))
            except (OSError, Damaged) as e:
                problems.append((_one_line(e), record))
        rows += [damaged_row(run.name, str(run), why, _mtime(path)) for why, path in problems]
    return rows


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError:
        return time.time()


def run_row(manifest: dict, fingerprint: str, size: int, where: str, kind: str = "checkpoint") -> dict:
    """One `vitpipe checkpoints` row: a run's newest manifest (or its record's), parsed, its
    size and where it is (a mirror's URL without credentials)."""
    step = manifest.get("total_steps") if kind == RECORD else manifest["step"]
    return {
        "stage": manifest.get("stage"),
        "fingerprint": fingerprint,
        "kind": kind,
        "step": step,
        "total_steps": manifest.get("total_steps"),
        "age_s": time.time() - manifest.get("written", time.time()),
        "size_bytes": size,
        "clone": manifest.get("clone"),
        "where": where,
        "problem": None,
    }


def damaged_row(fingerprint: str, where: str, problem: str, written: float | None) -> dict:
    """A row for a run whose manifest cannot be used: `rm` removes it; `written` (a file's
    mtime, None when unknown) dates it for `rm --older-than`."""
    return {
        "stage": None,
        "fingerprint": fingerprint,
        "kind": DAMAGED,
        "step": None,
        "total_steps": None,
        "age_s": None if written is None else time.time() - written,
        "size_bytes": 0,
        "clone": None,
        "where": where,
        "problem": problem,
    }


def remove_local(root: Path, fingerprint: str) -> None:
    """Everything of run `fingerprint` in the local store (a symbolic link itself, never what it
    points to); a UserError while another process trains it."""
    holder = held_by_other(root, fingerprint)
    if holder:
        raise UserError(f"run {fingerprint} is being trained by {holder}; stop it first, or wait for it to finish")
    _remove(Path(root) / fingerprint)
