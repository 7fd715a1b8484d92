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

Nothing runs until the whole share is known to be runnable: every value parses (YAML, brackets
balanced, none empty), every combination passes the params checks of the `validate` stage,
and with --push the git remote answers and a default DVC remote is set (without one the
outputs and the run-cache would stay on this machine while the git ref went). A combination
that fails is reported and the rest of the share goes on; the run ends with the list of
failed ones and exit 1. An experiment already run for this commit (its name is taken) is not
run again, only pushed.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import re
import subprocess
import sys
from pathlib import Path

import yaml

DVC = [sys.executable, "-m", "dvc"]
ROOT = Path(__file__).resolve().parents[1]  # this clone's own vitpipe, for the params checks
KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$")
PAIRS = {"]": "[", "}": "{"}


def fail(msg: str) -> None:
    """Bad input: one line, exit 2, before anything ran."""
    print(f"grid.py: error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def split_values(text: str) -> list[str]:
    """`a,b,[1,2]` -> ['a', 'b', '[1,2]']: commas inside brackets or braces are the value's.
    ValueError when a bracket or brace is not closed, or closed without being opened."""
    values, open_, cur = [], [], ""
    for ch in text:
        if ch in "[{":
            open_.append(ch)
        elif ch in "]}":
            if not open_ or open_.pop() != PAIRS[ch]:
                raise ValueError(f"{ch!r} closes nothing in {text!r}")
        if ch == "," and not open_:
            values.append(cur)
            cur = ""
        else:
            cur += ch
    if open_:
        raise ValueError(f"{open_[-1]!r} is never closed in {text!r}")
    values.append(cur)
    return [v.strip() for v in values]


def parse_overrides(args: list[str]) -> list[tuple[str, list[str]]]:
    """[(key, values)] of `-S key=v1,v2` arguments; one line (exit 2) for an empty key or value,
    an unbalanced bracket, a value that is not YAML, a key given twice."""
    axes = []
    for a in args:
        key, eq, values = a.partition("=")
        key = key.strip()
        if not eq or not key or not values.strip():
            fail(f"-S {a!r}: expected key=value[,value...], e.g. -S train.lr=0.001,0.002")
        if not KEY.match(key.rpartition(":")[2]):
            fail(f"-S {a!r}: {key!r} is not a param key (dotted names, e.g. train.lr)")
        if key in (k for k, _ in axes):
            fail(f"-S {key} given twice: list its values once, comma-separated")
        try:
            split = split_values(values)
        except ValueError as e:
            fail(f"-S {a!r}: {e}")
        for v in split:
            if not v:
                fail(f"-S {a!r}: an empty value (two commas, or one at an end); remove it")
            try:
                yaml.safe_load(v)
            except yaml.YAMLError as e:
                fail(f"-S {key}={v!r} is not a YAML value ({' '.join(str(e).split())[:120]})")
        axes.append((key, split))
    return axes


def apply_overrides(doc: dict, overrides: list[str]) -> dict:
    """params.yaml's document with `key=value` overrides set as DVC's -S sets them (the value
    parsed as YAML; a missing section or key is added)."""
    import copy

    doc = copy.deepcopy(doc)
    for o in overrides:
        key, _, value = o.partition("=")
        *path, last = key.split(".")
        here = doc
        for part in path:
            if not isinstance(here.get(part), dict):
                here[part] = {}
            here = here[part]
        here[last] = yaml.safe_load(value)
    return doc


def check_combinations(experiments: list[list[str]], params_file: Path = Path("params.yaml")) -> None:
    """Every combination through the params checks of the `validate` stage, before the first
    runs: one line naming the first combination that would fail and why (exit 2). Overrides
    of another params file (`file.yaml:key`) are left to DVC."""
    if not params_file.is_file():
        fail(f"no {params_file} here: run grid.py in the project's folder")
    sys.path.insert(0, str(ROOT))
    from vitpipe import check_params, params
    from vitpipe.errors import UserError

    try:
        doc = params.read_yaml(params_file)
    except UserError as e:
        fail(str(e))
    for overrides in experiments:
        mine = [o for o in overrides if ":" not in o.partition("=")[0]]
        try:
            check_params.check_all(apply_overrides(doc, mine))
        except UserError as e:
            fail(f"{name_of(overrides)} ({' '.join(overrides)}): {' '.join(str(e).split())}; nothing was run")


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
        fail(f"--share {text!r}: expected i/n, e.g. 1/3 (this machine's share of 3)")
    if not 1 <= i <= n:
        fail(f"--share {text}: i must be between 1 and n")
    return i, n


def share(experiments: list[list[str]], i: int, n: int) -> list[list[str]]:
    return experiments[i - 1 :: n]


def dvc(*args: str) -> None:
    print("+ dvc " + " ".join(args), flush=True)
    if subprocess.run([*DVC, *args], check=False).returncode:
        raise SystemExit(f"grid.py: `dvc {' '.join(args)}` failed")


def attempt(*args: str) -> bool:
    """A dvc command whose failure the grid reports at the end instead of stopping."""
    print("+ dvc " + " ".join(args), flush=True)
    return subprocess.run([*DVC, *args], check=False).returncode == 0


def check_push(remote: str) -> None:
    """--push publishes nothing unless the git remote answers and DVC has a default remote
    (outputs and run-cache go there; the git remote gets only the experiment's ref)."""
    git = subprocess.run(["git", "ls-remote", "-q", remote], capture_output=True, text=True, check=False)
    if git.returncode:
        why = " ".join(git.stderr.split())[:200] or f"exit {git.returncode}"
        fail(f"--push {remote}: the git remote does not answer ({why}); nothing was run")
    default = subprocess.run([*DVC, "remote", "default"], capture_output=True, text=True, check=False)
    if default.returncode or not default.stdout.strip():
        fail(
            f"--push {remote}: this project has no default DVC remote, so outputs and run-cache would stay on this "
            "machine; add one with `dvc remote add -d NAME URL` (and commit .dvc/config); nothing was run"
        )


def already_run(name: str) -> bool:
    """An experiment of this name exists for the current commit (DVC refuses to run it again)."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    if not head:
        return False
    ref = f"refs/exps/{head[:2]}/{head[2:]}/{name}"
    return subprocess.run(["git", "rev-parse", "-q", "--verify", ref], capture_output=True, check=False).returncode == 0


def cmd_plan(args) -> None:
    i, n = parse_share(args.share)
    for overrides in share(grid(parse_overrides(args.set)), i, n):
        print(name_of(overrides), " ".join(overrides))


def cmd_run(args) -> None:
    i, n = parse_share(args.share)
    mine = share(grid(parse_overrides(args.set)), i, n)
    check_combinations(mine)
    if args.push:
        check_push(args.push)
    print(f"share {i}/{n}: {len(mine)} experiment(s)", flush=True)
    failed = []
    for overrides in mine:
        name = name_of(overrides)
        if already_run(name):
            print(f"{name}: already run for this commit; not run again", flush=True)
        elif not attempt("exp", "run", "--temp", "-n", name, *(x for o in overrides for x in ("-S", o)), *args.targets):
            failed.append(f"{name} ({' '.join(overrides)}): `dvc exp run` failed")
            continue
        if args.push and not attempt("exp", "push", "--run-cache", args.push, name):
            failed.append(f"{name} ({' '.join(overrides)}): `dvc exp push` failed")
    if failed:
        print(f"grid.py: {len(failed)} of {len(mine)} experiment(s) failed (the others ran):", file=sys.stderr)
        for line in failed:
            print(f"  {line}", file=sys.stderr)
        raise SystemExit(1)


def cmd_gather(args) -> None:
    names = [name_of(o) for o in grid(parse_overrides(args.set))] if args.set else []
    dvc("exp", "pull", *([] if names else ["--all-commits"]), args.remote, *names)
    dvc("exp", "show", "--no-pager", *(["--json"] if args.json else []))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="scripts/grid.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, func, help_ in (
        ("plan", cmd_plan, "print this share's experiments"),
        ("run", cmd_run, "run this share (and push it)"),
    ):
        c = sub.add_parser(name, help=help_)
        c.add_argument("--share", default="1/1", help="i/n: this machine's share of n (default 1/1: all)")
        c.add_argument(
            "-S",
            "--set",
            action="append",
            default=[],
            metavar="KEY=V1,V2",
            help="a param and its values; the grid is the product of all -S",
        )
        c.add_argument(
            "--push",
            metavar="GIT_REMOTE",
            default=None,
            help="push each finished experiment there (git refs) and to the default DVC remote",
        )
        c.add_argument("targets", nargs="*", help="stages to run (default: the whole pipeline)")
        c.set_defaults(func=func)
    g = sub.add_parser("gather", help="pull the grid's experiments from a git remote and show them")
    g.add_argument("remote", help="the git remote the machines pushed to")
    g.add_argument(
        "-S",
        "--set",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="the grid's -S (default: every experiment of every commit)",
    )
    g.add_argument("--json", action="store_true", help="dvc exp show --json")
    g.set_defaults(func=cmd_gather)
    args = p.parse_args(argv)
    if args.cmd in ("plan", "run") and not args.set:
        p.error("give the grid with at least one -S key=v1,v2")
    args.func(args)


if __name__ == "__main__":
    main()
