"""One writer per run: an OS file lock (flock) per fingerprint, held by the process that trains
it, freed by the kernel when that process dies however it dies (no stale lock to clean).

Two clones of a project on one machine share the default store; started together with the same
params they would write one run folder, resume each other's checkpoints and delete them on
finishing. The second one instead waits for the first with one line naming it (pid, host,
clone), and then finds its finished record; or, with VITPIPE_CHECKPOINT_WAIT=0, stops at once
with that line. The locks live in <store>/.locks/<fingerprint>.lock, never in the run folder:
removing a run must not remove a lock someone holds.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from vitpipe.errors import UserError

LOCKS = ".locks"
_HELD: dict[str, int] = {}  # this process's locks: path -> fd


def this_clone() -> str:
    """host:folder of the project this process runs in: the working directory, or for DVC's
    temp experiment copies (inside <project>/.dvc/tmp/exps/) the project that made them."""
    here = Path.cwd().resolve()
    if ".dvc" in here.parts:
        here = Path(*here.parts[: here.parts.index(".dvc")])
    else:
        here = next((f for f in (here, *here.parents) if (f / ".dvc").is_dir() or (f / ".git").exists()), here)
    return f"{socket.gethostname()}:{here}"


def holder_text(path: Path) -> str:
    try:
        h = json.loads(path.read_text())
        return f"pid {int(h['pid'])} on {h['host']} (clone {h['clone']}, stage {h['stage']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


class RunLock:
    def __init__(self, root: Path, fingerprint: str, stage: str):
        self.path = Path(root) / LOCKS / f"{fingerprint}.lock"
        self.fingerprint, self.stage, self.fd = fingerprint, stage, None

    def acquire(self, wait: bool) -> None:
        """Take the lock; while another process holds it, wait (one line) or stop (UserError)."""
        key = str(self.path)
        if key in _HELD:  # an earlier store of this run in this very process, abandoned (tests, notebooks)
            _release(_HELD.pop(key))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = holder_text(self.path)
            if not wait:
                os.close(fd)
                raise UserError(
                    f"run {self.fingerprint} ({self.stage}) is being trained by {holder}; wait for it "
                    "to finish, or set VITPIPE_CHECKPOINT_WAIT=1 to wait for it here"
                ) from None
            print(
                f"[{self.stage}] run {self.fingerprint} is being trained by {holder}: waiting for it to finish "
                "(VITPIPE_CHECKPOINT_WAIT=0 stops instead)",
                file=sys.stderr,
                flush=True,
            )
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(
            fd,
            json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(), "clone": this_clone(), "stage": self.stage}
            ).encode(),
            0,
        )
        self.fd = _HELD[key] = fd

    def release(self) -> None:
        if self.fd is not None:
            if _HELD.get(str(self.path)) == self.fd:
                del _HELD[str(self.path)]
                _release(self.fd)
            self.fd = None


def _release(fd: int) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    except OSError:
        pass


def held_by_other(root: Path, fingerprint: str) -> str | None:
    """Who holds run `fingerprint`'s lock, when another process does (for `rm`); else None."""
    path = Path(root) / LOCKS / f"{fingerprint}.lock"
    if not path.is_file() or str(path) in _HELD:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return holder_text(path)
    finally:
        os.close(fd)
