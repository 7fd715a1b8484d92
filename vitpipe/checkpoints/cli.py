"""`vitpipe checkpoints`: what the checkpoint store holds, and removing it.

    vitpipe checkpoints                      # stage, fingerprint, kind, step/total, age, size, clone, where
    vitpipe checkpoints rm 3f2a9c01d4e5b6a7  # one run (a unique prefix is enough), local and mirror
    vitpipe checkpoints rm --older-than 7d   # every run of this clone whose newest checkpoint or record is older
    vitpipe checkpoints rm --older-than 7d --all   # of every clone sharing the store

A row's kind is `checkpoint` (an unfinished run: its newest checkpoint), `finished` (a
finished run's record: its outputs, which a new machine restores instead of training) or
`damaged` (a manifest that cannot be used, or a run folder that is a symbolic link: listed
with a warning that names the file and the field, and removed by `rm` like any run). `clone`
is host:folder of the project that wrote the run. Warnings go to stderr, so `--json` stays
JSON. A mirror's URL is shown without its credentials.
"""

from __future__ import annotations

import json
import re
import sys

from vitpipe.checkpoints import store as checkpoint_store
from vitpipe.checkpoints.lock import this_clone
from vitpipe.checkpoints.mirror import Mirror
from vitpipe.errors import UserError

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def add_parser(sub) -> None:
    p = sub.add_parser("checkpoints", help="list or remove stored training checkpoints (local store and mirror)")
    p.add_argument("action", nargs="?", choices=["ls", "rm"], default="ls")
    p.add_argument("fingerprints", nargs="*", help="runs to remove (a unique prefix of the fingerprint)")
    p.add_argument("--older-than", help="with rm: every run of this clone older than this age (30m, 12h, 7d, 2w)")
    p.add_argument(
        "--all", action="store_true", help="with rm --older-than: the runs of every clone, not only this one's"
    )
    p.add_argument("--json", action="store_true", help="print the runs as JSON")
    p.set_defaults(func=cmd_checkpoints)


def parse_age(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text or "")
    if not m:
        raise UserError(f"--older-than {text!r} is not an age: a number and a unit, e.g. 30m, 12h, 7d, 2w")
    return float(m.group(1)) * UNITS[m.group(2)]


def mirror_runs(mirror: Mirror) -> list[dict]:
    """Rows for the runs in the mirror: each run's newest verified step and finished record,
    and a `damaged` row for each manifest that cannot be used."""
    return [
        checkpoint_store.run_row(man, fp, size, mirror.where(fp), kind=kind)
        if problem is None
        else checkpoint_store.damaged_row(fp, mirror.where(fp), problem, None)
        for fp, kind, man, size, problem in mirror.runs()
    ]


def warn(msg: str) -> None:
    print(f"vitpipe: warning: {msg}", file=sys.stderr, flush=True)


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
    if args.action == "ls" and (args.fingerprints or args.older_than or args.all):
        raise UserError("`vitpipe checkpoints` lists everything; to remove, use `vitpipe checkpoints rm …`")
    rows = checkpoint_store.list_runs(conf.checkpoint_dir)
    mirror = Mirror(conf.checkpoint_mirror, conf.mirror_timeout_s) if conf.checkpoint_mirror else None
    unlisted = None  # why the mirror could not be listed
    if mirror is not None:
        try:
            if mirror.exists():
                rows += mirror_runs(mirror)
            else:
                warn(f"checkpoint mirror {mirror.shown} does not exist (not mounted, or nothing stored there yet)")
        except Exception as e:
            unlisted = mirror.error(e)
            if not (args.action == "rm" and args.older_than):  # that stops on it, in its own one line
                warn(f"checkpoint mirror {mirror.shown} cannot be listed ({unlisted})")
    for r in rows:
        if r["kind"] == checkpoint_store.DAMAGED:
            warn(f"{r['problem']}; `vitpipe checkpoints rm {r['fingerprint']}` removes the run")
    if args.action == "rm":
        return remove(args, rows, conf, mirror, unlisted)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no checkpoints in {conf.checkpoint_dir}" + (f" or {mirror.shown}" if mirror else ""))
    else:
        from tabulate import tabulate

        print(
            tabulate(
                [
                    [
                        r["stage"] or "?",
                        r["fingerprint"],
                        r["kind"],
                        "?" if r["step"] is None else f"{r['step']}/{r['total_steps']}",
                        "?" if r["age_s"] is None else _age(r["age_s"]),
                        _human(r["size_bytes"]),
                        r["clone"] or "?",
                        r["where"],
                    ]
                    for r in rows
                ],
                headers=["stage", "fingerprint", "kind", "step", "age", "size", "clone", "where"],
            )
        )
    return 0


def old_runs(rows: list[dict], cutoff: float, everyone: bool) -> set[str]:
    """The runs everything stored of which is older than `cutoff` seconds: this clone's, or
    every clone's with `everyone`. A run of unknown age (a damaged mirror manifest) stays."""
    here, newest, theirs = this_clone(), {}, set()
    for r in rows:
        fp = r["fingerprint"]
        if r["clone"] not in (None, here) and not everyone:
            theirs.add(fp)
        age = r["age_s"] if r["age_s"] is not None else -1.0
        newest[fp] = min(newest.get(fp, age), age)
    old = {fp for fp, age in newest.items() if age > cutoff}
    if old & theirs:
        warn(
            f"left {len(old & theirs)} old run(s) of other clones ({', '.join(sorted(old & theirs))}); "
            "`vitpipe checkpoints rm --older-than AGE --all` removes them too"
        )
    return old - theirs


def remove(args, rows, conf, mirror: Mirror | None, unlisted: str | None) -> int:
    if bool(args.fingerprints) == bool(args.older_than):
        raise UserError("`vitpipe checkpoints rm` needs either fingerprints or --older-than AGE (not both)")
    if args.older_than:
        cutoff = parse_age(args.older_than)
        if unlisted is not None:  # its old runs are unknown: removing only the local ones would say too little
            raise UserError(
                f"checkpoint mirror {mirror.shown} cannot be listed ({unlisted}); nothing removed: "
                "try again when it answers, or unset VITPIPE_CHECKPOINT_MIRROR to clean the local store only"
            )
        chosen = old_runs(rows, cutoff, args.all)
    else:
        known = {r["fingerprint"] for r in rows}
        chosen = set()
        for prefix in args.fingerprints:
            match = {fp for fp in known if fp.startswith(prefix)}
            if len(match) != 1:
                also = f"; the mirror could not be listed ({unlisted})" if unlisted else ""
                raise UserError(
                    f"{prefix!r} matches {len(match)} stored runs "
                    f"({', '.join(sorted(match)) or 'none'}){also}; `vitpipe checkpoints` lists them"
                )
            chosen |= match
    for fp in sorted(chosen):
        checkpoint_store.remove_local(conf.checkpoint_dir, fp)
        if mirror is not None:
            try:
                mirror.remove(fp)
            except Exception as e:
                raise UserError(
                    f"cannot remove {mirror.where(fp)} ({mirror.error(e)}); try again, or remove "
                    "it with the mirror's own tools"
                ) from None
        print(f"removed {fp}")
    if not chosen:
        print("nothing to remove")
    return 0
