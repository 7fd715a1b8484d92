"""A grid of experiments spread over several machines, DVC's way: each machine runs its share
and pushes it; any clone gathers them all.

    # on machine i of n (every machine: a clone of the same commit, the same git remote and
    # default DVC remote):
    python scripts/grid.py run --share i/n -S train.lr=0.001,0.002 -S 'seeds=[0],[1]' \\
        -S data.train_fraction=0.3,1.0 --push origin
    # anywhere, afterwards:
    python scripts/grid.py gather origin        # = dvc exp pull origin <names>; dvc exp show

The grid is the product of the `-S key=v1,v2,...` overrides (DVC's syntax; a comma inside
[...] or {...} belongs to the value), enumerated in a fixed order, so every machine computes
the same list and takes experiments i, i+n, i+2n, ... of it. Each experiment gets a name that
is a function of its overrides (`grid-<hash>`): a share run twice, or a grid extended later,
re-runs nothing DVC already has. Each one runs as `dvc exp run --temp -n NAME -S ...` (the
workspace stays untouched), and with --push goes to the git remote at once with its outputs
and the run-cache (`dvc exp push --run-cache REMOTE NAME`): a machine lost halfway has
published what it finished. DVC itself cannot spread one queue over machines; this is the
split it leaves to the user.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import subprocess
import sys

DVC = [sys.executable, "-m", "dvc"]


def split_values(text: str) -> list[str]:
    """`a,b,[1,2]` -> ['a', 'b', '[1,2]']: commas inside brackets or braces are the value's."""
    values, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            values.append(cur)
            cur = ""
        else:
            cur += ch
    values.append(cur)
    return [v.strip() for v in values]


def parse_overrides(args: list[str]) -> list[tuple[str, list[str]]]:
    axes = []
    for a in args:
        key, eq, values = a.partition("=")
        if not eq or not key or not values:
            raise SystemExit(f"grid.py: -S {a!r}: expected key=value[,value...], e.g. -S train.lr=0.001,0.002")
        if key in (k for k, _ in axes):
            raise SystemExit(f"grid.py: -S {key} given twice: list its values once, comma-separated")
        axes.append((key, split_values(values)))
    return axes


def grid(axes: list[tuple[str, list[str]]]) -> list[list[str]]:
    """Every combination, as `key=value` overrides, in a fixed order."""
    keys = [k for k, _ in axes]
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*(vs for _, vs in axes))]


def name_of(overrides: list[str]) -> str:
    return "grid-" + hashlib.sha256("\n".join(sorted(overrides)).encode()).hexdigest()[:10]


def parse_share(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise SystemExit(f"grid.py: --share {text!r}: expected i/n, e.g. 1/3 (this machine's share of 3)") from None
    if not 1 <= i <= n:
        raise SystemExit(f"grid.py: --share {text}: i must be between 1 and n")
    return i, n


def share(experiments: list[list[str]], i: int, n: int) -> list[list[str]]:
    return experiments[i - 1::n]


def dvc(*args: str) -> None:
    print("+ dvc " + " ".join(args), flush=True)
    if subprocess.run([*DVC, *args], check=False).returncode:
        raise SystemExit(f"grid.py: `dvc {' '.join(args)}` failed")


def cmd_plan(args) -> None:
    i, n = parse_share(args.share)
    for overrides in share(grid(parse_overrides(args.set)), i, n):
        print(name_of(overrides), " ".join(overrides))


def cmd_run(args) -> None:
    i, n = parse_share(args.share)
    mine = share(grid(parse_overrides(args.set)), i, n)
    print(f"share {i}/{n}: {len(mine)} experiment(s)", flush=True)
    for overrides in mine:
        name = name_of(overrides)
        dvc("exp", "run", "--temp", "-n", name, *(x for o in overrides for x in ("-S", o)), *args.targets)
        if args.push:
            dvc("exp", "push", "--run-cache", args.push, name)


def cmd_gather(args) -> None:
    names = [name_of(o) for o in grid(parse_overrides(args.set))] if args.set else []
    dvc("exp", "pull", *([] if names else ["--all-commits"]), args.remote, *names)
    dvc("exp", "show", "--no-pager", *(["--json"] if args.json else []))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="scripts/grid.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, func, help_ in (("plan", cmd_plan, "print this share's experiments"),
                              ("run", cmd_run, "run this share (and push it)")):
        c = sub.add_parser(name, help=help_)
        c.add_argument("--share", default="1/1", help="i/n: this machine's share of n (default 1/1: all)")
        c.add_argument("-S", "--set", action="append", default=[], metavar="KEY=V1,V2",
                       help="a param and its values; the grid is the product of all -S")
        c.add_argument("--push", metavar="GIT_REMOTE", default=None,
                       help="push each finished experiment there (git refs) and to the default DVC remote")
        c.add_argument("targets", nargs="*", help="stages to run (default: the whole pipeline)")
        c.set_defaults(func=func)
    g = sub.add_parser("gather", help="pull the grid's experiments from a git remote and show them")
    g.add_argument("remote", help="the git remote the machines pushed to")
    g.add_argument("-S", "--set", action="append", default=[], metavar="KEY=V1,V2",
                   help="the grid's -S (default: every experiment of every commit)")
    g.add_argument("--json", action="store_true", help="dvc exp show --json")
    g.set_defaults(func=cmd_gather)
    args = p.parse_args(argv)
    if args.cmd in ("plan", "run") and not args.set:
        p.error("give the grid with at least one -S key=v1,v2")
    args.func(args)


if __name__ == "__main__":
    main()
