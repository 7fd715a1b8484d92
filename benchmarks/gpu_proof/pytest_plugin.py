"""pytest plugin (pytest -p gpu_proof.pytest_plugin): every test's phases, as they happen,
to the JSONL file named by $GPU_PROOF_TESTLOG. A run killed at its limit still says which
tests passed and which one was running."""

import json
import os


def _testlog(entry: dict) -> None:
    path = os.environ.get("GPU_PROOF_TESTLOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")


def pytest_runtest_logstart(nodeid, location):
    _testlog({"event": "start", "nodeid": nodeid})


def pytest_runtest_logreport(report):
    detail = ""
    if report.skipped and isinstance(report.longrepr, tuple):
        detail = str(report.longrepr[2])
    elif report.failed:
        detail = str(getattr(report, "longreprtext", "") or report.longrepr).strip().splitlines()[-1:]
        detail = detail[0] if detail else ""
    _testlog(
        {
            "event": "report",
            "nodeid": report.nodeid,
            "when": report.when,
            "outcome": report.outcome,
            "duration": report.duration,
            "detail": detail[:500],
        }
    )
