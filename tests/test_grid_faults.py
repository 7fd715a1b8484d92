"""scripts/grid.py publishes or says it did not (issue 27, item 7): bad values and combinations
stop it before the first run, --push checks the git and DVC remotes first, a failing
combination is reported at the end while the rest of the share goes on, and a share run again
does not die on an experiment that already exists."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MICRO, ROOT, make_project, run, write_params

sys.path.insert(0, str(ROOT / "scripts"))
import grid  # noqa: E402

GRID = str(ROOT / "scripts" / "grid.py")


def refused(capsys, call, *words) -> str:
    with pytest.raises(SystemExit) as e:
        call()
    assert e.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("grid.py: error: "), line
    for w in words:
        assert w in line, (w, line)
    return line


@pytest.mark.parametrize(
    "arg, words",
    [
        ("train.lr=", ["expected key=value"]),
        ("train.lr=0.001,,0.002", ["an empty value"]),
        ("train.lr=0.001,", ["an empty value"]),
        ("seeds=[0],[1", ["'[' is never closed"]),
        ("seeds=[0]],[1]", ["']' closes nothing"]),
        ("seeds=[0},[1]", ["'}' closes nothing"]),
        ("train.lr='0.1", ["is not a YAML value"]),
        ("=0.1", ["expected key=value"]),
        ("train lr=0.1", ["is not a param key"]),
    ],
)
def test_bad_values_are_one_line(arg, words, capsys):
    refused(capsys, lambda: grid.parse_overrides([arg]), *words)


def test_brackets_still_keep_lists_whole():
    assert grid.split_values("[0,1],{a: [2, 3]},x") == ["[0,1]", "{a: [2, 3]}", "x"]


def test_a_combination_the_params_checks_refuse_stops_the_grid_before_it_runs(tmp_path, monkeypatch, capsys):
    write_params(tmp_path / "params.yaml", MICRO)
    monkeypatch.chdir(tmp_path)
    experiments = grid.grid(grid.parse_overrides(["train.lr=0.001,-1", "train.steps=4,8"]))
    grid.check_combinations(experiments[:2])  # lr 0.001: fine
    bad = ["train.lr=-1", "train.steps=4"]
    line = refused(
        capsys,
        lambda: grid.check_combinations(experiments),
        grid.name_of(bad),
        "train.lr=-1 train.steps=4",
        "train.lr",
        "nothing was run",
    )
    assert "params.yaml" in line
    assert grid.apply_overrides(MICRO, ["model.dim=[1, 2]", "new.key=x"])["model"]["dim"] == [1, 2]
    assert MICRO["model"]["dim"] == 32  # the document itself is left alone


FAKE_DVC = """
import sys
args = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(" ".join(args) + "\\n")
if args[:2] == ["remote", "default"]:
    print({default!r})
    sys.exit(0 if {default!r} else 251)
sys.exit(1 if "train.lr=0.002" in args else 0)
"""


def fake_project(tmp_path, monkeypatch, default="shared") -> Path:
    """A git repo with params.yaml and a bare origin, where `dvc` is a script that logs its
    arguments, fails `exp run` of lr 0.002, and has `default` as the default remote."""
    repo = tmp_path / "repo"
    repo.mkdir()
    write_params(repo / "params.yaml", MICRO)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.email=t@example.com", "-c", "user.name=t", "commit", "-qm", "p"],
        ["git", "init", "-q", "--bare", str(tmp_path / "origin.git")],
        ["git", "remote", "add", "origin", str(tmp_path / "origin.git")],
    ):
        run(cmd, repo)
    fake = tmp_path / "fake_dvc.py"
    fake.write_text(FAKE_DVC.format(log=str(tmp_path / "dvc.log"), default=default))
    monkeypatch.setattr(grid, "DVC", [sys.executable, str(fake)])
    monkeypatch.chdir(repo)
    return repo


def dvc_calls(tmp_path) -> list[str]:
    log = tmp_path / "dvc.log"
    return log.read_text().splitlines() if log.exists() else []


def test_a_failing_combination_is_reported_and_the_rest_of_the_share_goes_on(tmp_path, monkeypatch, capsys):
    fake_project(tmp_path, monkeypatch)
    names = {lr: grid.name_of([f"train.lr={lr}"]) for lr in ("0.001", "0.002", "0.003")}
    with pytest.raises(SystemExit) as e:
        grid.main(["run", "-S", "train.lr=0.001,0.002,0.003", "--push", "origin"])
    assert e.value.code == 1
    calls = [c for c in dvc_calls(tmp_path) if c.startswith("exp")]
    assert [c.split()[:5] for c in calls if c.startswith("exp run")] == [
        ["exp", "run", "--temp", "-n", names[lr]] for lr in ("0.001", "0.002", "0.003")
    ]  # the third ran too
    assert [c for c in calls if c.startswith("exp push")] == [
        f"exp push --run-cache origin {names[lr]}" for lr in ("0.001", "0.003")
    ]  # the failed one is not pushed
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "grid.py: 1 of 3 experiment(s) failed (the others ran):",
        f"  {names['0.002']} (train.lr=0.002): `dvc exp run` failed",
    ]


def test_push_without_a_dvc_remote_or_a_git_remote_runs_nothing(tmp_path, monkeypatch, capsys):
    fake_project(tmp_path, monkeypatch, default="")
    refused(
        capsys,
        lambda: grid.main(["run", "-S", "train.lr=0.001", "--push", "origin"]),
        "--push origin",
        "no default DVC remote",
        "dvc remote add -d",
        "nothing was run",
    )
    refused(
        capsys,
        lambda: grid.main(["run", "-S", "train.lr=0.001", "--push", "nowhere"]),
        "--push nowhere",
        "the git remote does not answer",
        "nothing was run",
    )
    assert not [c for c in dvc_calls(tmp_path) if c.startswith("exp")]


def test_an_experiment_already_run_is_pushed_not_run_again(tmp_path, monkeypatch, capsys):
    repo = fake_project(tmp_path, monkeypatch)
    name = grid.name_of(["train.lr=0.001"])
    head = run(["git", "rev-parse", "HEAD"], repo).stdout.strip()
    run(["git", "update-ref", f"refs/exps/{head[:2]}/{head[2:]}/{name}", head], repo)  # as DVC records one
    grid.main(["run", "-S", "train.lr=0.001", "--push", "origin"])
    assert [c for c in dvc_calls(tmp_path) if c.startswith("exp")] == [f"exp push --run-cache origin {name}"]
    assert f"{name}: already run for this commit; not run again" in capsys.readouterr().out


@pytest.mark.slow
def test_a_share_run_twice_through_dvc_runs_nothing_again(tmp_path):
    """Real DVC, the validate stage only: the second run of a share neither fails on DVC's
    ExperimentExistsError nor runs anything; a bad value stops a third before its first run."""
    repo = make_project(tmp_path / "repo")
    first = run([sys.executable, GRID, "run", "-S", "train.lr=0.001,0.002", "validate"], repo)
    assert first.stdout.count("+ dvc exp run") == 2
    again = run([sys.executable, GRID, "run", "-S", "train.lr=0.001,0.002", "validate"], repo)
    assert "+ dvc exp run" not in again.stdout and again.stdout.count("already run for this commit") == 2
    refs = run(["git", "for-each-ref", "refs/exps"], repo).stdout.splitlines()
    p = subprocess.run(
        [sys.executable, GRID, "run", "-S", "train.lr=0.003,-1", "validate"], cwd=repo, capture_output=True, text=True
    )
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "train.lr=-1" in p.stderr, p.stderr
    assert run(["git", "for-each-ref", "refs/exps"], repo).stdout.splitlines() == refs  # nothing ran
