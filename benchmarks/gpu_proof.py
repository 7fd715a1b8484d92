"""One command that proves every GPU path of vitpipe, on the first GPU that comes along.

    PYTHONPATH=. python benchmarks/gpu_proof.py                 # on an NVIDIA GPU: <= 8 min on an H100
    PYTHONPATH=. python benchmarks/gpu_proof.py --cpu-dry-run   # the same harness on CPU, tiny models

Needs only what a stock PyTorch image has (torch, timm, numpy, pyyaml, pytest, nvidia-ml-py,
...): no DVC, no network, no install. Writes <out>/gpu_proof.json and <out>/gpu_proof.md
(default ./gpu_proof/) and each step's output under <out>/logs/. Each step runs in its own
process with its own time limit (and all of them within --budget), so a hang or a crash
costs that step only. The steps:

  1 gpu_tests   the `gpu`-marked pytest tests, each one's outcome
  2 throughput  ViT-B/16 at 224 in bf16: bare timm loop vs vitpipe.training.loop.fit, img/s and MFU,
                compile off and on; the peak from the device profile and from a bf16 matmul
  3 memory      compute-model peak vs torch.cuda.max_memory_allocated: ViT-B/32, B/16, B/8 at
                224, two micro-batches each, fp32 and bf16, activation checkpointing off and on
  4 oom         a micro-batch that overflows the card: the plan message; then the plan runs
  5 telemetry   NVML utilisation, memory and power in a training run's metrics JSON
  6 slice       the full-size preset in miniature through the stage scripts: ViT-B/16 at 224
                fine-tuned on CIFAR-format data made here; SIGKILL mid-run, resume, and the
                final weights against an uninterrupted run's
  7 precision   bf16 only where native (compute capability >= 8.0), `auto`, fp16 + grad scaler

With --cpu-dry-run every step runs on the CPU with tiny models (a 32 px ViT) so that CI
tests the harness; what only a GPU can show is recorded as "skipped: no CUDA". No figure of
a dry run is a GPU figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = 1
TARGETS = {"mfu": 0.60, "pipeline_over_bare": 0.97, "memory_error": 0.10}
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    title: str
    gpu_limit_s: int
    dry_limit_s: int


STEPS = [
    Step("gpu_tests", "gpu-marked tests", 90, 90),
    Step("throughput", "throughput: bare loop vs fit, MFU", 200, 60),
    Step("memory", "memory: predicted vs measured peak", 90, 60),
    Step("oom", "OOM: the plan message, then the plan", 60, 30),
    Step("telemetry", "NVML telemetry in the metrics", 45, 30),
    Step("slice", "preset slice: SIGKILL, resume, compare", 180, 120),
    Step("precision", "precision: bf16 only where native", 45, 30),
]
GPU_BUDGET_S, DRY_BUDGET_S = 470, 420

# What each mode runs. GPU: the issue's sizes. Dry run: tiny, so the whole harness takes ~1 min on 2 cores.
TINY = {"arch": "vit", "patch": 8, "dim": 64, "depth": 2, "heads": 2, "mlp_ratio": 2.0}
MODES = {
    "gpu": {
        "throughput": {"spec": {"arch": "vit_b16"}, "size": 224, "classes": 100, "batch": 256, "warmup": 10,
                       "steps": 30, "compile": [False, True], "matmul_n": 8192, "matmul_s": 1.0},
        "memory": {"size": 224, "classes": 100,
                   "cases": [({"arch": "vit_b32"}, (64, 256)), ({"arch": "vit_b16"}, (32, 128)),
                             ({"arch": "vit_b8"}, (8, 32))]},
        "oom": {"spec": {"arch": "vit_b16"}, "size": 224, "classes": 100},
        "telemetry": {"spec": {"arch": "vit_b16"}, "size": 224, "classes": 100, "batch": 64, "seconds": 5.0},
        "slice": {"variant": "vit_b16", "spec": {"arch": "vit_b16"}, "size": 224, "n_train": 320, "n_test": 100,
                  "steps": 60, "batch": 32, "micro": 16, "checkpoint_every": 20, "eval_every": 30},
        "precision": {"spec": {"arch": "vit_s16"}, "size": 224, "batch": 32, "steps": 20},
    },
    "dry": {
        "throughput": {"spec": TINY, "size": 32, "classes": 10, "batch": 32, "warmup": 10, "steps": 20,
                       "compile": [False], "matmul_n": 256, "matmul_s": 0.2},
        "memory": {"size": 32, "classes": 10,
                   "cases": [(TINY, (4, 8)), ({**TINY, "patch": 4}, (2, 4))]},
        "oom": {"spec": {"arch": "vit_b16"}, "size": 224, "classes": 100, "profile": "h100-80"},
        "telemetry": {"spec": TINY, "size": 32, "classes": 10, "batch": 16, "steps": 20},
        "slice": {"variant": "vit_tiny", "spec": TINY, "size": 32, "n_train": 200, "n_test": 100,
                  "steps": 200, "batch": 16, "micro": 8, "checkpoint_every": 10, "eval_every": 100},
        "precision": {"spec": TINY, "size": 32, "batch": 8, "steps": 4},
    },
}


# =======================================================================================
# The orchestrator: one child process per step, each under its own time limit


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="gpu_proof", help="folder for gpu_proof.json, gpu_proof.md, logs/ (default ./gpu_proof)")
    ap.add_argument("--cpu-dry-run", action="store_true", help="run the harness on CPU with tiny models (CI)")
    ap.add_argument("--budget", type=float, default=None,
                    help=f"seconds for all steps together (default {GPU_BUDGET_S}; dry run {DRY_BUDGET_S})")
    ap.add_argument("--step-limit", type=float, default=None, help="cap every step's own time limit (seconds)")
    ap.add_argument("--only", default=None, help="comma-separated step names to run (the others are skipped)")
    ap.add_argument("--keep-work", action="store_true", help="keep the scratch folder (data, weights, checkpoints)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--limit", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(args)

    dry = args.cpu_dry_run
    out = Path(args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    budget = args.budget or (DRY_BUDGET_S if dry else GPU_BUDGET_S)
    only = set(args.only.split(",")) if args.only else None
    unknown = (only or set()) - {s.name for s in STEPS}
    if unknown:
        ap.error(f"unknown step(s) {', '.join(sorted(unknown))}; steps: {', '.join(s.name for s in STEPS)}")
    work = Path(tempfile.mkdtemp(prefix="gpu_proof_"))
    t0 = time.monotonic()
    report = {"schema": SCHEMA, "mode": "cpu-dry-run" if dry else "gpu",
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "budget_s": budget, "targets": TARGETS, "work": str(work) if args.keep_work else None}
    print(f"gpu_proof: {'CPU dry run (tiny models)' if dry else 'GPU run'} -> {out}; budget {budget:.0f} s", flush=True)
    try:
        machine = run_child("probe", dry, out, work, limit=120)
        report["machine"] = {**(machine.get("results") or {}), "git": git_revision()}
        if machine["status"] != "passed":
            report["machine"]["probe"] = machine["status"] + (": " + machine["reason"] if machine["reason"] else "")
        print(f"  machine: {describe_machine(report['machine'])}", flush=True)
        steps = []
        for n, step in enumerate(STEPS, 1):
            remaining = budget - (time.monotonic() - t0)
            limit = min(step.dry_limit_s if dry else step.gpu_limit_s, remaining, args.step_limit or math.inf)
            if only is not None and step.name not in only:
                result = skipped_result("not selected (--only)")
            elif remaining < 5:
                result = skipped_result(f"the budget of {budget:.0f} s was spent")
            else:
                print(f"  [{n}/{len(STEPS)}] {step.title} (limit {limit:.0f} s) ...", end="", flush=True)
                result = run_child(step.name, dry, out, work, limit)
                print(f" {status_text(result)} in {result['duration_s']:.0f} s", flush=True)
            steps.append({"number": n, "name": step.name, "title": step.title, **result})
            report["steps"] = steps
            report["wall_s"] = round(time.monotonic() - t0, 1)
            report["summary"] = summarise(report)
            write_outputs(out, report)  # after every step: an interrupted run still leaves a result
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(report))
    print(f"wrote {out / 'gpu_proof.json'} and {out / 'gpu_proof.md'}")
    bad = [s for s in report.get("steps", []) if s["status"] in ("failed", "timeout")]
    return 1 if bad else 0


def skipped_result(reason: str) -> dict:
    return {"status": "skipped", "reason": reason, "headline": "", "duration_s": 0.0, "limit_s": 0.0,
            "checks": [], "results": {}, "log": None}


def run_child(name: str, dry: bool, out: Path, work: Path, limit: float) -> dict:
    """Run one step in its own process group; kill the group when it outlives `limit`."""
    result_file = work / f"{name}.result.json"
    log = out / "logs" / f"{name}.log"
    step_work = work / name
    step_work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "VITPIPE_CHECKPOINT_DIR": str(step_work / "checkpoint-store"), "PYTHONUNBUFFERED": "1"}
    for k in ("VITPIPE_CHECKPOINT_MIRROR", "VITPIPE_CHECKPOINT_KEEP"):
        env.pop(k, None)
    if dry:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is a CPU run, GPU or not
        env.setdefault("OMP_NUM_THREADS", "1")  # deterministic, and fastest on a small shared machine
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--result", str(result_file),
           "--work", str(step_work), "--out", str(out), "--limit", str(limit)] + (["--cpu-dry-run"] if dry else [])
    t = time.monotonic()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=limit)
            timed_out = False
        except subprocess.TimeoutExpired:
            kill_group(p)
            rc, timed_out = p.wait(), True
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
        result["reason"] = f"the step's process exited with code {rc} before recording a result (see the log)"
    result.pop("running", None)
    result.update(duration_s=round(duration, 1), limit_s=round(limit, 1), log=str(log.relative_to(out)))
    return result


def kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        p.kill()


def git_revision() -> str | None:
    try:
        p = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           timeout=10)
        rev = p.stdout.strip() if p.returncode == 0 else None
        if rev:
            dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            return rev + ("+changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


# =======================================================================================
# Summary, JSON and markdown


def status_text(step: dict) -> str:
    return step["status"] + (f": {step['reason']}" if step.get("reason") and step["status"] != "passed" else "")


def summarise(report: dict) -> dict:
    steps = {s["name"]: s for s in report.get("steps", [])}
    counts = {k: sum(s["status"] == k for s in steps.values()) for k in ("passed", "failed", "timeout", "skipped")}
    dry = report["mode"] != "gpu"
    gpu_name = (report.get("machine") or {}).get("gpu_name") or ""
    targets = []

    def target(name, goal, value, text, met, note=""):
        if value is None:
            met, note = None, note or "not measured"
        elif dry:
            met, note = None, "CPU dry run of a tiny model: not a GPU figure, the target does not apply"
        targets.append({"name": name, "goal": goal, "value": value, "measured": text, "met": met, "note": note})

    thr = (steps.get("throughput") or {}).get("results") or {}
    runs = [r for r in thr.get("runs", []) if not r.get("skipped")]
    key = "pipeline_mfu_profile" if any(r.get("pipeline_mfu_profile") for r in runs) else "pipeline_mfu_measured"
    best = max((r for r in runs if r.get(key) is not None), key=lambda r: r[key], default=None)
    note = "" if "H100" in gpu_name or dry else f"the target is for an H100; this is {gpu_name or 'another device'}"
    target("ViT-B/16 bf16 MFU (pipeline, best of compile off/on, device-profile peak)", f">= {TARGETS['mfu']:.0%} on H100",
           best[key] if best else None,
           (f"{fmt(best['pipeline_mfu_profile'], '.1%', 'n/a (no device profile)')} of the profile peak, "
            f"{fmt(best['pipeline_mfu_measured'], '.1%')} of the measured matmul peak "
            f"(compile {'on' if best['compile'] else 'off'})") if best else "",
           best is not None and best[key] >= TARGETS["mfu"], note)
    ratios = [r for r in thr.get("runs", []) if r.get("ratio") is not None]
    worst_ratio = min(ratios, key=lambda r: r["ratio"], default=None)
    target("pipeline / bare img/s (worst of compile off/on)", f">= {TARGETS['pipeline_over_bare']}",
           worst_ratio and worst_ratio["ratio"],
           "; ".join(f"{r['ratio']:.3f} (compile {'on' if r['compile'] else 'off'})" for r in ratios),
           worst_ratio is not None and worst_ratio["ratio"] >= TARGETS["pipeline_over_bare"])
    mem = (steps.get("memory") or {}).get("results") or {}
    worst = mem.get("worst")
    target("memory prediction error, worst case", f"within {TARGETS['memory_error']:.0%}",
           worst and abs(worst["error"]),
           worst and f"{worst['error']:+.1%} ({case_label(worst)}; {mem.get('measure', '')})" or "",
           worst is not None and abs(worst["error"]) <= TARGETS["memory_error"])
    return {"steps": counts, "targets": targets,
            "ok": counts["failed"] == 0 and counts["timeout"] == 0}


def model_label(spec: dict, size: int) -> str:
    if spec.get("arch") == "vit":
        return f"ViT patch {spec['patch']} dim {spec['dim']} depth {spec['depth']} at {size} px"
    from vitpipe.models import describe

    return describe(spec, size)


def case_label(c: dict) -> str:
    return f"{c['model']} {c['precision']}{' ckpt' if c['checkpointing'] else ''} mb {c['batch']}"


def write_outputs(out: Path, report: dict) -> None:
    for name, text in (("gpu_proof.json", json.dumps(report, indent=1, default=str) + "\n"),
                       ("gpu_proof.md", markdown(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def describe_machine(m: dict) -> str:
    dev = (f"{m['gpu_name']} (compute capability {m['capability']}, {m['gpu_memory_gib']:.1f} GiB)"
           if m.get("gpu_name") else f"CPU ({m.get('cpu_count', '?')} cores), no CUDA")
    return (f"{dev}; torch {m.get('torch')} (CUDA {m.get('torch_cuda') or 'none'}), timm {m.get('timm')}, "
            f"Python {m.get('python')}, vitpipe {m.get('git') or 'unknown revision'}")


def fmt(v, spec=".1f", none="n/a") -> str:
    return none if v is None else format(v, spec)


def table(header: list[str], rows: list[list]) -> list[str]:
    return (["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def markdown(report: dict) -> str:
    dry = report["mode"] != "gpu"
    m = report.get("machine") or {}
    steps = report.get("steps", [])
    s = report.get("summary") or {"steps": {}, "targets": []}
    title = ("GPU proof: CPU dry run (tiny models; the harness tested, no GPU figure)" if dry
             else f"GPU proof: {m.get('gpu_name') or 'no CUDA device found'}")
    lines = [f"# {title}", "",
             f"{report['started']} · {describe_machine(m)} · {len(steps)} steps in {report.get('wall_s', 0):.0f} s "
             f"(budget {report['budget_s']:.0f} s) · " + ", ".join(f"{v} {k}" for k, v in s["steps"].items() if v), ""]
    lines += table(["#", "step", "status", "time", "result"],
                   [[st["number"], st["title"], status_text(st).replace("|", "/"),
                     f"{st['duration_s']:.0f} s" + (f" of {st['limit_s']:.0f}" if st["limit_s"] else ""),
                     (st.get("headline") or "").replace("|", "/")] for st in steps])
    lines += ["", "## Targets", ""]
    lines += table(["target", "goal", "measured", "verdict"],
                   [[t["name"], t["goal"], t["measured"] or "n/a",
                     ("met" if t["met"] else "missed") if t["met"] is not None else f"n/a ({t['note']})"]
                    for t in s["targets"]])
    for t in s["targets"]:
        if t["met"] is not None and t["note"]:
            lines.append(f"\n_{t['name']}: {t['note']}._")
    by = {st["name"]: st for st in steps}
    lines += detail_sections(by)
    failed = [c for st in steps for c in st.get("checks", []) if not c["ok"]]
    if failed:
        lines += ["", "## Failed checks", ""] + [f"- {c['name']}: {c['detail']}" for c in failed]
    lines += ["", "Each step's full output: `logs/<step>.log`. Every number: `gpu_proof.json`."]
    return "\n".join(lines) + "\n"


def detail_sections(by: dict) -> list[str]:
    lines = []
    thr = (by.get("throughput") or {}).get("results") or {}
    if thr.get("runs"):
        lines += ["", f"## 2. Throughput: {thr['model']}, {thr['precision']}, batch {thr['batch']} "
                  f"({thr['steps']} timed steps after {thr['warmup']})", "",
                  f"Peak {thr['precision']}: device profile "
                  + (f"{thr['peak_profile_tflops']:.0f} TFLOP/s ({thr['profile_label']})" if thr.get("peak_profile_tflops")
                     else "none (no device profile for a CPU)")
                  + f", measured matmul {fmt(thr.get('peak_measured_tflops'), '.3g')} TFLOP/s; "
                  f"{thr['train_gflops_per_image']:.2f} GFLOP per training image.", ""]
        rows = []
        for r in thr["runs"]:
            if r.get("skipped"):
                rows.append([("on" if r["compile"] else "off"), r["skipped"], "", "", "", "", ""])
                continue
            rows.append(["on" if r["compile"] else "off", fmt(r["bare_img_s"]), fmt(r["pipeline_img_s"]), fmt(r["ratio"], ".3f"),
                         f"{fmt(r['bare_mfu_profile'], '.1%')} / {fmt(r['bare_mfu_measured'], '.1%')}",
                         f"{fmt(r['pipeline_mfu_profile'], '.1%')} / {fmt(r['pipeline_mfu_measured'], '.1%')}",
                         f"{fmt(r['bare_warmup_s'])} / {fmt(r['pipeline_warmup_s'])}"])
        lines += table(["compile", "bare img/s", "pipeline img/s", "pipeline/bare", "MFU bare (profile / matmul)",
                        "MFU pipeline (profile / matmul)", "warm-up s (bare / pipeline)"], rows)
    mem = (by.get("memory") or {}).get("results") or {}
    if mem.get("cases"):
        lines += ["", f"## 3. Memory: predicted vs {mem['measure']}", ""]
        lines += table(["model", "precision", "act. ckpt", "micro-batch", "predicted MiB", "measured MiB", "error"],
                       [[c["model"], c["precision"], "on" if c["checkpointing"] else "off", c["batch"],
                         fmt(c.get("predicted_mib"), ".4g"), fmt(c.get("measured_mib"), ".4g"),
                         fmt(c.get("error"), "+.1%") if c.get("error") is not None else c.get("note", "")]
                        for c in mem["cases"]])
    tests = (by.get("gpu_tests") or {}).get("results") or {}
    if tests.get("tests"):
        lines += ["", "## 1. gpu-marked tests", ""]
        order = {"failed": 0, "error": 1, "timeout": 2, "passed": 3, "skipped": 4}
        lines += table(["test", "outcome", "s", "detail"],
                       [[f"`{t['nodeid']}`", t["outcome"], fmt(t.get("duration_s"), ".1f"),
                         (t.get("detail") or "").replace("|", "/").replace("\n", " ")[:160]]
                        for t in sorted(tests["tests"], key=lambda t: (order.get(t["outcome"], 5), t["nodeid"]))])
    sl = (by.get("slice") or {}).get("results") or {}
    if sl.get("comparison"):
        c = sl["comparison"]
        lines += ["", "## 6. Preset slice", "",
                  f"{sl.get('variant')} at {sl.get('image_size')} px, {sl.get('precision')}, {sl.get('steps')} steps of "
                  f"{sl.get('batch')} (micro-batch {sl.get('micro')}), checkpoint every {sl.get('checkpoint_every')}; "
                  f"killed at row {sl.get('killed_after_rows')}, resumed at step {sl.get('resumed_at')}. "
                  f"Final weights vs the uninterrupted run: {c['verdict']}."]
    return lines


# =======================================================================================
# The child side: one step, its result written as it goes


class Skipped(Exception):
    pass


class Recorder:
    """A step's result, rewritten (atomically) at each addition: a step killed at its time
    limit still leaves what it had measured."""

    def __init__(self, path: Path):
        self.path = path
        self.data = {"status": None, "reason": "", "headline": "", "checks": [], "results": {}, "running": ""}
        self.save()

    def save(self):
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)

    def set(self, **results):
        self.data["results"].update(results)
        self.save()

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.data["checks"].append({"name": name, "ok": bool(ok), "detail": detail})
        self.save()
        print(f"check {'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
        return bool(ok)

    def headline(self, text: str):
        self.data["headline"] = text
        self.save()

    def running(self, what: str):
        self.data["running"] = what
        self.save()
        print(f"-- {what}", flush=True)

    def skip(self, reason: str):
        raise Skipped(reason)


@dataclasses.dataclass
class Ctx:
    dry: bool
    work: Path
    out: Path
    cfg: dict
    limit: float = 60.0

    @property
    def mode(self) -> str:
        return "dry" if self.dry else "gpu"


def child_main(args) -> int:
    rec = Recorder(Path(args.result))
    ctx = Ctx(dry=args.cpu_dry_run, work=Path(args.work), out=Path(args.out), cfg={}, limit=args.limit or 60.0)
    fn = probe if args.child == "probe" else globals()[f"step_{args.child}"]
    ctx.cfg = MODES[ctx.mode].get(args.child, {})
    try:
        fn(rec, ctx)
    except Skipped as e:
        rec.data["status"], rec.data["reason"] = "skipped", str(e)
    except BaseException as e:  # noqa: BLE001 — recorded, the orchestrator goes on
        traceback.print_exc()
        rec.data["status"] = "failed"
        rec.data["reason"] = f"{type(e).__name__}: {' '.join(str(e).split())}"[:400]
    else:
        bad = [c["name"] for c in rec.data["checks"] if not c["ok"]]
        rec.data["status"] = "failed" if bad else "passed"
        rec.data["reason"] = ("failed checks: " + "; ".join(bad)) if bad else ""
    rec.data["running"] = ""
    rec.save()
    return 0


def device_of(ctx: Ctx):
    import torch

    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def need_device(rec: Recorder, ctx: Ctx):
    """The device a step runs on: CUDA, or the CPU in a dry run; without CUDA a real run skips."""
    dev = device_of(ctx)
    if dev.type != "cuda" and not ctx.dry:
        rec.skip("no CUDA")
    return dev


def probe(rec: Recorder, ctx: Ctx):
    import numpy
    import timm
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "timm": timm.__version__, "numpy": numpy.__version__, "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu_name=props.name, capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / GIB, 2), gpu_count=torch.cuda.device_count())
        try:
            import pynvml

            pynvml.nvmlInit()
            info["driver"] = pynvml.nvmlSystemGetDriverVersion()
            pynvml.nvmlShutdown()
        except Exception as e:  # noqa: BLE001
            info["driver"] = f"unknown ({type(e).__name__})"
    rec.set(**info)


# ---------------------------------------------------------------------------------------
# Helpers shared by the steps


def run_paths(folder: Path):
    """vitpipe.training.loop.RunPaths for `folder`, with only the fields this vitpipe's RunPaths has."""
    from vitpipe.training.loop import RunPaths

    values = {"checkpoint": folder / "checkpoint.pt", "weights": folder / "model.pt",
              "metrics": folder / "metrics.json", "plots": folder / "plots"}
    return RunPaths(**{f.name: values[f.name] for f in dataclasses.fields(RunPaths)})


def call_fit(model, data, recipe, folder: Path, spec: dict, size: int, classes: int, desc: str, val=None) -> dict:
    """vitpipe.training.loop.fit as the stages call it, with its checkpoints in a store under `folder`."""
    from vitpipe.training.loop import fit

    folder.mkdir(parents=True, exist_ok=True)
    os.environ["VITPIPE_CHECKPOINT_DIR"] = str(folder / "checkpoint-store")
    return fit(model, data, recipe, run_paths(folder), val=val, run_config={"spec": spec, "image_size": size},
               fresh_key="train.resume", weights_meta={"spec": spec, "num_classes": classes, "image_size": size},
               desc=desc, quiet=True)


def synthetic_split(n: int, size: int, classes: int, seed: int = 0):
    import numpy as np

    from vitpipe.data.prepared_store import Split

    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return Split(x, rng.integers(0, classes, n), [0.5] * 3, [0.25] * 3, hflip=True)


def recipe_for(**kw):
    from vitpipe.params import TrainParams

    base = dict(lr=1e-4, warmup_steps=1, weight_decay=0.05, label_smoothing=0.1, grad_clip=1.0, resume="fresh",
                checkpoint_every=10**6, eval_every=10**6, seed=0)
    return TrainParams(**(base | kw))


def run_precision(dev, requested: str = "bf16") -> str:
    """`requested` where this device runs it natively, else what precision.resolve('auto') picks."""
    from vitpipe.hardware import precision

    try:
        return precision.resolve(requested, dev, "precision")
    except Exception:  # noqa: BLE001 — no native bf16 here
        return precision.resolve("auto", dev, "precision")


def amp_dtype(p: str):
    import torch

    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[p]


def sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def free_memory():
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def read_tsv(path: Path) -> list[dict]:
    lines = path.read_text().splitlines()
    head = lines[0].split("\t")
    return [dict(zip(head, line.split("\t"))) for line in lines[1:] if line.strip()]


def matmul_peak(dev, dtype, n: int, seconds: float) -> float | None:
    from vitpipe.hardware import probe

    try:
        return probe.measure_matmul_flops(dev.type, dtype, n=n, seconds=seconds)
    except TypeError:  # another signature: its defaults
        return probe.measure_matmul_flops(dev.type, dtype)


def profile_of(dev):
    """The compute model's profile of this CUDA device (None on the CPU)."""
    if dev.type != "cuda":
        return None
    from vitpipe.hardware.probe import profile_of as device_profile

    return device_profile(dev)


# ---------------------------------------------------------------------------------------
# 1. The gpu-marked tests


def gpu_test_files() -> list[Path]:
    return [p for p in sorted((ROOT / "tests").glob("test_*.py")) if "pytest.mark.gpu" in p.read_text()]


def step_gpu_tests(rec: Recorder, ctx: Ctx):
    files = gpu_test_files()
    rec.set(files=[str(p.relative_to(ROOT)) for p in files])
    rec.check("gpu-marked test files found", bool(files), f"{len(files)} files")
    events = ctx.work / "tests.jsonl"
    junit = ctx.out / "logs" / "gpu_tests.junit.xml"
    env = {**os.environ, "GPU_PROOF_TESTLOG": str(events),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")])}
    limit = max(10.0, ctx.limit - 15)  # pytest's own limit: inside the step's, to record what it got to
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-p", "gpu_proof", "-p", "no:cacheprovider", "-q",
           "-rfEs", f"--junitxml={junit}", *map(str, files)]
    rec.running("pytest -m gpu")
    t = time.monotonic()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env)
    try:
        rc, timed_out = p.wait(timeout=limit), False
    except subprocess.TimeoutExpired:
        p.kill()
        rc, timed_out = p.wait(), True
    tests = collect_test_events(events, timed_out)
    counts = {k: sum(t["outcome"] == k for t in tests)
              for k in ("passed", "failed", "error", "skipped", "timeout", "incomplete")}
    rec.set(tests=tests, counts=counts, pytest_exit_code=rc, pytest_s=round(time.monotonic() - t, 1),
            junit=str(junit.relative_to(ctx.out)))
    rec.headline(", ".join(f"{v} {k}" for k, v in counts.items() if v or k in ("passed", "failed"))
                 + f" (of {len(tests)} gpu-marked tests in {len(files)} files)")
    rec.check("pytest finished in its limit", not timed_out, f"{limit:.0f} s" + (" (killed)" if timed_out else ""))
    rec.check("gpu-marked tests collected", len(tests) > 0, f"{len(tests)} tests")
    rec.check("no gpu-marked test failed", counts["passed"] + counts["skipped"] == len(tests),
              ", ".join(t["nodeid"] for t in tests if t["outcome"] not in ("passed", "skipped")) or "none")
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
        tests.append({"nodeid": nodeid, "outcome": outcome, "detail": detail,
                      "duration_s": round(sum(x.get("duration", 0.0) for x in p.values()), 2)})
    return tests


# pytest plugin hooks (pytest -p gpu_proof): every test's phases, as they happen, to a JSONL
# file. A run killed at its limit still says which tests passed and which one was running.

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
    _testlog({"event": "report", "nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
              "duration": report.duration, "detail": detail[:500]})


# ---------------------------------------------------------------------------------------
# 2. Throughput: a bare loop vs fit, compile off and on


def bare_loop(spec, size, classes, r, steps, warmup, dev, compile_: bool) -> tuple[float, float]:
    """img/s of the minimal loop on fixed tensors already on the device (same model, batch,
    micro-batches, precision, label smoothing, clip and AdamW as fit), and the warm-up seconds."""
    import torch
    import torch.nn.functional as F

    from vitpipe.models import build_model
    from vitpipe.training.recipe import prepare_model

    torch.manual_seed(0)
    model = build_model(spec, classes, size)
    prepare_model(model, r, "train")  # the same network: fused attention on
    model.to(dev).train()
    net = torch.compile(model) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=r.weight_decay)
    scaler = torch.amp.GradScaler(dev.type) if r.precision == "fp16" else None
    mb, accum = r.micro_batch, r.batch_size // r.micro_batch
    x = torch.randn(mb, 3, size, size, device=dev)
    y = torch.randint(0, classes, (mb,), device=dev)
    dtype = amp_dtype(r.precision)

    def step():
        for _ in range(accum):
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(net(x), y, label_smoothing=r.label_smoothing)
            (scaler.scale(loss / accum) if scaler else loss / accum).backward()
        if scaler:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)

    t = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(dev)
    warm = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(dev)
    return r.batch_size * steps / (time.perf_counter() - t), warm


def pipeline_loop(spec, size, classes, r, steps, warmup, folder: Path) -> tuple[float, float, dict]:
    """img/s of fit itself (uint8 store, augmentation, telemetry, step log; no evaluation,
    no periodic checkpoint), from its own step log after `warmup` steps, and the warm-up seconds."""
    from dataclasses import replace

    import torch

    from vitpipe.models import build_model

    torch.manual_seed(0)
    model = build_model(spec, classes, size)
    data = synthetic_split(max(4 * r.batch_size, 256), size, classes)
    metrics = call_fit(model, data, replace(r, steps=warmup + steps), folder, spec, size, classes, "gpu_proof throughput")
    rows = read_tsv(folder / "plots" / "train.tsv")
    # img_per_s is per sync window (training time only); the harmonic mean over steps is images / seconds
    timed = [float(row["img_per_s"]) for row in rows if int(row["step"]) > warmup]
    warm = [float(row["img_per_s"]) for row in rows if int(row["step"]) <= warmup]
    img_s = len(timed) / sum(1 / v for v in timed) if timed and all(v > 0 for v in timed) else 0.0
    warm_s = sum(r.batch_size / v for v in warm if v > 0)
    return img_s, warm_s, metrics


def step_throughput(rec: Recorder, ctx: Ctx):
    import torch

    from vitpipe.costmodel import compute
    from vitpipe.models import model_config

    dev = need_device(rec, ctx)
    c = ctx.cfg
    spec, size, classes = c["spec"], c["size"], c["classes"]
    prec = run_precision(dev) if dev.type == "cuda" else "fp32"
    batch = c["batch"]
    profile = profile_of(dev)
    cfg = model_config(spec, classes, size)
    if profile is not None:  # the largest power-of-two batch <= c["batch"] the compute model fits here
        while batch > 8 and not compute.plan(cfg, batch, profile, precision=prec)["fits"]:
            batch //= 2
    r = recipe_for(batch_size=batch, micro_batch=batch, precision=prec)
    flops = compute.flops(cfg)["train"]
    dtype = amp_dtype(prec) or torch.float32
    rec.running("matmul peak")
    peak_measured = matmul_peak(dev, dtype, c["matmul_n"], c["matmul_s"])
    peak_profile = profile.peak_flops.get(prec) if profile is not None else None
    rec.set(model=model_label(spec, size), image_size=size,
            precision=prec, batch=batch, warmup=c["warmup"], steps=c["steps"], device=str(dev),
            train_gflops_per_image=flops / 1e9, profile_label=profile.label if profile else None,
            peak_profile_tflops=peak_profile / 1e12 if peak_profile else None,
            peak_measured_tflops=peak_measured / 1e12 if peak_measured else None, runs=[])
    rec.check("measured matmul peak is positive", bool(peak_measured and peak_measured > 0),
              f"{fmt(peak_measured and peak_measured / 1e12, '.2f')} TFLOP/s")

    def mfu(img_s, peak):
        return img_s * flops / peak if img_s and peak else None

    runs = []
    for compile_ in (False, True):
        if compile_ not in c["compile"]:
            runs.append({"compile": compile_, "skipped": "skipped: no CUDA (compile is measured on the GPU only)",
                         "ratio": None, "pipeline_mfu_profile": None})
            continue
        rec.running(f"bare loop, compile {compile_}")
        bare, bare_warm = bare_loop(spec, size, classes, r, c["steps"], c["warmup"], dev, compile_)
        free_memory()
        rec.running(f"fit, compile {compile_}")
        pipe, pipe_warm, metrics = pipeline_loop(spec, size, classes, dataclasses.replace(r, compile=compile_), c["steps"],
                                                 c["warmup"], ctx.work / f"fit-compile-{compile_}")
        free_memory()
        run = {"compile": compile_, "bare_img_s": bare, "pipeline_img_s": pipe, "ratio": pipe / bare if bare else None,
               "bare_mfu_profile": mfu(bare, peak_profile), "bare_mfu_measured": mfu(bare, peak_measured),
               "pipeline_mfu_profile": mfu(pipe, peak_profile), "pipeline_mfu_measured": mfu(pipe, peak_measured),
               "bare_warmup_s": bare_warm, "pipeline_warmup_s": pipe_warm,
               "fit_metrics": {k: metrics.get(k) for k in ("img_per_s", "wall_time_s", "peak_cuda_allocated_mb",
                                                           "mean_gpu_util_pct", "attention")}}
        runs.append(run)
        rec.set(runs=runs)
        ok = all(v and math.isfinite(v) and v > 0 for v in (bare, pipe))
        rec.check(f"both loops ran, compile {'on' if compile_ else 'off'}", ok, f"bare {bare:.1f}, fit {pipe:.1f} img/s")
    done = [r_ for r_ in runs if not r_.get("skipped")]
    rec.headline("; ".join(
        f"compile {'on' if r_['compile'] else 'off'}: fit {r_['pipeline_img_s']:.1f} img/s, MFU "
        f"{fmt(r_['pipeline_mfu_profile'], '.1%')} of profile / {fmt(r_['pipeline_mfu_measured'], '.1%')} of matmul peak, "
        f"fit/bare {r_['ratio']:.3f}" for r_ in done))


# ---------------------------------------------------------------------------------------
# 3. Memory: the compute model's peak against the allocator's


def step_memory(rec: Recorder, ctx: Ctx):
    import torch

    from vitpipe.costmodel import compute
    from vitpipe.models import build_model, model_config
    from vitpipe.training.recipe import prepare_model

    dev = need_device(rec, ctx)
    c = ctx.cfg
    size, classes = c["size"], c["classes"]
    cuda = dev.type == "cuda"
    profile = profile_of(dev)
    measure = ("torch.cuda.max_memory_allocated (one training step: forward, backward, clip, AdamW)" if cuda else
               "saved tensors of forward + loss (CPU stand-in: compute.measure_saved_bytes vs step_saved_total)")
    rec.set(measure=measure, cases=[])
    cases = []
    for spec, batches in c["cases"]:
        name = model_label(spec, size)
        cfg = model_config(spec, classes, size)
        free_memory()
        base = torch.cuda.memory_allocated(dev) if cuda else 0
        torch.manual_seed(0)
        model = build_model(spec, classes, size).to(dev).train()
        for ckpt in (False, True):
            prepare_model(model, recipe_for(activation_checkpointing=ckpt), "train")
            if not ckpt and hasattr(model, "set_grad_checkpointing"):
                model.set_grad_checkpointing(False)
            for prec in ("fp32", "bf16"):
                for batch in batches:
                    case = {"model": name, "precision": prec, "checkpointing": ckpt, "batch": batch}
                    rec.running(case_label(case))
                    if cuda:
                        pred = compute.memory(cfg, batch, prec, "adamw", "sdpa", ckpt)["peak"]
                        if compute.required_bytes(pred, profile) > profile.memory_bytes:
                            case.update(predicted_mib=pred / 2**20, note=f"skipped: predicted not to fit {profile.label}")
                            cases.append(case)
                            continue
                        try:
                            measured = cuda_step_peak(model, batch, size, classes, prec, dev) - base
                        except torch.OutOfMemoryError:
                            measured = None  # freed below, once the exception (and its frames) are gone
                        if measured is None:
                            case.update(predicted_mib=pred / 2**20, note="out of memory")
                            cases.append(case)
                            free_memory()
                            continue
                    else:
                        x = torch.randn(batch, 3, size, size)
                        measured = compute.measure_saved_bytes(model, x, prec)
                        pred = compute.step_saved_total(cfg, batch, prec, "sdpa", ckpt, device_type="cpu")
                    case.update(predicted_mib=pred / 2**20, measured_mib=measured / 2**20,
                                error=(pred - measured) / measured)
                    cases.append(case)
                    rec.set(cases=cases)
                    free_memory()
        del model
    measured_cases = [x for x in cases if x.get("error") is not None]
    worst = max(measured_cases, key=lambda x: abs(x["error"]), default=None)
    outside = [x for x in measured_cases if abs(x["error"]) > TARGETS["memory_error"]]
    rec.set(cases=cases, worst=worst, outside_target=len(outside))
    rec.check("cases measured", len(measured_cases) >= max(1, len(cases) // 2),
              f"{len(measured_cases)} of {len(cases)}")
    rec.check("every measurement is positive", all(x["measured_mib"] > 0 for x in measured_cases), "")
    if worst:
        rec.headline(f"{len(measured_cases)} cases, worst error {worst['error']:+.1%} ({case_label(worst)}); "
                     f"{len(outside)} outside {TARGETS['memory_error']:.0%}" + ("" if cuda else " (CPU stand-in)"))


def cuda_step_peak(model, batch, size, classes, prec, dev) -> int:
    """Peak allocator bytes of a second training step (the first creates the AdamW state)."""
    import torch
    import torch.nn.functional as F

    model.zero_grad(set_to_none=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    x = torch.randn(batch, 3, size, size, device=dev)
    y = torch.randint(0, classes, (batch,), device=dev)
    dtype = amp_dtype(prec)

    def step():
        with torch.autocast("cuda", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    step()
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    del opt, x, y
    return peak


# ---------------------------------------------------------------------------------------
# 4. OOM: the plan message, then the plan


def overflowing_batch(cfg, profile, precision="fp32") -> int:
    """The smallest power of two whose predicted need is 1.25x the device's memory."""
    from vitpipe.costmodel import compute

    n = 8
    while compute.required_bytes(compute.memory(cfg, n, precision)["peak"], profile) < 1.25 * profile.memory_bytes:
        n *= 2
    return n


def planned_micro_batch(message: str) -> int | None:
    m = re.search(r"\.micro_batch: (\d+) \(", message)
    return int(m.group(1)) if m else None


def step_oom(rec: Recorder, ctx: Ctx):
    import torch

    from vitpipe.errors import UserError
    from vitpipe.models import build_model, model_config
    from vitpipe.training.oom import oom_message

    c = ctx.cfg
    spec, size, classes = c["spec"], c["size"], c["classes"]
    cfg = model_config(spec, classes, size)
    dev = device_of(ctx)
    if dev.type != "cuda":
        # What the harness can do without a GPU: the plan message for a profile (nothing runs)
        from vitpipe.costmodel.devices import get_device

        profile = get_device(c.get("profile", "h100-80"))
        n = overflowing_batch(cfg, profile)
        msg = oom_message(recipe_for(batch_size=n, micro_batch=n, steps=2, precision="fp32"), "train",
                          {"spec": spec, "image_size": size}, classes, torch.device("cuda", 0), profile=profile)
        micro = planned_micro_batch(msg)
        rec.set(profile=profile.label, overflowing_micro_batch=n, message=msg, planned_micro_batch=micro, ran=False)
        rec.check("the plan message names a micro-batch that divides the batch",
                  bool(micro) and micro < n and n % micro == 0, f"{n} -> {micro}")
        rec.headline(f"{profile.label} profile: micro_batch {n} would overflow; plan {micro} (not run: no CUDA)")
        rec.skip("no CUDA")
    profile = profile_of(dev)
    n = overflowing_batch(cfg, profile)
    data = synthetic_split(n, size, classes)
    rec.set(profile=profile.label, memory_gib=profile.memory_bytes / GIB, overflowing_micro_batch=n, ran=True)
    rec.running(f"fit at micro_batch {n}")
    torch.manual_seed(0)
    msg = None
    try:
        call_fit(build_model(spec, classes, size), data, recipe_for(batch_size=n, micro_batch=n, steps=2, precision="fp32"),
                 ctx.work / "overflow", spec, size, classes, "gpu_proof oom")
    except UserError as e:
        msg = str(e)
    free_memory()
    micro = planned_micro_batch(msg or "")
    rec.set(message=msg, planned_micro_batch=micro)
    rec.check("the overflowing micro-batch gives the out-of-memory plan message",
              bool(msg and "out of memory" in msg and f"micro_batch={n}" in msg), (msg or "no error was raised")[:300])
    if not rec.check("the message plans a micro-batch that divides the batch", bool(micro) and micro < n and n % micro == 0,
                     f"{n} -> {micro}"):
        return
    rec.running(f"fit at the planned micro_batch {micro}")
    torch.cuda.reset_peak_memory_stats(dev)
    torch.manual_seed(0)
    metrics = call_fit(build_model(spec, classes, size), data,
                       recipe_for(batch_size=n, micro_batch=micro, steps=2, precision="fp32"),
                       ctx.work / "planned", spec, size, classes, "gpu_proof oom plan")
    peak = torch.cuda.max_memory_allocated(dev)
    rec.set(planned_peak_gib=peak / GIB, planned_metrics={k: metrics.get(k) for k in ("train_loss", "peak_cuda_allocated_mb")})
    rec.check("the planned micro-batch trains without running out of memory",
              metrics.get("steps") == 2 and math.isfinite(metrics.get("train_loss", float("nan"))),
              f"2 steps of {n} as {n // micro} x {micro}; peak {peak / GIB:.1f} GiB of {profile.memory_bytes / GIB:.1f}")
    rec.headline(f"micro_batch {n} overflowed {profile.label}: plan message given; planned {n // micro} x {micro} "
                 f"ran, peak {peak / GIB:.1f} of {profile.memory_bytes / GIB:.1f} GiB")


# ---------------------------------------------------------------------------------------
# 5. Telemetry: NVML in the metrics a training run writes


NVML_KEYS = ("mean_gpu_util_pct", "peak_gpu_mem_used_mb", "gpu_mem_total_mb", "mean_gpu_power_w", "peak_gpu_power_w")


def step_telemetry(rec: Recorder, ctx: Ctx):
    import torch

    from vitpipe.costmodel import compute
    from vitpipe.models import build_model, model_config

    dev = need_device(rec, ctx)
    c = ctx.cfg
    spec, size, classes, batch = c["spec"], c["size"], c["classes"], c["batch"]
    prec = run_precision(dev) if dev.type == "cuda" else "fp32"
    steps = c.get("steps")
    if steps is None:  # long enough for a few 1 s samples: the compute model's time at the profile's MFU
        profile = profile_of(dev)
        img_s = compute.throughput(compute.flops(model_config(spec, classes, size))["train"], profile, prec, profile.mfu)
        steps = max(20, min(400, int(c["seconds"] * img_s / batch)))
    try:
        import pynvml  # noqa: F401

        rec.set(pynvml=True)
    except ImportError:
        rec.set(pynvml=False)
    torch.manual_seed(0)
    folder = ctx.work / "fit"
    rec.running(f"fit {steps} steps")
    call_fit(build_model(spec, classes, size), synthetic_split(max(256, 2 * batch), size, classes),
             recipe_for(batch_size=batch, micro_batch=batch, steps=steps, precision=prec),
             folder, spec, size, classes, "gpu_proof telemetry")
    metrics = json.loads((folder / "metrics.json").read_text())  # what the stage wrote, not what fit returned
    rec.set(steps=steps, precision=prec, metrics=metrics)
    rec.check("the metrics JSON has the process RSS", metrics.get("peak_rss_mb", 0) > 0, f"{metrics.get('peak_rss_mb')} MB")
    if dev.type != "cuda":
        rec.check("no GPU keys without a GPU", not any(k in metrics for k in NVML_KEYS), "")
        rec.headline(f"CPU: peak RSS {metrics['peak_rss_mb']:.0f} MB; no NVML keys (as it should be)")
        rec.skip("no CUDA")
    missing = [k for k in NVML_KEYS if k not in metrics]
    rec.check("NVML utilisation, memory and power are in the metrics", not missing,
              "missing: " + ", ".join(missing) if missing else "all there")
    rec.check("the GPU was busy", metrics.get("mean_gpu_util_pct", 0) > 0, f"{metrics.get('mean_gpu_util_pct')} %")
    rec.check("power was read", metrics.get("mean_gpu_power_w", 0) > 0, f"{metrics.get('mean_gpu_power_w')} W")
    total = torch.cuda.get_device_properties(dev).total_memory / 2**20
    rec.check("NVML's total memory is this card's", abs(metrics.get("gpu_mem_total_mb", 0) - total) < 0.1 * total,
              f"NVML {metrics.get('gpu_mem_total_mb')} MB, torch {total:.0f} MB")
    rec.check("NVML's used memory covers the allocator's peak",
              metrics.get("peak_gpu_mem_used_mb", 0) >= metrics.get("peak_cuda_allocated_mb", float("inf")),
              f"NVML {metrics.get('peak_gpu_mem_used_mb')} MB >= allocator {metrics.get('peak_cuda_allocated_mb')} MB")
    rec.headline(f"mean GPU util {metrics.get('mean_gpu_util_pct')} %, peak GPU memory {metrics.get('peak_gpu_mem_used_mb')} "
                 f"of {metrics.get('gpu_mem_total_mb')} MB, mean power {metrics.get('mean_gpu_power_w')} W "
                 f"(peak {metrics.get('peak_gpu_power_w')} W) over {metrics.get('wall_time_s')} s")


# ---------------------------------------------------------------------------------------
# 6. A slice of the full-size preset through the stage scripts: SIGKILL, resume, compare


def stage_env(run_dir: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "VITPIPE_CHECKPOINT_DIR": str(run_dir / "checkpoint-store")}
    env.pop("VITPIPE_CHECKPOINT_KEEP", None)
    env.pop("VITPIPE_CHECKPOINT_MIRROR", None)
    return env


def stage_cmd(stage: str, *args: str) -> list[str]:
    return [sys.executable, str(ROOT / "stages" / f"{stage}.py"), *args]


def run_stage(rec: Recorder, ctx: Ctx, run_dir: Path, stage: str, *args: str, label: str = "") -> subprocess.CompletedProcess:
    rec.running(f"{label or run_dir.name}: stages/{stage}.py {' '.join(args)}")
    p = subprocess.run(stage_cmd(stage, *args), cwd=run_dir, env=stage_env(run_dir), capture_output=True, text=True)
    (ctx.out / "logs" / f"slice.{label or run_dir.name}.{stage}.log").write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        raise RuntimeError(f"stages/{stage}.py in {run_dir.name} exited {p.returncode}: {p.stderr.strip()[-600:]}")
    return p


def slice_params(ctx: Ctx, archive: Path, init: Path, precision: str) -> dict:
    """The reference preset with the data, variant and schedule cut down to a slice."""
    import yaml

    c = ctx.cfg
    doc = yaml.safe_load((ROOT / "presets" / "reference-cifar100.yaml").read_text())
    doc["data"].update(dataset="cifar100", archive=str(archive), md5=None, image_size=c["size"],
                       split={"train": 0.8, "val": 0.2, "test": 0.0}, workers=1)
    doc["variants"] = {c["variant"]: {**c["spec"], "source": "file", "weights": str(init)}}
    doc["finetune"].update(steps=c["steps"], batch_size=c["batch"], micro_batch=c["micro"], warmup_steps=5,
                           checkpoint_every=c["checkpoint_every"], eval_every=c["eval_every"], precision=precision,
                           resume="auto", nproc=1)
    return doc


def weights_diff(a: dict, b: dict) -> dict:
    import torch

    exact = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    num = den = 0.0
    max_abs = 0.0
    for k in a:
        if not torch.is_floating_point(a[k]):
            continue
        d = (a[k].double() - b[k].double())
        num += float(d.pow(2).sum())
        den += float(a[k].double().pow(2).sum())
        max_abs = max(max_abs, float(d.abs().max()) if d.numel() else 0.0)
    return {"bit_exact": exact, "max_abs_diff": max_abs, "rel_l2_diff": math.sqrt(num / den) if den else 0.0}


def final_weights(run_dir: Path) -> dict:
    import torch

    path = next(iter(sorted((run_dir / "models" / "finetune").rglob("model.pt"))))
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def train_rows(run_dir: Path) -> int:
    files = list((run_dir / "plots" / "finetune").rglob("train.tsv"))
    try:
        return max(0, len(files[0].read_text().splitlines()) - 1) if files else 0
    except OSError:
        return 0


def committed_checkpoints(run_dir: Path) -> int:
    return len(list((run_dir / "checkpoint-store").glob("*/step-*.json")))


def step_slice(rec: Recorder, ctx: Ctx):
    import shutil as sh

    import torch
    import yaml

    sys.path.insert(0, str(ROOT / "tests"))
    import miniatures  # the tests' CIFAR archive maker: the official layout and Python 2 pickles

    from vitpipe.models import build_model

    dev = need_device(rec, ctx)
    c = ctx.cfg
    prec = run_precision(dev) if dev.type == "cuda" else "fp32"
    base = ctx.work / "base"
    base.mkdir(parents=True, exist_ok=True)
    archive = ctx.work / "cifar-100-python.tar.gz"
    miniatures.make_cifar100(archive, n_train=c["n_train"], n_test=c["n_test"])
    init = ctx.work / "init.pt"  # no network: the "pretrained" weights are a seeded init, imported as source: file
    torch.manual_seed(0)
    torch.save(build_model(c["spec"], 1000, c["size"]).state_dict(), init)
    doc = slice_params(ctx, archive, init, prec)
    (base / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    v = c["variant"]
    rec.set(variant=v, spec=c["spec"], image_size=c["size"], precision=prec, steps=c["steps"], batch=c["batch"],
            micro=c["micro"], checkpoint_every=c["checkpoint_every"], dataset="cifar100 (miniature, made here)",
            n_train=c["n_train"])
    for stage, args in (("download", ()), ("preprocess", ()), ("pretrain", (v,))):
        run_stage(rec, ctx, base, stage, *args, label="base")

    def new_run(name):
        d = ctx.work / name
        d.mkdir()
        sh.copy(base / "params.yaml", d / "params.yaml")
        (d / "data").symlink_to(base / "data")
        (d / "models" / "pretrained").mkdir(parents=True)
        sh.copy(base / "models" / "pretrained" / f"{v}.pt", d / "models" / "pretrained" / f"{v}.pt")
        return d

    t = time.monotonic()
    ref = new_run("uninterrupted")
    run_stage(rec, ctx, ref, "finetune", v, "0")
    rec.set(uninterrupted_s=round(time.monotonic() - t, 1))
    metrics = json.loads(next((ref / "metrics" / "finetune").rglob("*.json")).read_text())
    rec.set(finetune_metrics=metrics)

    # the killed run: SIGKILL once a checkpoint is committed, mid-run
    run = new_run("killed")
    rec.running("killed: stages/finetune.py, to be SIGKILLed")
    with open(ctx.out / "logs" / "slice.killed.finetune.first.log", "w") as log:
        p = subprocess.Popen(stage_cmd("finetune", v, "0"), cwd=run, env=stage_env(run), stdout=log, stderr=subprocess.STDOUT)
        while p.poll() is None and not (committed_checkpoints(run) > 0 or train_rows(run) > c["checkpoint_every"]):
            time.sleep(0.002)
        rows = train_rows(run)
        killed = p.poll() is None
        if killed:
            p.send_signal(signal.SIGKILL)
        p.wait()
    rec.set(killed_after_rows=rows, killed=killed)
    if not rec.check("the run was SIGKILLed mid-run", killed and rows < c["steps"],
                     f"after {rows} of {c['steps']} steps" if killed else "it finished before it could be killed"):
        return
    resumed = run_stage(rec, ctx, run, "finetune", v, "0", label="resumed")
    m = re.search(r"resuming from .* at step (\d+)/(\d+)", resumed.stderr)
    resumed_at = int(m.group(1)) if m else None
    rec.set(resumed_at=resumed_at)
    rec.check("the re-run resumed from a checkpoint", resumed_at is not None and resumed_at >= c["checkpoint_every"],
              f"at step {resumed_at}" if m else "no 'resuming from' line: " + resumed.stderr.strip()[-300:])
    steps_logged = [int(r["step"]) for r in read_tsv(next((run / "plots" / "finetune").rglob("train.tsv")))]
    rec.check("the resumed step log has every step once", steps_logged == list(range(1, c["steps"] + 1)),
              f"{len(steps_logged)} rows")

    diff = weights_diff(final_weights(ref), final_weights(run))
    comparison = {"resumed_vs_uninterrupted": diff}
    if diff["bit_exact"]:
        comparison["verdict"] = "bit-exact"
        ok, detail = True, "bit-exact"
    elif dev.type != "cuda":
        comparison["verdict"] = f"differs (rel. L2 {diff['rel_l2_diff']:.2e}); a CPU resume must be bit-exact"
        ok, detail = False, comparison["verdict"]
    else:
        # Not bit-exact on the GPU: are the kernels themselves nondeterministic here? A second
        # uninterrupted run says how far two runs of the same params drift apart.
        again = new_run("uninterrupted-again")
        run_stage(rec, ctx, again, "finetune", v, "0")
        noise = weights_diff(final_weights(ref), final_weights(again))
        comparison["uninterrupted_vs_uninterrupted"] = noise
        if noise["bit_exact"]:
            comparison["verdict"] = (f"differs (rel. L2 {diff['rel_l2_diff']:.2e}) although two uninterrupted runs are "
                                     f"bit-identical: the resume is not exact")
            ok = False
        else:
            tol = 4 * noise["rel_l2_diff"]
            ok = diff["rel_l2_diff"] <= tol
            comparison["tolerance_rel_l2"] = tol
            comparison["verdict"] = (f"rel. L2 {diff['rel_l2_diff']:.2e} {'within' if ok else 'beyond'} the tolerance "
                                     f"{tol:.2e}: 4x the drift between two uninterrupted runs ({noise['rel_l2_diff']:.2e}), "
                                     f"because this GPU's kernels are not deterministic (two runs of the same params differ)")
        detail = comparison["verdict"]
    rec.set(comparison=comparison)
    rec.check("final weights match the uninterrupted run", ok, detail)
    if dev.type == "cuda":
        missing = [k for k in NVML_KEYS if k not in metrics]
        rec.check("the finetune stage's metrics hold NVML telemetry", not missing,
                  "missing: " + ", ".join(missing) if missing else "all there")
    rec.headline(f"{v} at {c['size']} px {prec}: SIGKILL after {rows} steps, resumed at step {resumed_at}; "
                 f"final weights {comparison['verdict']}")


# ---------------------------------------------------------------------------------------
# 7. Precision: bf16 where native, auto, fp16 with its grad scaler


def step_precision(rec: Recorder, ctx: Ctx):
    import torch

    from vitpipe import params
    from vitpipe.hardware import precision
    from vitpipe.errors import ParamError
    from vitpipe.models import build_model

    c = ctx.cfg
    spec, size, batch = c["spec"], c["size"], c["batch"]
    dev = device_of(ctx)
    rec.set(params_accept_auto="auto" in getattr(params, "PRECISIONS", ()))

    def fit_runs(prec: str, steps: int, name: str) -> dict:
        torch.manual_seed(0)
        return call_fit(build_model(spec, 10, size), synthetic_split(max(64, 2 * batch), size, 10),
                        recipe_for(batch_size=batch, micro_batch=batch, steps=steps, precision=prec),
                        ctx.work / name, spec, size, 10, f"gpu_proof precision {prec}")

    def fit_accepts_auto() -> tuple[bool, str]:
        try:
            m = fit_runs("auto", 2, "auto")
            return True, f"fit trained 2 steps with precision auto ({m.get('precision', 'resolved inside fit')})"
        except Exception as e:  # noqa: BLE001
            return False, f"{type(e).__name__}: {e}"[:300]

    def fit_refuses_bf16() -> str | None:
        try:
            fit_runs("bf16", 2, f"bf16-{time.monotonic_ns()}")
        except ParamError as e:
            return str(e)
        return None

    if dev.type != "cuda":
        auto = precision.resolve("auto", dev, "train.precision")
        rec.check("auto is fp32 on the CPU", auto == "fp32", auto)
        integrated, how = fit_accepts_auto()
        rec.set(cpu_auto=auto, fit_accepts_auto=integrated, fit_auto_detail=how)
        rec.headline(f"CPU: auto -> {auto}; fit accepts precision auto: {'yes' if integrated else 'not yet'}")
        rec.skip("no CUDA")
    name = torch.cuda.get_device_name(dev)
    cap = torch.cuda.get_device_capability(dev)
    native = cap >= (8, 0)
    auto = precision.resolve("auto", dev, "train.precision")
    rec.set(gpu=name, capability=f"{cap[0]}.{cap[1]}", native_bf16=native, auto=auto)
    rec.check("auto picks bf16 where native, fp16 otherwise", auto == ("bf16" if native else "fp16"), f"{cap} -> {auto}")
    try:
        precision.resolve("bf16", dev, "train.precision")
        refused = None
    except ParamError as e:
        refused = str(e)
    if native:
        rec.check("bf16 is accepted on this card", refused is None, refused or "accepted")
    else:
        rec.check("bf16 is refused on this card, offering fp16 or auto",
                  bool(refused) and name in refused and "use fp16 (with its grad scaler) or auto" in refused,
                  refused or "accepted")
    # what a card without bf16 would say, on this card (a T4, compute capability 7.5)
    real = torch.cuda.get_device_capability, torch.cuda.get_device_name
    torch.cuda.get_device_capability, torch.cuda.get_device_name = (lambda d=None: (7, 5)), (lambda d=None: "Tesla T4")
    try:
        sim_auto = precision.resolve("auto", dev, "train.precision")
        try:
            precision.resolve("bf16", dev, "train.precision")
            sim_msg = None
        except ParamError as e:
            sim_msg = str(e)
    finally:
        torch.cuda.get_device_capability, torch.cuda.get_device_name = real
    rec.set(simulated_t4={"auto": sim_auto, "bf16": sim_msg})
    rec.check("on a T4 (simulated) auto is fp16 and bf16 is refused", sim_auto == "fp16" and bool(sim_msg), sim_msg or "")
    # and the training loop itself: precision bf16 on a card without it must stop, not run emulated
    if not native:
        fit_refusal = fit_refuses_bf16()
    else:
        torch.cuda.get_device_capability, torch.cuda.get_device_name = (lambda d=None: (7, 5)), (lambda d=None: "Tesla T4")
        try:
            fit_refusal = fit_refuses_bf16()
        finally:
            torch.cuda.get_device_capability, torch.cuda.get_device_name = real
    rec.set(fit_bf16_refusal=fit_refusal)
    rec.check(f"fit refuses precision bf16 on a{'' if not native else ' (simulated)'} card without native bf16",
              bool(fit_refusal) and "use fp16" in fit_refusal, fit_refusal or "fit trained in bf16 (emulated)")
    rec.running("fp16 with the grad scaler on this card")
    m = fit_runs("fp16", c["steps"], "fp16")
    rec.set(fp16_metrics={k: m.get(k) for k in ("train_loss", "skipped_steps", "img_per_s")})
    rec.check("fp16 with its grad scaler trains on this card", math.isfinite(m.get("train_loss", float("nan"))),
              f"loss {m.get('train_loss')}, {m.get('skipped_steps')} steps skipped by the scaler")
    integrated, how = fit_accepts_auto()
    rec.set(fit_accepts_auto=integrated, fit_auto_detail=how)
    rec.check("fit resolves precision: auto", integrated, how)
    rec.headline(f"{name} ({cap[0]}.{cap[1]}): auto -> {auto}; bf16 {'accepted' if native else 'refused'}; "
                 f"simulated T4: auto -> {sim_auto}, bf16 refused; fp16 + scaler loss {m.get('train_loss')}; "
                 f"fit resolves auto: {'yes' if integrated else 'no'}")


if __name__ == "__main__":
    sys.exit(main())
