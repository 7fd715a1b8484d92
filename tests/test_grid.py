"""A grid over several machines, DVC's way (scripts/grid.py): two clones each run their share
of a 4-experiment micro grid and push it to one bare git remote and one DVC remote; a third
clone pulls them and `dvc exp show` lists all four with their metrics."""

import json
import sys

import pytest
from conftest import ROOT, make_project, run

sys.path.insert(0, str(ROOT / "scripts"))
import grid

DVC = [sys.executable, "-m", "dvc"]
GRID = ["-S", "train.lr=0.001,0.002", "-S", "data.train_fraction=0.5,1.0"]


def test_split_values_keeps_lists_whole():
    assert grid.split_values("a,[0,1],{x: 1, y: 2}") == ["a", "[0,1]", "{x: 1, y: 2}"]


def test_shares_cover_the_grid_once_and_names_are_stable():
    experiments = grid.grid(grid.parse_overrides(["train.lr=1,2,3", "seeds=[0],[1]"]))
    assert len(experiments) == 6
    shares = [grid.share(experiments, i, 3) for i in (1, 2, 3)]
    assert sorted(tuple(e) for part in shares for e in part) == sorted(map(tuple, experiments))
    assert len({grid.name_of(e) for e in experiments}) == 6
    assert grid.name_of(["b=1", "a=2"]) == grid.name_of(["a=2", "b=1"])


def experiments_in(show: list) -> dict[str, dict]:
    """name -> metrics of every experiment in `dvc exp show --json` output."""
    found = {}

    def walk(x):
        if isinstance(x, dict):
            if str(x.get("name", "")).startswith("grid-") and isinstance(x.get("data"), dict):
                found[x["name"]] = x["data"].get("metrics") or {}
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(show)
    return found


@pytest.mark.slow
def test_two_machines_run_their_shares_and_a_third_gathers_all(tmp_path):
    origin = tmp_path / "origin.git"
    run(["git", "init", "--bare", "-q", str(origin)], tmp_path)
    seed = make_project(tmp_path / "seed")
    run([*DVC, "remote", "add", "-d", "shared", str(tmp_path / "dvc-remote")], seed)
    run(["git", "commit", "-qam", "shared DVC remote"], seed)
    run(["git", "remote", "add", "origin", str(origin)], seed)
    run(["git", "push", "-q", "origin", "HEAD"], seed)
    clones = []
    for name in ("machine1", "machine2", "laptop"):
        run(["git", "clone", "-q", str(origin), name], tmp_path)
        run(["git", "config", "user.email", "test@example.com"], tmp_path / name)
        run(["git", "config", "user.name", "test"], tmp_path / name)
        clones.append(tmp_path / name)
    script = str(ROOT / "scripts" / "grid.py")
    for i, machine in enumerate(clones[:2], start=1):
        out = run(
            [sys.executable, script, "run", "--share", f"{i}/2", *GRID, "--push", "origin", "train_scratch@0"], machine
        ).stdout
        assert f"share {i}/2: 2 experiment(s)" in out
    run([sys.executable, script, "gather", "origin", *GRID], clones[2])
    show = json.loads(run([*DVC, "exp", "show", "--json"], clones[2]).stdout)
    exps = experiments_in(show)
    names = {grid.name_of(e) for e in grid.grid(grid.parse_overrides(GRID[1::2]))}
    assert set(exps) == names, exps.keys()
    losses = [m["metrics/train_scratch/seed-0.json"]["data"]["train_loss"] for m in exps.values()]
    assert len(set(losses)) == 4  # four different runs, each with its metrics
