"""benchmarks/gpu_proof.py, the one-command GPU proof, tested on the CPU: the whole harness in
its --cpu-dry-run (tiny models), its time limits, and the summary it writes for a GPU run."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_proof  # noqa: E402

STEP_NAMES = ["gpu_tests", "throughput", "memory", "oom", "telemetry", "slice", "precision"]


def harness(out, *args, timeout=240):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_proof.py"), "--out", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_proof")
    p = harness(out, "--cpu-dry-run")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out, json.loads((out / "gpu_proof.json").read_text()), (out / "gpu_proof.md").read_text()


def test_dry_run_records_every_step_with_status_and_duration(dry_run):
    out, report, md = dry_run
    assert report["schema"] == 1 and report["mode"] == "cpu-dry-run"
    assert report["machine"]["torch"] and report["machine"]["cuda_available"] is False
    assert [s["name"] for s in report["steps"]] == STEP_NAMES
    for s in report["steps"]:
        assert s["status"] in ("passed", "skipped"), (s["name"], s["status"], s["reason"], s["checks"])
        assert s["duration_s"] > 0 and s["limit_s"] > 0 and s["headline"], s["name"]
        assert (out / s["log"]).is_file()
        assert all(c["ok"] for c in s["checks"]), s["checks"]
    by = {s["name"]: s for s in report["steps"]}
    # what needs CUDA says so, and is not a failure
    for name in ("oom", "telemetry", "precision"):
        assert (by[name]["status"], by[name]["reason"]) == ("skipped", "no CUDA")
    assert by["gpu_tests"]["status"] == "skipped" and by["gpu_tests"]["reason"].startswith("no CUDA")
    assert report["summary"]["ok"] and report["summary"]["steps"]["failed"] == 0
    assert report["wall_s"] < report["budget_s"]


def test_dry_run_values_are_real(dry_run):
    _, report, _ = dry_run
    by = {s["name"]: s["results"] for s in report["steps"]}

    tests = by["gpu_tests"]["tests"]  # each gpu-marked test, recorded by the plugin hook
    assert len(tests) >= 10 and all(t["outcome"] == "skipped" and "NVIDIA GPU" in t["detail"] for t in tests)
    assert any(t["nodeid"] == "tests/test_precision.py::test_real_card" for t in tests)

    thr = by["throughput"]
    off, on = thr["runs"]
    assert off["compile"] is False and on["compile"] is True and on["skipped"].startswith("skipped: no CUDA")
    assert off["bare_img_s"] > 0 and off["pipeline_img_s"] > 0 and 0 < off["ratio"] < 5
    assert 0 < off["pipeline_mfu_measured"] < 1.5 and off["pipeline_mfu_profile"] is None  # no profile for a CPU
    assert thr["peak_measured_tflops"] > 0 and thr["train_gflops_per_image"] > 0

    mem = by["memory"]
    assert len(mem["cases"]) == 16 and {c["precision"] for c in mem["cases"]} == {"fp32", "bf16"}
    assert all(c["measured_mib"] > 0 and c["predicted_mib"] > 0 for c in mem["cases"])
    # without activation checkpointing the compute model's saved bytes are exact on the CPU
    assert all(abs(c["error"]) < 0.01 for c in mem["cases"] if not c["checkpointing"])
    assert mem["worst"]["error"] == max((c["error"] for c in mem["cases"]), key=abs)

    oom = by["oom"]  # the plan message, from the H100 profile, is parsed (nothing runs on a CPU)
    assert oom["ran"] is False and "out of memory" in oom["message"]
    assert 0 < oom["planned_micro_batch"] < oom["overflowing_micro_batch"]
    assert oom["overflowing_micro_batch"] % oom["planned_micro_batch"] == 0

    tel = by["telemetry"]
    assert tel["metrics"]["peak_rss_mb"] > 0 and "mean_gpu_util_pct" not in tel["metrics"]

    sl = by["slice"]  # through the stage scripts: killed, resumed, bit-exact on the CPU
    assert sl["killed"] and sl["checkpoint_every"] <= sl["resumed_at"] < sl["steps"]
    assert sl["comparison"]["resumed_vs_uninterrupted"]["bit_exact"] and sl["comparison"]["verdict"] == "bit-exact"
    assert sl["finetune_metrics"]["steps"] == sl["steps"]

    assert by["precision"]["cpu_auto"] == "fp32"


def test_dry_run_markdown_names_every_step_and_claims_no_gpu_figure(dry_run):
    _, report, md = dry_run
    assert md.startswith("# GPU proof: CPU dry run")
    for s in report["steps"]:
        assert f"| {s['number']} | {s['title']} | {s['status']}" in md
    assert md.count("skipped: no CUDA") >= 4
    assert "## Targets" in md and md.count("n/a (CPU dry run of a tiny model") == 3
    assert all(t["met"] is None for t in report["summary"]["targets"])


def test_a_step_past_its_limit_is_killed_and_recorded(tmp_path):
    p = harness(tmp_path, "--cpu-dry-run", "--only", "slice", "--step-limit", "4", timeout=120)
    assert p.returncode == 1  # a timeout is a failure of the run
    report = json.loads((tmp_path / "gpu_proof.json").read_text())
    by = {s["name"]: s for s in report["steps"]}
    assert by["slice"]["status"] == "timeout" and by["slice"]["duration_s"] < 20
    assert by["slice"]["reason"].startswith("killed after its limit of 4 s (")  # and what it was doing
    assert all(by[n]["status"] == "skipped" and "not selected" in by[n]["reason"] for n in STEP_NAMES if n != "slice")
    assert "| 6 | preset slice: SIGKILL, resume, compare | timeout: killed after its limit of 4 s" in \
        (tmp_path / "gpu_proof.md").read_text()


def gpu_report(mfu: float, ratios=(0.985, 0.972), worst=-0.062) -> dict:
    """A report as an H100 run would write it (numbers made up for the test)."""
    runs = [{"compile": c, "bare_img_s": 3000.0, "pipeline_img_s": 3000.0 * r, "ratio": r,
             "bare_mfu_profile": mfu / r, "bare_mfu_measured": mfu / r * 1.2, "pipeline_mfu_profile": mfu - 0.01 * (not c),
             "pipeline_mfu_measured": mfu * 1.2, "bare_warmup_s": 1.0, "pipeline_warmup_s": 1.0}
            for c, r in zip((False, True), ratios)]
    case = {"model": "ViT-B/8 @224px", "precision": "bf16", "checkpointing": True, "batch": 32,
            "predicted_mib": 1000.0, "measured_mib": 1000.0 / (1 + worst), "error": worst}
    steps = [{"number": n, "name": st.name, "title": st.title, "status": "passed", "reason": "", "headline": "h",
              "duration_s": 10.0, "limit_s": 60.0, "checks": [], "results": {}, "log": f"logs/{st.name}.log"}
             for n, st in enumerate(gpu_proof.STEPS, 1)]
    steps[1]["results"] = {"model": "ViT-B/16 @224px", "image_size": 224, "precision": "bf16", "batch": 256, "warmup": 10,
                           "steps": 30, "train_gflops_per_image": 52.8, "peak_profile_tflops": 989.0,
                           "profile_label": "H100 SXM 80GB", "peak_measured_tflops": 700.0, "runs": runs}
    steps[2]["results"] = {"measure": "torch.cuda.max_memory_allocated", "cases": [case], "worst": case}
    report = {"schema": 1, "mode": "gpu", "started": "2026-01-01T00:00:00+00:00", "budget_s": 470, "wall_s": 300.0,
              "targets": gpu_proof.TARGETS, "steps": steps,
              "machine": {"gpu_name": "NVIDIA H100 80GB HBM3", "capability": "9.0", "gpu_memory_gib": 79.1,
                          "torch": "2.x", "timm": "1.x", "python": "3.12"}}
    report["summary"] = gpu_proof.summarise(report)
    return report


def test_gpu_summary_targets_met_and_missed():
    met = {t["name"]: t for t in gpu_report(0.62)["summary"]["targets"]}
    assert all(t["met"] is True for t in met.values()), met
    mfu = next(t for n, t in met.items() if n.startswith("ViT-B/16 bf16 MFU"))
    assert mfu["value"] == pytest.approx(0.62) and "(compile on)" in mfu["measured"]  # the better of the two
    missed = {t["name"].split(" ")[0]: t for t in gpu_report(0.41, ratios=(0.99, 0.95), worst=0.12)["summary"]["targets"]}
    assert [t["met"] for t in missed.values()] == [False, False, False]
    md = gpu_proof.markdown(gpu_report(0.41, ratios=(0.99, 0.95), worst=0.12))
    assert md.startswith("# GPU proof: NVIDIA H100 80GB HBM3")
    assert "| 0.990 (compile off); 0.950 (compile on) | missed |" in md
    assert "+12.0% (ViT-B/8 @224px bf16 ckpt mb 32" in md
    assert "| on | 3000.0 | 2850.0 | 0.950 | " in md  # the throughput table: compile on, bare, pipeline, ratio


def test_gpu_summary_on_another_card_says_the_mfu_target_is_for_an_h100():
    r = gpu_report(0.45)
    r["machine"]["gpu_name"] = "NVIDIA A100-SXM4-40GB"
    mfu = gpu_proof.summarise(r)["targets"][0]
    assert mfu["met"] is False and "for an H100; this is NVIDIA A100" in mfu["note"]


def test_test_outcomes_from_the_plugin_log(tmp_path):
    log = tmp_path / "events.jsonl"
    events = [("a", "setup", "passed"), ("a", "call", "passed"), ("a", "teardown", "passed"),
              ("b", "setup", "passed"), ("b", "call", "failed"), ("b", "teardown", "passed"),
              ("c", "setup", "skipped"), ("c", "teardown", "passed"),
              ("d", "setup", "failed"), ("d", "teardown", "passed"),
              ("e", "setup", "passed")]  # e was running when pytest was stopped
    log.write_text("".join(json.dumps({"event": "report", "nodeid": n, "when": w, "outcome": o, "duration": 0.5,
                                       "detail": f"{n} {w}"}) + "\n" for n, w, o in events))
    got = {t["nodeid"]: t["outcome"] for t in gpu_proof.collect_test_events(log, timed_out=True)}
    assert got == {"a": "passed", "b": "failed", "c": "skipped", "d": "error", "e": "timeout"}
    assert gpu_proof.collect_test_events(log, timed_out=False)[-1]["outcome"] == "incomplete"
