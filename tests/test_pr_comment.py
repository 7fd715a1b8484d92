"""scripts/pr_comment.py against a real git + DVC repository with two commits: the base
branch's metrics and a pull request's, as the PR workflow sees them after `dvc repro`."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run

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


def commit_metrics(repo: Path, top1: float, lr: float, message: str) -> None:
    (repo / "metrics").mkdir(exist_ok=True)
    (repo / "metrics/evaluate.json").write_text(json.dumps({"top1": top1, "top5": 1.0}))
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
    (repo / "dvc.yaml").write_text("metrics:\n  - metrics/evaluate.json\nparams:\n  - params.yaml\n")
    commit_metrics(repo, 0.5, 0.001, "base")
    run(["git", "checkout", "-qb", "pr"], repo)
    commit_metrics(repo, 0.75, 0.002, "change")
    (repo / "reports").mkdir()
    (repo / "reports/report.md").write_text(REPORT)
    return repo


def test_comment_from_two_commits(two_commits, tmp_path):
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    p = subprocess.run([sys.executable, str(SCRIPT), "--base", "main", "--out", "comment.md", "--summary", str(summary),
                        "--artifacts", "https://example.com/run/1"],
                       cwd=two_commits, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    body = (two_commits / "comment.md").read_text()
    assert body.startswith(pr_comment.MARKER)
    metrics_row = next(line for line in body.splitlines() if "top1" in line)
    assert [c.strip() for c in metrics_row.strip("|").split("|")] == ["metrics/evaluate.json", "top1", "0.5", "0.75",
                                                                      "0.25"]
    assert "top5" not in body                     # unchanged metrics stay out of the diff
    params_row = next(line for line in body.splitlines() if "train.lr" in line)
    assert "0.001" in params_row and "0.002" in params_row
    assert "Fine-tuning beats scratch." in body and "| scratch | 40.0% |" in body
    assert "not in the comment" not in body
    assert "(https://example.com/run/1)" in body
    assert summary.read_text() == "earlier step\n" + body


def test_comment_when_nothing_changed_or_dvc_fails(two_commits):
    same = pr_comment.dvc_diff("metrics", "pr", two_commits)
    assert same == ("", None)
    table, error = pr_comment.dvc_diff("metrics", "no-such-branch", two_commits)
    assert table == "" and error
    body = pr_comment.comment_body("main", same, ("", error), None)
    assert "No metrics changed against `main`." in body
    assert "`dvc params diff --md main` failed:" in body
    assert "`reports/report.md` has no Headline section." in body


def test_headline_section_and_size_limit():
    assert pr_comment.section(REPORT, "Headline").splitlines()[0] == "Fine-tuning beats scratch."
    assert pr_comment.section(REPORT, "Nope") is None
    huge = "| a | b |\n|--|--|\n" + "| x | y |\n" * 20_000
    body = pr_comment.comment_body("main", (huge, None), ("", None), "headline")
    assert len(body) <= pr_comment.GITHUB_LIMIT and body.startswith(pr_comment.MARKER)
