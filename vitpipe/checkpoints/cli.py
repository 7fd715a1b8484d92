"""`vitpipe checkpoints`: what the checkpoint store holds, and removing it.

    vitpipe checkpoints                      # stage, fingerprint, step/total, age, size, where
    vitpipe checkpoints rm 3f2a9c01d4e5b6a7  # one run (a unique prefix is enough), local and mirror
    vitpipe checkpoints rm --older-than 7d   # every run whose newest checkpoint is older than that
"""

from __future__ import annotations

import json
import re

from vitpipe.checkpoints import store as checkpoint_store
from vitpipe.errors import UserError

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def add_parser(sub) -> None:
    p = sub.add_parser("checkpoints", help="list or remove stored training checkpoints (local store and mirror)")
    p.add_argument("action", nargs="?", choices=["ls", "rm"], default="ls")
    p.add_argument("fingerprints", nargs="*", help="runs to remove (a unique prefix of the fingerprint)")
    p.add_argument("--older-than", help="with rm: every run older than this age (30m, 12h, 7d, 2w)")
    p.add_argument("--json", action="store_true", help="print the runs as JSON")
    p.set_defaults(func=cmd_checkpoints)


def parse_age(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text or "")
    if not m:
        raise UserError(f"--older-than {text!r} is not an age: a number and a unit, e.g. 30m, 12h, 7d, 2w")
    return float(m.group(1)) * UNITS[m.group(2)]


def mirror_runs(url: str) -> tuple[list[dict], object, str]:
    """Rows for the runs in the mirror (their newest verified step), the filesystem and root."""
    fs, root, shown = checkpoint_store.open_mirror(url)
    best = {}
    for f in fs.glob(f"{root}/*/step-*.json"):
        try:
            man = json.loads(fs.cat_file(f))
        except (OSError, ValueError):
            continue
        fp = f.rsplit("/", 2)[-2]
        if fp not in best or man.get("step", -1) > best[fp].get("step", -1):
            best[fp] = man
    rows = [checkpoint_store.run_row(m, fp, m.get("size", 0), f"{shown}/{fp}") for fp, m in sorted(best.items())]
    return rows, fs, root


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _age(s: float) -> str:
    for unit, size in (("d", UNITS["d"]), ("h", UNITS["h"]), ("m", UNITS["m"])):
        if s >= size:
            return f"{s / size:.0f}{unit}"
    return f"{s:.0f}s"


def cmd_checkpoints(args) -> int:
    conf = checkpoint_store.settings()
    rows = checkpoint_store.list_runs(conf["dir"])
    mirror = None
    if conf["mirror"]:
        try:
            mrows, fs, root = mirror_runs(conf["mirror"])
            rows += mrows
            mirror = (fs, root)
        except UserError:
            raise
        except Exception as e:
            print(f"vitpipe: warning: checkpoint mirror {conf['mirror']} cannot be listed ({type(e).__name__}: {e})")
    if args.action == "ls":
        if args.fingerprints or args.older_than:
            raise UserError("`vitpipe checkpoints` lists everything; to remove, use `vitpipe checkpoints rm …`")
        if args.json:
            print(json.dumps(rows, indent=2))
        elif not rows:
            print(f"no checkpoints in {conf['dir']}" + (f" or {conf['mirror']}" if conf["mirror"] else ""))
        else:
            from tabulate import tabulate

            print(tabulate([[r["stage"], r["fingerprint"], f"{r['step']}/{r['total_steps']}", _age(r["age_s"]),
                             _human(r["size_bytes"]), r["where"]] for r in rows],
                           headers=["stage", "fingerprint", "step", "age", "size", "where"]))
        return 0
    return remove(args, rows, conf, mirror)


def remove(args, rows, conf, mirror) -> int:
    if bool(args.fingerprints) == bool(args.older_than):
        raise UserError("`vitpipe checkpoints rm` needs either fingerprints or --older-than AGE (not both)")
    if args.older_than:
        cutoff = parse_age(args.older_than)
        chosen = {r["fingerprint"] for r in rows if r["age_s"] > cutoff}
    else:
        known = {r["fingerprint"] for r in rows}
        chosen = set()
        for prefix in args.fingerprints:
            match = {fp for fp in known if fp.startswith(prefix)}
            if len(match) != 1:
                raise UserError(f"{prefix!r} matches {len(match)} stored runs "
                                f"({', '.join(sorted(match)) or 'none'}); `vitpipe checkpoints` lists them")
            chosen |= match
    for fp in sorted(chosen):
        store_dir = conf["dir"] / fp
        if store_dir.is_dir():
            for f in store_dir.iterdir():
                f.unlink()
            store_dir.rmdir()
        if mirror is not None:
            fs, root = mirror
            if fs.exists(f"{root}/{fp}"):
                fs.rm(f"{root}/{fp}", recursive=True)
        print(f"removed {fp}")
    if not chosen:
        print("nothing to remove")
    return 0
