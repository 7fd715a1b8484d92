"""The body of the pull-request comment: what this change does to the pipeline's results.

    python scripts/pr_comment.py --base main --out comment.md [--summary "$GITHUB_STEP_SUMMARY"]

Runs `dvc metrics diff --json <base>` and `dvc params diff --md <base>` in the current
repository (the working tree, after `dvc repro`, against the base branch's committed metrics),
lifts the "Headline" section out of reports/report.md, and writes one markdown comment. The
workflow (.github/workflows/pr.yml) posts it; this script never talks to GitHub.

Results (accuracy, loss) come first. A change of an accuracy that its run's own spread over
seeds already covers (the 95% interval in metrics/summary.json) is marked *within noise*; a
verdict that changes (`<comparison>.verdict`, e.g. holds -> inconclusive) and McNemar's p-value
of a one-seed comparison are results too.
Machine metrics (img/s, latency, wall time, memory) sit apart: they measure the runner.
Which metric is which, and the noise, come from vitpipe.report.compare: `vitpipe compare REV`
prints the same comparison as one table in a terminal."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vitpipe.report.compare import SUMMARY, dvc, metrics_diff, split_diff, table

MARKER = "<!-- vitpipe-pr-report -->"  # lets the workflow find and update its own comment
GITHUB_LIMIT = 65_536  # characters in one issue comment
HEADLINE = "Headline"
FOLD_ROWS = 40  # longer diff tables go in a collapsed <details>


def metrics_sections(base: str, diff: dict, error: str | None, summary: dict) -> list[str]:
    if error:
        return [
            f"### Results against `{base}`",
            "",
            f"`dvc metrics diff --json {base}` failed:",
            "",
            "```",
            error[-2000:],
            "```",
            "",
        ]
    results, machine, other = split_diff(diff, summary)
    out = [f"### Results against `{base}` (accuracy, loss)", ""]
    out += (
        [table(["file", "metric", base, "this branch", "change", "noise"], results), ""]
        if results
        else ["No accuracy or loss changed.", ""]
    )
    if results and any("noise" in r[-1] for r in results):
        out += [
            "*within noise*: the change is inside the 95% interval that this run's seeds give on their own "
            "(metrics/summary.json); only a change *beyond noise* says the method changed.",
            "",
        ]
    if other:
        out += fenced(
            "Other metrics (sizes, steps, counts)",
            table(["file", "metric", base, "this branch", "change"], other),
            None,
            base,
            "metrics",
        )
    out += [
        f"### Machine-dependent metrics against `{base}`",
        "",
        "Throughput, latency, wall time and memory measure the runner that ran the job (CI runners differ by "
        "30-80% from run to run); read them only between runs on the same machine.",
        "",
    ]
    out += (
        [
            f"<details><summary>{len(machine)} changed</summary>",
            "",
            table(["file", "metric", base, "this branch", "change"], machine),
            "",
            "</details>",
            "",
        ]
        if machine
        else ["None changed.", ""]
    )
    return out


def dvc_diff(kind: str, base: str, cwd: Path | str = ".") -> tuple[str, str | None]:
    """(markdown table, error) of `dvc <kind> diff --md <base>`; an empty table means no change."""
    out, error = dvc([kind, "diff", "--md", base], cwd)
    if error:
        return "", error
    table = out.strip()
    return ("" if len(table.splitlines()) <= 2 else table), None  # a header alone: nothing changed


def section(markdown: str, title: str) -> str | None:
    """The `## <title>` section of a markdown document, without its heading; None if absent."""
    lines = markdown.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == f"## {title}"), None)
    if start is None:
        return None
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "\n".join(lines[start + 1 : end]).strip()


def fenced(title: str, table: str, error: str | None, base: str, what: str) -> list[str]:
    if error:
        return [f"### {title}", "", f"`dvc {what} diff --md {base}` failed:", "", "```", error[-2000:], "```", ""]
    if not table:
        return [f"### {title}", "", f"No {what} changed against `{base}`.", ""]
    rows = len(table.splitlines()) - 2
    if rows > FOLD_ROWS:  # a first run against a base without metrics lists every key: fold it
        return [f"### {title}", "", f"<details><summary>{rows} rows</summary>", "", table, "", "</details>", ""]
    return [f"### {title}", "", table, ""]


def comment_body(
    base: str,
    metrics: tuple[dict, str | None],
    params: tuple[str, str | None],
    headline: str | None,
    artifacts: str | None = None,
    summary: dict | None = None,
) -> str:
    """The whole comment. Results come first: they are what a reviewer came for."""
    lines = [MARKER, "## vitpipe: what this pull request changes", ""]
    lines += metrics_sections(base, *metrics, summary or {})
    lines += fenced(f"Params against `{base}`", *params, base, "params")
    lines += ["### The report's headline (this branch)", ""]
    lines += [headline, ""] if headline else ["`reports/report.md` has no Headline section.", ""]
    link = f"[the workflow run's artifacts]({artifacts})" if artifacts else "the workflow run's artifacts"
    lines += [
        f"The full report (`reports/report.md`, `reports/report.html` with its figures) and the "
        f"`dvc plots diff {base}` page are in {link}."
    ]
    body = "\n".join(lines) + "\n"
    if len(body) > GITHUB_LIMIT:  # keep the marker, the start of the diff and the pointer to the rest
        note = "\n\n… (cut to fit a GitHub comment; the full diff is in the job summary's artifacts)\n"
        body = body[: GITHUB_LIMIT - len(note)] + note
    return body


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="main", help="git revision to compare with (default: main)")
    ap.add_argument("--report", default="reports/report.md", type=Path)
    ap.add_argument("--out", default="comment.md", type=Path, help="where to write the comment body")
    ap.add_argument("--summary", type=Path, help="also append the body to this file ($GITHUB_STEP_SUMMARY)")
    ap.add_argument("--artifacts", help="URL of the run's artifacts, linked from the comment")
    args = ap.parse_args(argv)
    headline = section(args.report.read_text(), HEADLINE) if args.report.exists() else None
    summary = json.loads(Path(SUMMARY).read_text()) if Path(SUMMARY).exists() else {}
    body = comment_body(
        args.base, metrics_diff(args.base), dvc_diff("params", args.base), headline, args.artifacts, summary
    )
    args.out.write_text(body)
    if args.summary:
        with args.summary.open("a") as f:
            f.write(body)
    print(f"pr_comment: {args.out} ({len(body):,} characters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
