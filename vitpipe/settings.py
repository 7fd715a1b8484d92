"""The machine's settings: where the checkpoint store and its mirror are, how long to wait for
the mirror, whether to keep finished runs' checkpoints, to wait for another run of the same
fingerprint, to share the cores. They are properties of the machine, not of the experiment
(params.yaml never holds them, so changing one invalidates no stage).

Each comes from its environment variable, else from a git-ignored `vitpipe.local.yaml` in the
project (or a folder above it: DVC's temp experiment copies live inside the project), else its
default. Both go through the same typed checks, at the edge: a wrong value is a UserError that
names the variable or the file and key, and what is allowed; every wrong setting has its own
line in it, so one run shows them all.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from vitpipe.errors import UserError

LOCAL_CONFIG = "vitpipe.local.yaml"
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class Setting:
    env: str
    key: str  # in vitpipe.local.yaml
    kind: str  # path | address | bool | seconds
    default: object
    help: str


SETTINGS = (
    Setting("VITPIPE_CHECKPOINT_DIR", "checkpoint_dir", "path", None, "the local checkpoint store (a folder)"),
    Setting(
        "VITPIPE_CHECKPOINT_MIRROR",
        "checkpoint_mirror",
        "address",
        None,
        "the durable mirror: a folder, an fsspec URL (s3://, gs://, az://, ssh://) or `dvc`",
    ),
    Setting("VITPIPE_MIRROR_TIMEOUT_S", "mirror_timeout_s", "seconds", 30.0, "seconds to wait for one mirror call"),
    Setting("VITPIPE_CHECKPOINT_KEEP", "checkpoint_keep", "bool", False, "keep a finished run's last checkpoint"),
    Setting(
        "VITPIPE_CHECKPOINT_WAIT",
        "checkpoint_wait",
        "bool",
        True,
        "wait while another process trains the same run (false: stop at once)",
    ),
    Setting("VITPIPE_CORE_SHARE", "core_share", "bool", True, "share the CPU cores among concurrent trainings"),
)
BY_KEY = {s.key: s for s in SETTINGS}


@dataclass(frozen=True)
class Settings:
    checkpoint_dir: Path
    checkpoint_mirror: str | None
    mirror_timeout_s: float
    checkpoint_keep: bool
    checkpoint_wait: bool
    core_share: bool
    source: Path | None  # the vitpipe.local.yaml read, if any


def default_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vitpipe" / "checkpoints"


def local_config(start: Path | None = None) -> tuple[dict, Path | None]:
    """The nearest vitpipe.local.yaml at or above `start`, as a mapping of known keys."""
    import yaml

    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        f = folder / LOCAL_CONFIG
        if f.is_file():
            try:
                doc = yaml.safe_load(f.read_text())
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
                raise UserError(f"{f} is not valid YAML: {' '.join(str(e).split())[:200]}") from None
            doc = {} if doc is None else doc
            if not isinstance(doc, dict):
                raise UserError(
                    f"{f}: expected a mapping of settings (e.g. `checkpoint_dir: /scratch/ckpt`), "
                    f"got {type(doc).__name__}"
                )
            unknown = sorted(map(str, set(doc) - set(BY_KEY)))
            if unknown:
                raise UserError(f"{f}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(BY_KEY)}")
            return doc, f
    return {}, None


def load(start: Path | None = None) -> Settings:
    """Every setting, checked: the environment, else vitpipe.local.yaml, else the default."""
    doc, source = local_config(start)
    values, errors = {}, []
    for s in SETTINGS:
        if os.environ.get(s.env, "").strip():  # set and not empty: an empty variable is an unset one
            raw, where, base = os.environ[s.env], s.env, Path.cwd()
        elif s.key in doc and doc[s.key] is not None:
            raw, where, base = doc[s.key], f"{source}: {s.key}", source.parent
        else:
            values[s.key] = default_dir() if s.key == "checkpoint_dir" else s.default
            continue
        try:
            values[s.key] = _check(s, raw, base)
        except ValueError as e:
            errors.append(
                f"{where}: {e}"
                if s.kind == "address" and isinstance(raw, str)
                else f"{where} = {_shown(raw)} is not allowed: {e}"
            )
    if errors:
        raise UserError("; ".join(errors))
    return Settings(**values, source=source)


def _shown(raw) -> str:
    """A value as an error shows it: an address's credentials removed."""
    return repr(shown_address(raw)) if isinstance(raw, str) else redact(repr(raw))


def _check(s: Setting, raw, base: Path):
    if s.kind == "bool":
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, (str, int)) and str(raw).strip().lower() in TRUE + FALSE:
            return str(raw).strip().lower() in TRUE
        raise ValueError(f"{s.help}: one of 1/0, true/false, yes/no")
    if s.kind == "seconds":
        try:
            value = float(raw) if not isinstance(raw, bool) else math.nan
        except (TypeError, ValueError):
            value = math.nan
        if not (math.isfinite(value) and 0 < value <= 86400):
            raise ValueError(f"{s.help}: a number of seconds > 0 (at most 86400), e.g. 30")
        return value
    if not isinstance(raw, str) or not raw.strip() or "\0" in raw:
        raise ValueError(f"{s.help}: a non-empty text")
    if s.kind == "path":
        path = Path(raw).expanduser()
        return path if path.is_absolute() else (base / path).resolve()
    return check_address(raw, base)


# ---------------------------------------------------------------------------------------
# Mirror addresses and their credentials

_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@'\"]*@")
_QUERY = re.compile(r"(?P<url>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s?#'\"]*)\?[^\s#'\"]*")
_SCP_USERINFO = re.compile(r"(?P<pre>^|[\s'\"=(])[^/\s@'\"]+@(?=[^\s/'\"]*:)")  # user:pw@host:/path
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*$")


def redact(text, secrets=()) -> str:
    """`text` with credentials removed: a URL's `user:password@` becomes `***@` (an scp-style
    `user:password@host:path`'s too), its query string `?***`, and every known secret value
    `***`. The one helper for anything that shows a mirror's address or an error of its filesystem."""
    text = str(text)
    for secret in sorted({s for s in secrets if s and len(s) >= 3}, key=len, reverse=True):
        text = text.replace(secret, "***")
    text = _QUERY.sub(r"\g<url>?***", _USERINFO.sub(r"\g<scheme>***@", text))
    return _SCP_USERINFO.sub(r"\g<pre>***@", text)


def shown_address(text: str) -> str:
    """An address without credentials; one that is not a URL loses all before its last `@`."""
    text = redact(text)
    return text if "://" in text or "@" not in text else "***@" + text.rsplit("@", 1)[1]


def known_protocols() -> set[str]:
    import fsspec

    return set(fsspec.available_protocols()) | {"dvc"}


def check_address(raw: str, base: Path | None = None) -> str:
    """A mirror address as given, if it is one: `dvc`, a URL whose protocol fsspec knows, or a
    folder given as a path (relative ones resolved against `base`). Anything else, an
    scp-style `user@host:path` above all, is a ValueError whose text holds no credentials:
    taken as a folder, it would be created in the working directory and its password shown."""
    text = raw.strip()
    if text == "dvc":
        return text
    if "://" in text:
        scheme = text.split("://", 1)[0]
        if not _SCHEME.match(scheme) or scheme.lower() not in known_protocols():
            raise ValueError(
                f"{shown_address(text)} is not a URL fsspec knows (protocol {redact(scheme)!r}); give a folder, "
                "s3://…, gs://…, az://…, ssh://… or dvc"
            )
        return text
    path = Path(text).expanduser()
    if not path.is_absolute() and ("@" in text or ":" in text):
        raise ValueError(
            f"{shown_address(text)} is neither a URL nor a folder (it reads like scp's user@host:path); "
            "write ssh://user@host/path for a server, or an absolute folder path"
        )
    return str(path if path.is_absolute() else (Path(base or Path.cwd()) / path).resolve())
