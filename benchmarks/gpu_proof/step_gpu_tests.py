"""Step 1: the `gpu`-marked pytest tests, each one's outcome (recorded as it finishes by
gpu_proof.pytest_plugin, so a killed run still names the test that hung)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from gpu_proof.common import ROOT, Ctx, Recorder, device_of, die_with_parent, pythonpath


def gpu_test_files() -> list[Path]:
    return [p for p in sorted((ROOT / "tests").glob("test_*.py")) if "pytest.mark.gpu" in p.read_text()]


def run(rec: Recorder, ctx: Ctx):
    files = gpu_test_files()
    rec.set(files=[str(p.relative_to(ROOT)) for p in files])
    rec.check("gpu-marked test files found", bool(files), f"{len(files)} files")
    events = ctx.work / "tests.jsonl"
    junit = ctx.logs / "gpu_tests.junit.xml"  # archived with the logs
    env = {**os.environ, "GPU_PROOF_TESTLOG": str(events), "PYTHONPATH": pythonpath()}
    limit = max(10.0, ctx.limit - 15)  # pytest's own limit: inside the step's, to record what it got to
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-p",
        "gpu_proof.pytest_plugin",
        "-p",
        "no:cacheprovider",
        "-q",
        "-rfEs",
        f"--junitxml={junit}",
        *map(str, files),
    ]
    rec.running("pytest -m gpu")
    t = time.monotonic()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, preexec_fn=die_with_parent)
    try:
        rc, timed_out = p.wait(timeout=limit), False
    except subprocess.TimeoutExpired:
        p.kill()
        rc, timed_out = p.wait(), True
    tests = collect_test_events(events, timed_out)
    counts = {
        k: sum(t["outcome"] == k for t in tests)
        for k in ("passed", "failed", "error", "skipped", "timeout", "incomplete")
    }
    rec.set(
        tests=tests,
        counts=counts,
        pytest_exit_code=rc,
        pytest_s=round(time.monotonic() - t, 1),
        junit=f"logs/{junit.name}",
    )
    rec.headline(
        ", ".join(f"{v} {k}" for k, v in counts.items() if v or k in ("passed", "failed"))
        + f" (of {len(tests)} gpu-marked tests in {len(files)} files)"
    )
    rec.check("pytest finished in its limit", not timed_out, f"{limit:.0f} s" + (" (killed)" if timed_out else ""))
    rec.check("gpu-marked tests collected", len(tests) > 0, f"{len(tests)} tests")
    rec.check(
        "no gpu-marked test failed",
        counts["passed"] + counts["skipped"] == len(tests),
        ", ".join(t["nodeid"] for t in tests if t["outcome"] not in ("passed", "skipped")) or "none",
    )
    if tests and counts["skipped"] == len(tests) and device_of(ctx).type != "cuda":
        rec.skip("no CUDA (every gpu-marked test skipped itself)")


def collect_test_events(events: Path, timed_out: bool) -> list[dict]:
    """Per test: passed | failed (its call) | error (setup/teardown) | skipped | timeout (running
    when pytest was killed) | incomplete (pytest died during it)."""
    phases: dict[str, dict] = {}
    if events.exists():
        for line in events.read_text().splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue
            p = phases.setdefault(e["nodeid"], {})
            if e["event"] == "report":
                p[e["when"]] = e
    tests = []
    for nodeid, p in phases.items():
        failed = [w for w in ("setup", "call", "teardown") if p.get(w, {}).get("outcome") == "failed"]
        skipped = [w for w in ("setup", "call") if p.get(w, {}).get("outcome") == "skipped"]
        if failed:
            outcome, detail = ("failed" if failed[0] == "call" else "error"), p[failed[0]].get("detail", "")
        elif skipped:
            outcome, detail = "skipped", p[skipped[0]].get("detail", "")
        elif p.get("call", {}).get("outcome") == "passed" and "teardown" in p:
            outcome, detail = "passed", ""
        else:
            outcome, detail = ("timeout" if timed_out else "incomplete"), "running when pytest stopped"
        tests.append(
            {
                "nodeid": nodeid,
                "outcome": outcome,
                "detail": detail,
                "duration_s": round(sum(x.get("duration", 0.0) for x in p.values()), 2),
            }
        )
    return tests
