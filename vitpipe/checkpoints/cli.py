"""`vitpipe checkpoints`: what the checkpoint store holds, and removing it.

    vitpipe checkpoints                      # stage, fingerprint, kind, step/total, age, size, where
    vitpipe checkpoints rm 3f2a9c01d4e5b6a7  # one run (a unique prefix is enough), local and mirror
    vitpipe checkpoints rm --older-than 7d   # every run whose newest checkpoint or record is older

A row's kind is `checkpoint` (an unfinished run: its newest checkpoint) or `finished` (a
finished run's record: its outputs, which a new machine restores instead of training). A
mirror's URL is shown without its credentials.
"""

from __future__ import annotations

import json
import re
import shutil

from vitpipe.checkpoints import store as checkpoint_store
from vitpipe.checkpoints.mirror import Mirror
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


def mirror_runs(mirror: Mirror) -> list[dict]:
    """Rows for the runs in the mirror: each run's newest verified step and finished record."""
    return [checkpoint_store.run_row(man, fp, size, mirror.where(fp), kind=kind)
            for fp, kind, man, size in mirror.runs()]


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
    mirror = Mirror(conf["mirror"]) if conf["mirror"] else None
    if mirror is not None:
        try:
            rows += mirror_runs(mirror)
        except Exception as e:
            print(f"vitpipe: warning: checkpoint mirror {mirror.shown} cannot be listed ({mirror.error(e)})")
    if args.action == "ls":
        if args.fingerprints or args.older_than:
            raise UserError("`vitpipe checkpoints` lists everything; to remove, use `vitpipe checkpoints rm …`")
        if args.json:
            print(json.dumps(rows, indent=2))
        elif not rows:
            print(f"no checkpoints in {conf['dir']}" + (f" or {mirror.shown}" if mirror else ""))
        else:
            from tabulate import tabulate

            print(tabulate([[r["stage"], r["fingerprint"], r["kind"], f"{r['step']}/{r['total_steps']}", _age(r["age_s"]),
                             _human(r["size_bytes"]), r["where"]] for r in rows],
                           headers=["stage", "fingerprint", "kind", "step", "age", "size", "where"]))
        return 0
    return remove(args, rows, conf, mirror)


def remove(args, rows, conf, mirror: Mirror | None) -> int:
    if bool(args.fingerprints) == bool(args.older_than):
        raise UserError("`vitpipe checkpoints rm` needs either fingerprints or --older-than AGE (not both)")
    if args.older_than:
        cutoff = parse_age(args.older_than)
        newest = {}
        for r in rows:  # a run goes when everything stored of it is older than that
            newest[r["fingerprint"]] = min(newest.get(r["fingerprint"], r["age_s"]), r["age_s"])
        chosen = {fp for fp, age in newest.items() if age > cutoff}
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
        shutil.rmtree(conf["dir"] / fp, ignore_errors=True)
        if mirror is not None:
            try:
                mirror.remove(fp)
            except Exception as e:
                raise UserError(f"cannot remove {mirror.where(fp)} ({mirror.error(e)}); try again, or remove "
                                "it with the mirror's own tools") from None
        print(f"removed {fp}")
    if not chosen:
        print("nothing to remove")
    return 0
