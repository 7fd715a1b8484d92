"""benchmarks/gpu_proof, the one-command GPU proof, tested on the CPU: the whole harness in its
--cpu-dry-run (tiny models), what it leaves in --out and when, its time limits, that killing
it kills every step process, and the summary it writes for a GPU run."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_proof  # noqa: E402

pytestmark = pytest.mark.slow  # each test runs the harness's processes

STEP_NAMES = ["gpu_tests", "throughput", "memory", "oom", "telemetry", "resume", "sharded", "precision"]
OUTPUTS = {"gpu_proof.json", "gpu_proof.md", "console.log", "logs.tar.gz"}


def start(out, *args) -> subprocess.Popen:
    """The harness as a person runs it: `python3 benchmarks/gpu_proof`, no PYTHONPATH, no install."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    return subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_proof"), "--out", str(out), *args],
        cwd=out.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def read_report(out: Path) -> dict | None:
    try:
        return json.loads((out / "gpu_proof.json").read_text())
    except (OSError, ValueError):
        return None


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The dry run, with its json read every 20 ms while it runs: what a run cut short would leave."""
    out = tmp_path_factory.mktemp("dry") / "out"
    p = start(out, "--cpu-dry-run")
    seen = []
    while p.poll() is None:
        r = read_report(out)
        if r and (not seen or (len(r["steps"]), r.get("running")) != seen[-1]):
            seen.append((len(r["steps"]), r.get("running")))
        time.sleep(0.02)
    log = p.stdout.read()
    assert p.returncode == 0, log[-4000:]
    return out, read_report(out), (out / "gpu_proof.md").read_text(), seen


def test_dry_run_leaves_four_files_and_its_json_after_every_step(dry_run):
    out, report, md, seen = dry_run
    assert {f.name for f in out.iterdir()} == OUTPUTS  # at most 8 files come back from a lent machine
    # while step n+1 runs, the json already records the n steps before it, and says which one runs
    running = {n: r for n, r in seen if r}
    assert all(running[n].startswith(f"step {n + 1} ({name})") for n, name in enumerate(STEP_NAMES)), seen
    assert seen[-1] == (len(STEP_NAMES), None)
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {f"logs/{n}.log" for n in STEP_NAMES} | {
        "logs/probe.log",
        "logs/resume.fp32.log",
        "logs/resume.fsdp-fp32.log",
    } <= names
    assert "gpu_proof: CPU dry run" in (out / "console.log").read_text()


def test_dry_run_records_every_step_with_status_and_duration(dry_run):
    out, report, md, _ = dry_run
    assert report["schema"] == 2 and report["mode"] == "cpu-dry-run"
    assert report["machine"]["torch"] and report["machine"]["cuda_available"] is False
    assert [s["name"] for s in report["steps"]] == STEP_NAMES
    for s in report["steps"]:
        assert s["status"] in ("passed", "skipped"), (s["name"], s["status"], s["reason"], s["checks"])
        assert s["duration_s"] > 0 and s["limit_s"] > 0 and s["headline"], s["name"]
        assert all(c["ok"] for c in s["checks"]), s["checks"]
    by = {s["name"]: s for s in report["steps"]}
    for name in ("oom", "telemetry", "precision"):  # what needs CUDA says so, and is not a failure
        assert (by[name]["status"], by[name]["reason"]) == ("skipped", "no CUDA")
    assert by["gpu_tests"]["status"] == "skipped" and by["gpu_tests"]["reason"].startswith("no CUDA")
    assert report["summary"]["ok"] and report["summary"]["steps"]["failed"] == 0
    assert report["wall_s"] < report["budget_s"]


def test_dry_run_values_are_real(dry_run):
    _, report, _, _ = dry_run
    by = {s["name"]: s["results"] for s in report["steps"]}

    tests = by["gpu_tests"]["tests"]  # each gpu-marked test, recorded by the plugin hook
    assert len(tests) >= 10 and all(t["outcome"] == "skipped" and "NVIDIA GPU" in t["detail"] for t in tests)
    assert any(t["nodeid"] == "tests/test_input_pipeline.py::test_cuda_pipeline_is_the_cpu_batch" for t in tests)

    thr = by["throughput"]
    off, on = thr["runs"]
    assert off["compile"] is False and on["compile"] is True and on["skipped"].startswith("skipped: no CUDA")
    assert len(off["bare_rounds"]) == len(off["pipeline_rounds"]) == thr["repeats"] == 3
    assert off["bare_spread"]["min"] <= off["bare_img_s"] <= off["bare_spread"]["max"]
    assert off["ratio"] == pytest.approx(off["pipeline_img_s"] / off["bare_img_s"]) and 0 < off["ratio"] < 5
    assert off["data_ms"]["median"] > 0 and off["data_wait_ms"]["n"] == 3  # host data time per step, from the step log
    peak = thr["peak_measured_tflops_spread"]
    assert peak["n"] == 10 and peak["min"] <= thr["peak_measured_tflops"] <= peak["max"]
    assert 0 < off["pipeline_mfu_measured"] < 1.5 and off["pipeline_mfu_profile"] is None  # no datasheet for a CPU

    mem = by["memory"]
    assert len(mem["cases"]) == 16 and {c["precision"] for c in mem["cases"]} == {"fp32", "bf16"}
    assert all(c["measured_mib"] > 0 and c["predicted_mib"] > 0 for c in mem["cases"])
    # without activation checkpointing the compute model's saved bytes are exact on the CPU
    assert all(abs(c["error"]) < 0.01 for c in mem["cases"] if not c["checkpointing"])
    assert mem["worst"]["error"] == max((c["error"] for c in mem["cases"]), key=abs)
    assert len(mem["split"]) == 8 and all(x["per_image_measured_mib"] > 0 for x in mem["split"])

    oom = by["oom"]  # the plan message, from the H100 profile, is parsed (nothing runs on a CPU)
    assert oom["ran"] is False and "out of memory" in oom["message"]
    assert 0 < oom["planned_micro_batch"] < oom["overflowing_micro_batch"]
    assert oom["overflowing_micro_batch"] % oom["planned_micro_batch"] == 0

    tel = by["telemetry"]
    assert tel["metrics"]["peak_rss_mb"] > 0 and "mean_gpu_util_pct" not in tel["metrics"]

    res = by["resume"]  # SIGKILLed after a committed checkpoint, resumed from it, compared bit for bit
    for line in (res["fp32"], res["bf16"]):
        assert line["killed"] and res["checkpoint_every"] <= line["resumed_at"] < res["steps"]
    assert res["fp32"]["bit_exact"] and res["fp32"]["verdict"] == "bit-exact"
    assert res["bf16"]["within"] and res["bf16"]["rel_l2_diff"] <= res["bf16_tolerance_rel_l2"]

    sh = by["sharded"]  # fsdp forced onto a gloo group of one: DCP checkpoint, SIGKILL, resume
    assert sh["vit"]["killed"] and sh["vit"]["checkpoint"] == "DCP folder" and sh["vit"]["bit_exact"]
    assert res["fp32"]["checkpoint"] == "one file"  # the same line unsharded: not a DCP folder
    assert sh["resnet"]["parallel"] == "fsdp" and sh["resnet"]["sharded_params"] and sh["resnet"]["train_loss"] > 0
    assert sh["compile"]["verdict"].startswith("skipped: measured on the GPU only")

    assert by["precision"]["cpu_auto"] == "fp32"


def test_dry_run_markdown_names_every_step_and_claims_no_gpu_figure(dry_run):
    _, report, md, _ = dry_run
    assert md.startswith("# GPU proof: CPU dry run")
    for s in report["steps"]:
        assert f"| {s['number']} | {s['title']} | {s['status']}" in md
    assert md.count("skipped: no CUDA") >= 4
    assert "## Targets" in md and md.count("n/a (CPU dry run of a tiny model") == 3
    assert all(t["met"] is None for t in report["summary"]["targets"])
    assert "## 6. Resume" in md and "bit-exact required: killed after step" in md


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killing_the_harness_mid_step_kills_every_step_process(tmp_path, sig):
    out = tmp_path / "out"
    p = start(out, "--cpu-dry-run", "--only", "oom,resume")
    deadline, procs = time.monotonic() + 120, set()
    while time.monotonic() < deadline and p.poll() is None:
        r = read_report(out)
        procs = descendants(p.pid)
        # the oom step is recorded and the resume step's process has started its first worker
        if r and len(r["steps"]) >= 4 and "resume" in (r.get("running") or "") and len(procs) >= 2:
            break
        time.sleep(0.02)
    assert p.poll() is None and len(procs) >= 2, "the resume step never got going"
    p.send_signal(sig)
    p.wait(timeout=30)
    gone = time.monotonic() + 10
    while any(alive(q) for q in procs) and time.monotonic() < gone:
        time.sleep(0.05)
    assert not [q for q in procs if alive(q)]  # no step process (nor its workers) left holding a device
    report = read_report(out)
    by = {s["name"]: s for s in report["steps"]}
    assert by["oom"]["status"] == "skipped" and by["oom"]["reason"] == "no CUDA" and by["oom"]["headline"]
    assert "resume" not in by  # never recorded as run
    if sig == signal.SIGTERM:  # handled: the json says so, and the exit code too
        assert p.returncode == 130 and report["interrupted"].startswith("SIGTERM received during step 6 (resume)")
    else:  # no handler runs: the json written before the step says what was running
        assert "step 6 (resume)" in report["running"]


def test_a_step_past_its_limit_is_killed_and_recorded(tmp_path):
    out = tmp_path / "out"
    p = start(out, "--cpu-dry-run", "--only", "resume", "--step-limit", "4")
    p.wait(timeout=120)
    assert p.returncode == 1  # a timeout is a failure of the run
    report = read_report(out)
    by = {s["name"]: s for s in report["steps"]}
    assert by["resume"]["status"] == "timeout" and by["resume"]["duration_s"] < 20
    assert by["resume"]["reason"].startswith("killed after its limit of 4 s (")  # and what it was doing
    assert all(by[n]["status"] == "skipped" and "not selected" in by[n]["reason"] for n in STEP_NAMES if n != "resume")
    assert (
        "| 6 | resume: SIGKILL, resume, compare | timeout: killed after its limit of 4 s"
        in (out / "gpu_proof.md").read_text()
    )


def test_a_step_the_budget_cannot_hold_is_skipped_with_what_it_would_have_taken(tmp_path):
    out = tmp_path / "out"
    p = start(out, "--cpu-dry-run", "--only", "resume,sharded", "--budget", "6")  # the probe spends it
    p.wait(timeout=120)
    by = {s["name"]: s for s in read_report(out)["steps"]}
    for name in ("resume", "sharded"):
        limit = next(s.dry_limit_s for s in gpu_proof.STEPS if s.name == name)
        assert by[name]["status"] == "skipped" and by[name]["would_take_s"] == limit
        assert by[name]["reason"] == f"the budget of 6 s was spent; it would have taken up to {limit} s"
    assert by["memory"]["reason"] == "not selected (--only)" and "would_take_s" not in by["memory"]


def test_the_gpu_limits_fit_eight_minutes():
    from gpu_proof.common import GPU_BUDGET_S, PROBE

    assert PROBE.gpu_limit_s + sum(s.gpu_limit_s for s in gpu_proof.STEPS) == GPU_BUDGET_S <= 8 * 60


def gpu_report(mfu: float, ratios=(0.985, 0.972), worst=-0.062) -> dict:
    """A report as an H100 run would write it (numbers made up for the test)."""

    def spread(v):
        return {"median": v, "min": v * 0.98, "max": v * 1.01, "n": 3}

    runs = [
        {
            "compile": c,
            "bare_img_s": 3000.0,
            "pipeline_img_s": 3000.0 * r,
            "ratio": r,
            "ratio_rounds": spread(r),
            "bare_spread": spread(3000.0),
            "pipeline_spread": spread(3000.0 * r),
            "data_ms": spread(4.0),
            "data_wait_ms": spread(0.1),
            "bare_mfu_profile": mfu / r * 0.8,
            "bare_mfu_measured": mfu / r,
            "pipeline_mfu_profile": mfu * 0.8,
            "pipeline_mfu_measured": mfu - 0.01 * (not c),
            "bare_warmup_s": 1.0,
            "pipeline_warmup_s": 1.0,
        }
        for c, r in zip((False, True), ratios)
    ]
    case = {
        "model": "ViT-B/8 @224px",
        "precision": "bf16",
        "optimizer": "sgd",
        "checkpointing": True,
        "batch": 32,
        "predicted_mib": 1000.0,
        "measured_mib": 1000.0 / (1 + worst),
        "error": worst,
    }
    steps = [
        {
            "number": n,
            "name": st.name,
            "title": st.title,
            "status": "passed",
            "reason": "",
            "headline": "h",
            "duration_s": 10.0,
            "limit_s": 60.0,
            "checks": [],
            "results": {},
            "log": f"logs/{st.name}.log",
        }
        for n, st in enumerate(gpu_proof.STEPS, 1)
    ]
    steps[1]["results"] = {
        "model": "ViT-B/16 @224px",
        "image_size": 224,
        "precision": "bf16",
        "batch": 256,
        "warmup": 10,
        "steps": 30,
        "repeats": 3,
        "train_gflops_per_image": 52.8,
        "peak_profile_tflops": 989.0,
        "profile_label": "H100 SXM 80GB",
        "peak_measured_tflops": 790.0,
        "peak_measured_tflops_spread": spread(790.0),
        "runs": runs,
    }
    steps[2]["results"] = {"measure": "torch.cuda.max_memory_allocated", "cases": [case], "worst": case}
    report = {
        "schema": 2,
        "mode": "gpu",
        "started": "2026-01-01T00:00:00+00:00",
        "budget_s": 480,
        "wall_s": 300.0,
        "targets": gpu_proof.TARGETS,
        "steps": steps,
        "machine": {
            "gpu_name": "NVIDIA H100 80GB HBM3",
            "capability": "9.0",
            "gpu_memory_gib": 79.1,
            "torch": "2.x",
            "timm": "1.x",
            "python": "3.12",
            "environment": {"sdpa_backend": "flash", "tf32_matmul": False, "power_w": 310.0},
        },
    }
    report["summary"] = gpu_proof.summarise(report)
    return report


def test_gpu_summary_targets_met_and_missed():
    met = {t["name"]: t for t in gpu_report(0.62)["summary"]["targets"]}
    assert all(t["met"] is True for t in met.values()), met
    mfu = next(t for n, t in met.items() if n.startswith("ViT-B/16 bf16 MFU"))
    assert mfu["value"] == pytest.approx(0.62) and "(compile on)" in mfu["measured"]  # the better of the two
    assert "62.0% of the measured matmul peak, 49.6% of the datasheet peak" in mfu["measured"]  # both figures
    missed = {
        t["name"].split(" ")[0]: t for t in gpu_report(0.41, ratios=(0.99, 0.95), worst=0.12)["summary"]["targets"]
    }
    assert [t["met"] for t in missed.values()] == [False, False, False]
    md = gpu_proof.markdown(gpu_report(0.41, ratios=(0.99, 0.95), worst=0.12))
    assert md.startswith("# GPU proof: NVIDIA H100 80GB HBM3")
    assert "| 0.990 (compile off; rounds 0.970-1.000); 0.950 (compile on; rounds 0.931-0.959) | missed |" in md
    assert "+12.0% (ViT-B/8 @224px bf16 sgd ckpt mb 32" in md
    assert "| on | 3000.0 (2940.0-3030.0) | 2850.0 (2793.0-2878.5) | 0.950 (0.931-0.959) | " in md
    assert "sdpa_backend flash; tf32_matmul False; power_w 310.0" in md


def test_test_outcomes_from_the_plugin_log(tmp_path):
    log = tmp_path / "events.jsonl"
    events = [
        ("a", "setup", "passed"),
        ("a", "call", "passed"),
        ("a", "teardown", "passed"),
        ("b", "setup", "passed"),
        ("b", "call", "failed"),
        ("b", "teardown", "passed"),
        ("c", "setup", "skipped"),
        ("c", "teardown", "passed"),
        ("d", "setup", "failed"),
        ("d", "teardown", "passed"),
        ("e", "setup", "passed"),
    ]  # e was running when pytest was stopped
    log.write_text(
        "".join(
            json.dumps({"event": "report", "nodeid": n, "when": w, "outcome": o, "duration": 0.5, "detail": f"{n} {w}"})
            + "\n"
            for n, w, o in events
        )
    )
    got = {t["nodeid"]: t["outcome"] for t in gpu_proof.collect_test_events(log, timed_out=True)}
    assert got == {"a": "passed", "b": "failed", "c": "skipped", "d": "error", "e": "timeout"}
    assert gpu_proof.collect_test_events(log, timed_out=False)[-1]["outcome"] == "incomplete"
