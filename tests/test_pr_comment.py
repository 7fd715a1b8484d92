"""scripts/pr_comment.py and `vitpipe compare` (the same library, vitpipe.report.compare)
against a real git + DVC repository with two commits: the base branch's metrics and a pull
request's, as the PR workflow sees them after `dvc repro`."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run

pytestmark = pytest.mark.slow  # each test runs git and dvc on a made-up history

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "pr_comment.py"

spec = importlib.util.spec_from_file_location("pr_comment", SCRIPT)
pr_comment = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pr_comment)

REPORT = """# vitpipe report

## Headline

Fine-tuning beats scratch.

| run | test top-1 |
|:--|--:|
| scratch | 40.0% |

## 1. Parameters

not in the comment
"""


def commit_metrics(
    repo: Path, top1: float, lr: float, message: str, img_per_s: float = 100.0, seed_top1=(0.60, 0.64, 0.68)
) -> None:
    """A commit's metrics: one evaluate file, three seeds of a run and their summary."""
    (repo / "metrics/evaluate/vit_tiny").mkdir(parents=True, exist_ok=True)
    (repo / "metrics/evaluate.json").write_text(json.dumps({"top1": top1, "top5": 1.0, "infer_img_per_s": img_per_s}))
    for seed, acc in enumerate(seed_top1):
        (repo / f"metrics/evaluate/vit_tiny/seed-{seed}.json").write_text(json.dumps({"top1": acc}))
    from vitpipe.report import stats

    ci = stats.over_seeds(seed_top1)
    (repo / "metrics/summary.json").write_text(
        json.dumps(
            {
                "vit_tiny.top1_mean": ci.mean,
                "vit_tiny.top1_sd": ci.sd,
                "vit_tiny.top1_ci95_lo": ci.lo,
                "vit_tiny.top1_ci95_hi": ci.hi,
            }
        )
    )
    (repo / "params.yaml").write_text(f"train:\n  lr: {lr}\n")
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", message], repo)


@pytest.fixture
def two_commits(tmp_path):
    """main: top1 0.5 at lr 0.001; the checked-out branch `pr`: top1 0.75 at lr 0.002."""
    repo = tmp_path / "repo"
    repo.mkdir()
    run(["git", "init", "-q", "-b", "main"], repo)
    run(["git", "config", "user.email", "test@example.com"], repo)
    run(["git", "config", "user.name", "test"], repo)
    run([sys.executable, "-m", "dvc", "init", "-q"], repo)
    (repo / "dvc.yaml").write_text(
        "metrics:\n  - metrics/evaluate.json\n  - metrics/evaluate/vit_tiny\n"
        "  - metrics/summary.json\nparams:\n  - params.yaml\n"
    )
    commit_metrics(repo, 0.5, 0.001, "base")
    run(["git", "checkout", "-qb", "pr"], repo)
    # a real change of the scratch-like run, machine noise in img/s, and seed noise in vit_tiny
    commit_metrics(repo, 0.75, 0.002, "change", img_per_s=160.0, seed_top1=(0.62, 0.63, 0.69))
    (repo / "reports").mkdir()
    (repo / "reports/report.md").write_text(REPORT)
    return repo


def test_comment_from_two_commits(two_commits, tmp_path):
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    p = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--base",
            "main",
            "--out",
            "comment.md",
            "--summary",
            str(summary),
            "--artifacts",
            "https://example.com/run/1",
        ],
        cwd=two_commits,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    body = (two_commits / "comment.md").read_text()
    assert body.startswith(pr_comment.MARKER)
    rows = {
        tuple(c.strip() for c in line.strip("|").split("|"))[:2]: [c.strip() for c in line.strip("|").split("|")]
        for line in body.splitlines()
        if line.startswith("| metrics/")
    }
    assert rows[("metrics/evaluate.json", "top1")][2:5] == ["0.5", "0.75", "0.25"]
    assert "top5" not in body  # unchanged metrics stay out of the diff
    # seed noise: each seed's change and the mean's change sit inside the interval of the seeds
    assert rows[("metrics/evaluate/vit_tiny/seed-0.json", "top1")][5].startswith("within noise")
    assert rows[("metrics/summary.json", "vit_tiny.top1_mean")][5].startswith("within noise")
    # results first, machine metrics in their own section after them
    results, machine = body.index("### Results against `main`"), body.index("### Machine-dependent metrics")
    assert results < body.index("vit_tiny/seed-0.json") < machine < body.index("infer_img_per_s")
    params_row = next(line for line in body.splitlines() if "train.lr" in line)
    assert "0.001" in params_row and "0.002" in params_row
    assert "Fine-tuning beats scratch." in body and "| scratch | 40.0% |" in body
    assert "not in the comment" not in body
    assert "(https://example.com/run/1)" in body
    assert summary.read_text() == "earlier step\n" + body


def test_a_real_change_is_beyond_noise():
    """Two commits that really differ: 20 points against seeds that spread by 2."""
    summary = {"vit_tiny.top1_ci95_lo": 0.60, "vit_tiny.top1_ci95_hi": 0.64}
    diff = {
        "metrics/evaluate/vit_tiny/seed-0.json": {"top1": {"old": 0.42, "new": 0.62, "diff": 0.2}},
        "metrics/summary.json": {
            "vit_tiny.top1_mean": {"old": 0.41, "new": 0.62, "diff": 0.21},
            "vit_tiny.top1_sd": {"old": 0.01, "new": 0.012, "diff": 0.002},
            "finetune_minus_scratch.verdict": {"old": "holds", "new": "inconclusive"},
            "finetune_minus_scratch.test": {"old": "seeds", "new": "seeds"},
        },
        "metrics/finetune/vit_tiny/seed-0.json": {
            "img_per_s": {"old": 400.0, "new": 700.0, "diff": 300.0},
            "params": {"old": 10, "new": 12, "diff": 2},
        },
    }
    results, machine, other = pr_comment.split_diff(diff, summary)
    notes = {(r[0], r[1]): r[5] for r in results}
    assert notes[("metrics/evaluate/vit_tiny/seed-0.json", "top1")] == "**beyond noise** (±0.02)"
    assert notes[("metrics/summary.json", "vit_tiny.top1_mean")].startswith("**beyond noise**")
    assert notes[("metrics/summary.json", "vit_tiny.top1_sd")] == ""  # a spread has no noise label
    # a verdict that flips is a result (no noise label: it is not a number); an unchanged key is left out
    assert notes[("metrics/summary.json", "finetune_minus_scratch.verdict")] == ""
    assert [r[1] for r in machine] == ["img_per_s"] and [r[1] for r in other] == ["params"]


def test_comment_when_nothing_changed_or_dvc_fails(two_commits):
    same = pr_comment.metrics_diff("pr", cwd=two_commits)
    assert same == ({}, None)
    _, error = pr_comment.metrics_diff("no-such-branch", cwd=two_commits)
    assert error
    body = pr_comment.comment_body("main", same, ("", error), None)
    assert "No accuracy or loss changed." in body
    assert "`dvc params diff --md main` failed:" in body
    assert "`reports/report.md` has no Headline section." in body


def test_headline_section_and_size_limit():
    assert pr_comment.section(REPORT, "Headline").splitlines()[0] == "Fine-tuning beats scratch."
    assert pr_comment.section(REPORT, "Nope") is None
    huge = "| a | b |\n|--|--|\n" + "| x | y |\n" * 20_000
    body = pr_comment.comment_body("main", ({}, None), (huge, None), "headline")
    assert len(body) <= pr_comment.GITHUB_LIMIT and body.startswith(pr_comment.MARKER)


def vitpipe(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vitpipe", *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def test_vitpipe_compare_prints_one_table(two_commits):
    """`vitpipe compare HEAD~1`: the commit before against the workspace (HEAD's results), one
    table, results first with their noise, the machine's img/s last; two revisions the same."""
    p = vitpipe("compare", "HEAD~1", cwd=two_commits)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["file", "metric", "HEAD~1"])
    assert lines[header + 1].startswith("-")  # tabulate's rule: one table, one header
    rows = lines[header + 2 : lines.index("")]
    assert sum(1 for line in lines if line.split()[:2] == ["file", "metric"]) == 1
    cells = {tuple(r.split()[1:3]): r.split() for r in rows}
    assert cells["metrics/evaluate.json", "top1"][:6] == [
        "result",
        "metrics/evaluate.json",
        "top1",
        "0.5",
        "0.75",
        "0.25",
    ]
    assert "within noise (±" in " ".join(cells["metrics/evaluate/vit_tiny/seed-0.json", "top1"])
    assert [r.split()[0] for r in rows][-1] == "machine" and "infer_img_per_s" in rows[-1]
    assert [r.split()[0] for r in rows] == sorted(
        (r.split()[0] for r in rows), key=["result", "other", "machine"].index
    )
    assert "top5" not in p.stdout  # unchanged: left out
    assert "only a change beyond noise says the method changed" in p.stdout
    both = vitpipe("compare", "main", "pr", cwd=two_commits)  # two revisions: the same rows
    assert both.returncode == 0 and both.stdout.splitlines()[0].split()[:5] == [
        "file",
        "metric",
        "main",
        "pr",
        "change",
    ]
    assert [line.split() for line in both.stdout.splitlines()[2:]] == [line.split() for line in lines[header + 2 :]]
    md = vitpipe("compare", "main", "pr", "--md", cwd=two_commits).stdout
    assert (
        "|  | file | metric | main | pr | change | noise |" in md and "| result | metrics/evaluate.json | top1 |" in md
    )


def test_vitpipe_compare_of_an_unknown_revision_is_one_line(two_commits):
    p = vitpipe("compare", "no-such-rev", cwd=two_commits)
    assert p.returncode == 2 and p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith("vitpipe: error: cannot compare no-such-rev with workspace: ")
    same = vitpipe("compare", "pr", cwd=two_commits)
    assert same.returncode == 0 and same.stdout.strip() == "no metric changed between pr and workspace"
