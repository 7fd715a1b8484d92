"""What changed between two revisions' results, read with the seeds' noise in mind.

    vitpipe compare REV          # REV's committed results against the workspace's
    vitpipe compare OLD NEW      # two revisions (commits, branches, tags, dvc experiments)

One table of the metrics that changed (`dvc metrics diff --json`), results first: an accuracy
whose change the run's own spread over seeds already covers (half its 95% interval over seeds,
metrics/summary.json) is marked *within noise*; only a change *beyond noise* says the method
changed. A verdict that flips and McNemar's p-value are results too. Machine metrics (img/s,
latency, wall time, memory, MFU) come last, apart: they measure the machine that ran them, not
the method. The pull-request workflow builds its comment from the same functions
(scripts/pr_comment.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from vitpipe.errors import UserError

SUMMARY = "metrics/summary.json"  # the report stage's accuracies over seeds (report.document.SUMMARY)
# keys that measure the machine, not the method
MACHINE = re.compile(r"img_per_s|latency|wall_time|_mb$|memory|rss|cuda|gpu|power|mfu|local_|_s$")
RESULT = re.compile(r"top1|top5|acc|loss|verdict|mcnemar")  # a verdict that flips is a result too
KINDS = ("result", "other", "machine")  # the table's order
WITHIN, BEYOND = "within noise", "beyond noise"


def dvc(args: list[str], cwd: Path | str = ".") -> tuple[str, str | None]:
    """(stdout, error) of `python -m dvc ARGS` in `cwd`; error is its message when it fails."""
    p = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )
    if p.returncode != 0:
        return "", (p.stderr or p.stdout).strip() or f"dvc {args[0]} exited {p.returncode}"
    return p.stdout, None


def metrics_diff(old: str, new: str | None = None, cwd: Path | str = ".") -> tuple[dict, str | None]:
    """{file: {key: {old, new, diff}}} of `dvc metrics diff --json OLD [NEW]` (NEW: the
    workspace), or the error dvc gave."""
    out, error = dvc(["metrics", "diff", "--json", old, *([new] if new else [])], cwd)
    return ({} if error or not out.strip() else json.loads(out)), error


def summary_at(rev: str | None, cwd: Path | str = ".") -> dict:
    """metrics/summary.json as `rev` committed it (None: the workspace's); {} where it has none."""
    try:
        if rev is None:
            return json.loads((Path(cwd) / SUMMARY).read_text())
        p = subprocess.run(
            ["git", "show", f"{rev}:{SUMMARY}"], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
        )
        return json.loads(p.stdout) if p.returncode == 0 else {}
    except (OSError, ValueError):
        return {}


def run_of(path: str, key: str) -> str | None:
    """The run a metric belongs to: metrics/evaluate/<run>/seed-0.json, or summary's `<run>.top1_…`."""
    m = re.match(r"metrics/(?:evaluate|finetune)/([^/]+)/", path) or re.match(r"metrics/(train)_scratch/", path)
    if m:
        return "scratch" if m.group(1) == "train" else m.group(1)
    m = re.match(r"([^.]+)\.top1", key) if path.endswith("summary.json") else None
    return m.group(1) if m else None


def noise(summary: dict, run: str | None) -> float | None:
    """Half-width of that run's 95% interval of test top-1 over seeds."""
    lo, hi = summary.get(f"{run}.top1_ci95_lo"), summary.get(f"{run}.top1_ci95_hi")
    return None if lo is None or hi is None else (hi - lo) / 2


def fmt(v) -> str:
    return "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def kind_of(key: str) -> str:
    return "machine" if MACHINE.search(key) else "result" if RESULT.search(key) else "other"


def noise_note(path: str, key: str, change, summary: dict, bold: bool = True) -> str:
    """'within noise (±h)' / 'beyond noise (±h)' for a result's numeric change; '' where its run
    has no interval over seeds, or for a spread itself (an sd or half-width has no noise label)."""
    half = noise(summary, run_of(path, key)) if "_sd" not in key and "_half" not in key else None
    if half is None or not isinstance(change, (int, float)):
        return ""
    if abs(change) <= half:
        return f"{WITHIN} (±{half:.3g})"
    return f"**{BEYOND}** (±{half:.3g})" if bold else f"{BEYOND} (±{half:.3g})"


def changed_rows(diff: dict, summary: dict, bold: bool = True) -> list[tuple[str, list[str]]]:
    """(kind, [file, metric, old, new, change, noise]) of every metric that changed, in the
    table's order: results, other metrics, machine metrics."""
    rows = []
    for path, keys in sorted(diff.items()):
        for key, d in sorted(keys.items()):
            old, new, change = d.get("old"), d.get("new"), d.get("diff")
            if old == new:
                continue
            kind = kind_of(key)
            note = noise_note(path, key, change, summary, bold) if kind == "result" else ""
            rows.append((kind, [path, key, fmt(old), fmt(new), fmt(change), note]))
    return sorted(rows, key=lambda r: KINDS.index(r[0]))


def split_diff(diff: dict, summary: dict) -> tuple[list[list[str]], list[list[str]], list[list[str]]]:
    """(result rows, machine rows, other rows) of the changed metrics; a result row ends with
    its noise note, the others have none (the pull-request comment's three sections)."""
    rows = changed_rows(diff, summary)
    results = [r for k, r in rows if k == "result"]
    return results, [r[:5] for k, r in rows if k == "machine"], [r[:5] for k, r in rows if k == "other"]


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    return "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    )


def compare(old: str, new: str | None = None, cwd: Path | str = ".", markdown: bool = False) -> str:
    """`vitpipe compare`'s text: one table of what changed from `old` to `new` (None: the
    workspace), results first with their noise, then the notes that say how to read it."""
    diff, error = metrics_diff(old, new, cwd)
    new_name = new or "workspace"
    if error:
        said = error.strip().splitlines()[-1] if error.strip() else error
        raise UserError(
            f"cannot compare {old} with {new_name}: dvc metrics diff says: {said} (give a git "
            f"revision that holds committed results: a commit, branch, tag or dvc experiment)"
        )
    summary = summary_at(new, cwd) or summary_at(old, cwd)
    rows = changed_rows(diff, summary, bold=markdown)
    if not rows:
        return f"no metric changed between {old} and {new_name}"
    header = ["", "file", "metric", old, new_name, "change", "noise"]
    body = [[kind, *r] for kind, r in rows]
    if markdown:
        text = table(header, body)
    else:
        from tabulate import tabulate

        text = tabulate(body, headers=header, disable_numparse=True)
    notes = []
    if any(r[-1] for r in body):
        notes.append(
            f"{WITHIN}: the change is inside half the 95% interval that the run's seeds give on their own "
            f"({SUMMARY}); only a change {BEYOND} says the method changed."
        )
    if any(k == "machine" for k, _ in rows):
        notes.append(
            "machine: throughput, latency, wall time and memory measure the machine that ran each revision; "
            "compare them only between runs on the same machine."
        )
    return "\n".join([text, "", *notes]).rstrip()
