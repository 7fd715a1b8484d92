"""The orchestrator: one process per step, each under its own time limit, within the budget;
the outputs rewritten before and after every step; every step process killed on exit and
on SIGTERM/SIGINT/SIGHUP."""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from gpu_proof.common import (
    DRY_BUDGET_S,
    GPU_BUDGET_S,
    PROBE,
    ROOT,
    SCHEMA,
    STEPS,
    TARGETS,
    child_cmd,
    die_with_parent,
    pythonpath,
)
from gpu_proof.summary import describe_machine, markdown, status_text, summarise

OUTPUTS = ("gpu_proof.json", "gpu_proof.md", "console.log", "logs.tar.gz")  # all that --out receives
RUNNING: set[subprocess.Popen] = set()  # step processes alive now: killed, with their groups, on the way out


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python3 benchmarks/gpu_proof", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_proof", help=f"folder for {', '.join(OUTPUTS)} (default ./gpu_proof)")
    ap.add_argument("--cpu-dry-run", action="store_true", help="run the harness on CPU with tiny models (CI)")
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"seconds for all steps together (default {GPU_BUDGET_S}; dry run {DRY_BUDGET_S})",
    )
    ap.add_argument("--step-limit", type=float, default=None, help="cap every step's own time limit (seconds)")
    ap.add_argument("--only", default=None, help="comma-separated step names to run (the others are skipped)")
    ap.add_argument("--keep-work", action="store_true", help="keep the scratch folder (data, weights, checkpoints)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--logs", help=argparse.SUPPRESS)
    ap.add_argument("--limit", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    unknown = (only or set()) - {s.name for s in STEPS}
    if unknown:
        ap.error(f"unknown step(s) {', '.join(sorted(unknown))}; steps: {', '.join(s.name for s in STEPS)}")
    args.only = only
    return args


class Console:
    """Prints to stdout and to <out>/console.log."""

    def __init__(self, path: Path):
        self.file = open(path, "w")  # noqa: SIM115 — open for the whole run

    def __call__(self, text: str = "", end: str = "\n"):
        for f in (sys.stdout, self.file):
            f.write(text + end)
            f.flush()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        from gpu_proof.child import child_main

        return child_main(args)
    dry = args.cpu_dry_run
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUTS:  # a previous run's files would pass for this one's
        (out / name).unlink(missing_ok=True)
    budget = args.budget or (DRY_BUDGET_S if dry else GPU_BUDGET_S)
    work = Path(tempfile.mkdtemp(prefix="gpu_proof_", dir=work_root()))
    (work / "logs").mkdir()
    say = Console(out / "console.log")
    report = {
        "schema": SCHEMA,
        "mode": "cpu-dry-run" if dry else "gpu",
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "budget_s": budget,
        "targets": TARGETS,
        "work": str(work) if args.keep_work else None,
        "machine": {},
        "steps": [],
    }
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    say(f"gpu_proof: {'CPU dry run (tiny models)' if dry else 'GPU run'} -> {out}; budget {budget:.0f} s")
    t0 = time.monotonic()
    try:
        run_steps(args, report, out, work, budget, t0, say)
    except Interrupted as e:
        report["interrupted"] = (
            f"{e} received during {report.get('running') or 'the harness'}; the steps after it did not run"
        )
        say(f"\n  interrupted by {e}: every step process killed")
    finally:
        kill_running()
        for s, h in old.items():
            signal.signal(s, h)
        report.pop("running", None)
        finish(report, out, work, t0)
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    say(markdown(report))
    say(f"wrote {', '.join(str(out / n) for n in OUTPUTS)}")
    bad = [s for s in report["steps"] if s["status"] in ("failed", "timeout")]
    return 130 if report.get("interrupted") else 1 if bad else 0


TMPFS_FREE_BYTES = 8 << 30  # the memory step's checkpoints and the data sets, with room to spare


def work_root() -> str | None:
    """/dev/shm (RAM: no disk's fsync in the measured fits) where it has room, else the
    system's temp folder. A container's default /dev/shm is 64 MB: too small, so not taken."""
    try:
        if shutil.disk_usage("/dev/shm").free >= TMPFS_FREE_BYTES and os.access("/dev/shm", os.W_OK):
            return "/dev/shm"
    except OSError:
        pass
    return None


def on_signal(signum, frame):
    raise Interrupted(signum)


def run_steps(args, report: dict, out: Path, work: Path, budget: float, t0: float, say):
    dry = args.cpu_dry_run
    report["running"] = PROBE.title
    write_outputs(out, report, work, t0)
    machine = run_child(PROBE, dry, work, min(PROBE.dry_limit_s if dry else PROBE.gpu_limit_s, budget))
    report["machine"] = {**(machine.get("results") or {}), "git": git_revision()}
    if machine["status"] != "passed":
        report["machine"]["probe"] = status_text(machine)
    say(f"  machine: {describe_machine(report['machine'])}")
    for n, step in enumerate(STEPS, 1):
        remaining = budget - (time.monotonic() - t0)
        limit = min(step.dry_limit_s if dry else step.gpu_limit_s, remaining, args.step_limit or math.inf)
        if args.only is not None and step.name not in args.only:
            result = skipped_result("not selected (--only)")
        elif remaining < 5:
            own = step.dry_limit_s if dry else step.gpu_limit_s
            result = skipped_result(f"the budget of {budget:.0f} s was spent; it would have taken up to {own} s")
            result["would_take_s"] = own
        else:
            report["running"] = f"step {n} ({step.name}), limit {limit:.0f} s"
            write_outputs(out, report, work, t0)  # a run cut short here still says what it had measured
            say(f"  [{n}/{len(STEPS)}] {step.title} (limit {limit:.0f} s) ...", end="")
            result = run_child(step, dry, work, limit)
            say(f" {status_text(result)} in {result['duration_s']:.0f} s")
        report["steps"].append({"number": n, "name": step.name, "title": step.title, **result})
        report.pop("running", None)
        write_outputs(out, report, work, t0)


def skipped_result(reason: str) -> dict:
    return {
        "status": "skipped",
        "reason": reason,
        "headline": "",
        "duration_s": 0.0,
        "limit_s": 0.0,
        "checks": [],
        "results": {},
        "log": None,
    }


def run_child(step, dry: bool, work: Path, limit: float) -> dict:
    """Run one step in its own process group; kill the group when it outlives `limit`."""
    name = step.name
    result_file = work / f"{name}.result.json"
    log = work / "logs" / f"{name}.log"
    step_work = work / name
    step_work.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": pythonpath(),
        "VITPIPE_CHECKPOINT_DIR": str(step_work / "checkpoint-store"),
        "PYTHONUNBUFFERED": "1",
    }
    for k in ("VITPIPE_CHECKPOINT_MIRROR", "VITPIPE_CHECKPOINT_KEEP"):
        env.pop(k, None)
    if dry:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is a CPU run, GPU or not
        env.setdefault("OMP_NUM_THREADS", "1")  # deterministic, and fastest on a small shared machine
    cmd = child_cmd(
        "--child",
        name,
        "--result",
        str(result_file),
        "--work",
        str(step_work),
        "--logs",
        str(work / "logs"),
        "--limit",
        str(limit),
    ) + (["--cpu-dry-run"] if dry else [])
    t = time.monotonic()
    with open(log, "w") as f:
        p = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        RUNNING.add(p)
        try:
            rc = p.wait(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            kill_group(p)
            rc, timed_out = p.wait(), True
        finally:
            kill_group(p)  # what it started and left behind goes with it
            RUNNING.discard(p)
    duration = time.monotonic() - t
    try:
        result = json.loads(result_file.read_text())
    except (OSError, ValueError):
        result = {"status": None, "reason": "", "headline": "", "checks": [], "results": {}}
    if timed_out:
        result["status"] = "timeout"
        doing = f" ({result['running']})" if result.get("running") else ""
        result["reason"] = f"killed after its limit of {limit:.0f} s{doing}"
    elif result.get("status") is None:
        result["status"] = "failed"
        result["reason"] = f"the step's process exited with code {rc} before recording a result (see its log)"
    result.pop("running", None)
    result.update(duration_s=round(duration, 1), limit_s=round(limit, 1), log=f"logs/{log.name}")
    return result


def kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        if p.poll() is None:
            p.kill()


def kill_running():
    for p in list(RUNNING):
        kill_group(p)
        p.wait()
        RUNNING.discard(p)


def finish(report: dict, out: Path, work: Path, t0: float):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the last write short
    try:
        write_outputs(out, report, work, t0)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def write_outputs(out: Path, report: dict, work: Path, t0: float) -> None:
    """gpu_proof.json, gpu_proof.md and logs.tar.gz, each replaced atomically."""
    report["wall_s"] = round(time.monotonic() - t0, 1)
    report["summary"] = summarise(report)
    for name, text in (
        ("gpu_proof.json", json.dumps(report, indent=1, default=str) + "\n"),
        ("gpu_proof.md", markdown(report)),
    ):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for f in sorted((work / "logs").iterdir()):
            tar.add(f, arcname=f"logs/{f.name}")
    tmp = out / ".logs.tar.gz.tmp"
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, out / "logs.tar.gz")


def git_revision() -> str | None:
    try:
        p = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        rev = p.stdout.strip() if p.returncode == 0 else None
        if rev:
            dirty = subprocess.run(
                ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            return rev + ("+changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None
