"""The report's summary: the targets met or missed, and the markdown a person reads."""

from __future__ import annotations

from gpu_proof.common import TARGETS, case_label, fmt


def status_text(step: dict) -> str:
    return step["status"] + (f": {step['reason']}" if step.get("reason") and step["status"] != "passed" else "")


def summarise(report: dict) -> dict:
    steps = {s["name"]: s for s in report.get("steps", [])}
    counts = {k: sum(s["status"] == k for s in steps.values()) for k in ("passed", "failed", "timeout", "skipped")}
    dry = report["mode"] != "gpu"
    targets = []

    def target(name, goal, value, text, met, note=""):
        if value is None:
            met, note = None, note or "not measured"
        elif dry:
            met, note = None, "CPU dry run of a tiny model: not a GPU figure, the target does not apply"
        targets.append({"name": name, "goal": goal, "value": value, "measured": text, "met": met, "note": note})

    thr = (steps.get("throughput") or {}).get("results") or {}
    runs = [r for r in thr.get("runs", []) if not r.get("skipped")]
    best = max(
        (r for r in runs if r.get("pipeline_mfu_measured") is not None),
        key=lambda r: r["pipeline_mfu_measured"],
        default=None,
    )
    target(
        "ViT-B/16 bf16 MFU of fit (best of compile off/on), against the measured bf16 matmul peak",
        f">= {TARGETS['mfu']:.0%}",
        best and best["pipeline_mfu_measured"],
        (
            f"{best['pipeline_mfu_measured']:.1%} of the measured matmul peak, "
            f"{fmt(best['pipeline_mfu_profile'], '.1%', 'n/a (no device profile)')} of the datasheet peak "
            f"(compile {'on' if best['compile'] else 'off'})"
        )
        if best
        else "",
        best is not None and best["pipeline_mfu_measured"] >= TARGETS["mfu"],
    )
    ratios = [r for r in runs if r.get("ratio") is not None]
    worst_ratio = min(ratios, key=lambda r: r["ratio"], default=None)
    target(
        "fit / bare img/s, medians (worst of compile off/on)",
        f">= {TARGETS['pipeline_over_bare']}",
        worst_ratio and worst_ratio["ratio"],
        "; ".join(
            f"{r['ratio']:.3f} (compile {'on' if r['compile'] else 'off'}; rounds "
            f"{fmt(r['ratio_rounds']['min'], '.3f')}-{fmt(r['ratio_rounds']['max'], '.3f')})"
            for r in ratios
        ),
        worst_ratio is not None and worst_ratio["ratio"] >= TARGETS["pipeline_over_bare"],
    )
    mem = (steps.get("memory") or {}).get("results") or {}
    worst = mem.get("worst")
    target(
        "memory prediction error, worst case",
        f"within {TARGETS['memory_error']:.0%}",
        worst and abs(worst["error"]),
        worst and f"{worst['error']:+.1%} ({case_label(worst)}; {mem.get('measure', '')})" or "",
        worst is not None and abs(worst["error"]) <= TARGETS["memory_error"],
    )
    return {
        "steps": counts,
        "targets": targets,
        "ok": counts["failed"] == 0 and counts["timeout"] == 0 and not report.get("interrupted"),
    }


def describe_machine(m: dict) -> str:
    dev = (
        f"{m['gpu_name']} (compute capability {m['capability']}, {m['gpu_memory_gib']:.1f} GiB)"
        if m.get("gpu_name")
        else f"CPU ({m.get('cpu_count', '?')} cores), no CUDA"
    )
    return (
        f"{dev}; torch {m.get('torch')} (CUDA {m.get('torch_cuda') or 'none'}), timm {m.get('timm')}, "
        f"Python {m.get('python')}, vitpipe {m.get('git') or 'unknown revision'}"
    )


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows
    ]


def spread(s: dict | None, spec=".1f") -> str:
    if not s or s.get("median") is None:
        return "n/a"
    return f"{s['median']:{spec}} ({s['min']:{spec}}-{s['max']:{spec}})"


def markdown(report: dict) -> str:
    dry = report["mode"] != "gpu"
    m = report.get("machine") or {}
    steps = report.get("steps", [])
    s = report.get("summary") or {"steps": {}, "targets": []}
    title = (
        "GPU proof: CPU dry run (tiny models; the harness tested, no GPU figure)"
        if dry
        else f"GPU proof: {m.get('gpu_name') or 'no CUDA device found'}"
    )
    lines = [
        f"# {title}",
        "",
        f"{report['started']} · {describe_machine(m)} · {len(steps)} steps in {report.get('wall_s', 0):.0f} s "
        f"(budget {report['budget_s']:.0f} s) · " + ", ".join(f"{v} {k}" for k, v in s["steps"].items() if v),
        "",
    ]
    if report.get("interrupted"):
        lines += [f"**Interrupted:** {report['interrupted']}", ""]
    if report.get("running"):
        lines += [f"**Running:** {report['running']} (this file is rewritten when it ends)", ""]
    lines += table(
        ["#", "step", "status", "time", "result"],
        [
            [
                st["number"],
                st["title"],
                status_text(st).replace("|", "/"),
                f"{st['duration_s']:.0f} s" + (f" of {st['limit_s']:.0f}" if st["limit_s"] else ""),
                (st.get("headline") or "").replace("|", "/"),
            ]
            for st in steps
        ],
    )
    lines += ["", "## Targets", ""]
    lines += table(
        ["target", "goal", "measured", "verdict"],
        [
            [
                t["name"],
                t["goal"],
                t["measured"] or "n/a",
                ("met" if t["met"] else "missed") if t["met"] is not None else f"n/a ({t['note']})",
            ]
            for t in s["targets"]
        ],
    )
    lines += environment_lines(m)
    by = {st["name"]: st for st in steps}
    lines += throughput_lines(by) + memory_lines(by) + resume_lines(by) + sharded_lines(by) + tests_lines(by)
    failed = [c for st in steps for c in st.get("checks", []) if not c["ok"]]
    if failed:
        lines += ["", "## Failed checks", ""] + [f"- {c['name']}: {c['detail']}" for c in failed]
    lines += ["", "Each step's full output: `logs.tar.gz` (logs/<step>.log). Every number: `gpu_proof.json`."]
    return "\n".join(lines) + "\n"


def environment_lines(m: dict) -> list[str]:
    env = m.get("environment") or {}
    if not env:
        return []
    keys = (
        "sdpa_backend",
        "tf32_matmul",
        "tf32_cudnn",
        "float32_matmul_precision",
        "sm_clock_mhz",
        "max_sm_clock_mhz",
        "mem_clock_mhz",
        "power_w",
        "power_limit_w",
        "temperature_c",
        "cuda_context_mib",
        "planner_reserve_mib",
    )
    return ["", "## Environment", "", "; ".join(f"{k} {env[k]}" for k in keys if k in env)]


def throughput_lines(by: dict) -> list[str]:
    thr = (by.get("throughput") or {}).get("results") or {}
    if not thr.get("runs"):
        return []
    lines = [
        "",
        f"## 2. Throughput: {thr['model']}, {thr['precision']}, batch {thr['batch']} "
        f"({thr['repeats']} alternating bare/fit repeats of {thr['steps']} timed steps after {thr['warmup']}; "
        f"median (min-max))",
        "",
        f"Peak {thr['precision']}: datasheet "
        + (
            f"{thr['peak_profile_tflops']:.0f} TFLOP/s ({thr['profile_label']})"
            if thr.get("peak_profile_tflops")
            else "none (no device profile for a CPU)"
        )
        + f", measured matmul {spread(thr.get('peak_measured_tflops_spread'), '.3g')} TFLOP/s "
        f"(median of timed, synchronised repeats); {thr['train_gflops_per_image']:.2f} GFLOP per training image.",
        "",
    ]
    rows = []
    for r in thr["runs"]:
        if r.get("skipped"):
            rows.append([("on" if r["compile"] else "off"), r["skipped"], "", "", "", "", "", ""])
            continue
        rows.append(
            [
                "on" if r["compile"] else "off",
                spread(r["bare_spread"]),
                spread(r["pipeline_spread"]),
                f"{r['ratio']:.3f} ({fmt(r['ratio_rounds']['min'], '.3f')}-{fmt(r['ratio_rounds']['max'], '.3f')})",
                f"{fmt(r['bare_mfu_measured'], '.1%')} / {fmt(r['bare_mfu_profile'], '.1%')}",
                f"{fmt(r['pipeline_mfu_measured'], '.1%')} / {fmt(r['pipeline_mfu_profile'], '.1%')}",
                f"{spread(r['data_ms'], '.2f')} / {spread(r['data_wait_ms'], '.2f')}",
                f"{fmt(r['bare_warmup_s'])} / {fmt(r['pipeline_warmup_s'])}",
            ]
        )
    return lines + table(
        [
            "compile",
            "bare img/s",
            "fit img/s",
            "fit/bare",
            "MFU bare (measured / datasheet peak)",
            "MFU fit (measured / datasheet peak)",
            "host data ms/step / waited ms/step",
            "warm-up s (bare / fit)",
        ],
        rows,
    )


def memory_lines(by: dict) -> list[str]:
    mem = (by.get("memory") or {}).get("results") or {}
    if not mem.get("cases"):
        return []
    lines = ["", f"## 3. Memory: predicted vs {mem['measure']}", ""]
    if mem.get("baseline"):
        b = mem["baseline"]
        lines += [
            f"Baseline before each fit: {fmt(b.get('allocated_mib'), '.0f')} MiB allocated; cuBLAS workspace "
            f"{fmt(b.get('cublas_workspace_mib'), '.0f')} MiB, kept out of it and reported apart; CUDA context "
            f"{fmt(b.get('cuda_context_mib'), '.0f')} MiB against the planner's {fmt(b.get('planner_reserve_mib'), '.0f')} "
            f"MiB allowance.",
            "",
        ]
    lines += table(
        [
            "model",
            "precision",
            "optimizer",
            "act. ckpt",
            "micro-batch",
            "predicted MiB",
            "measured MiB",
            "reserved MiB",
            "error",
        ],
        [
            [
                c["model"],
                c["precision"],
                c.get("optimizer", "adamw"),
                "on" if c["checkpointing"] else "off",
                c["batch"],
                fmt(c.get("predicted_mib"), ".4g"),
                fmt(c.get("measured_mib"), ".4g"),
                fmt(c.get("reserved_mib"), ".4g"),
                fmt(c.get("error"), "+.1%") if c.get("error") is not None else c.get("note", ""),
            ]
            for c in mem["cases"]
        ],
    )
    if mem.get("split"):
        lines += ["", "Per-image and fixed parts (a line through the two micro-batches of each setting):", ""]
        lines += table(
            [
                "setting",
                "per image predicted / measured MiB",
                "per-image error",
                "fixed predicted / measured MiB",
                "fixed error",
            ],
            [
                [
                    x["setting"],
                    f"{fmt(x['per_image_predicted_mib'], '.3g')} / {fmt(x['per_image_measured_mib'], '.3g')}",
                    fmt(x.get("per_image_error"), "+.1%"),
                    f"{fmt(x['fixed_predicted_mib'], '.4g')} / {fmt(x['fixed_measured_mib'], '.4g')}",
                    fmt(x.get("fixed_error"), "+.1%"),
                ]
                for x in mem["split"]
            ],
        )
    return lines


def resume_lines(by: dict) -> list[str]:
    res = (by.get("resume") or {}).get("results") or {}
    lines = []
    for key, what in (
        ("fp32", "fp32, deterministic algorithms: bit-exact required"),
        ("bf16", "bf16 (second line): within the stated tolerance"),
    ):
        r = res.get(key)
        if r:
            lines.append(
                f"- {what}: killed after step {r.get('killed_at')}, resumed at step {r.get('resumed_at')}; "
                f"{r.get('verdict')}"
            )
    return (["", "## 6. Resume", ""] + lines) if lines else []


def sharded_lines(by: dict) -> list[str]:
    res = (by.get("sharded") or {}).get("results") or {}
    lines = []
    vit = res.get("vit")
    if vit:
        lines.append(
            f"- ViT, fp32 deterministic, FSDP on a group of one: killed after step {vit.get('killed_at')}, "
            f"resumed from {'a DCP folder' if vit.get('checkpoint') == 'DCP folder' else 'no DCP folder'}; "
            f"{vit.get('verdict')}"
        )
    for key, what in (("resnet", "ResNet under FSDP"), ("compile", "ViT compiled per unit, then sharded")):
        if res.get(key):
            lines.append(f"- {what}: {res[key].get('verdict')}")
    return (["", "## 7. Sharded path", ""] + lines) if lines else []


def tests_lines(by: dict) -> list[str]:
    tests = (by.get("gpu_tests") or {}).get("results") or {}
    if not tests.get("tests"):
        return []
    order = {"failed": 0, "error": 1, "timeout": 2, "passed": 3, "skipped": 4}
    return ["", "## 1. gpu-marked tests", ""] + table(
        ["test", "outcome", "s", "detail"],
        [
            [
                f"`{t['nodeid']}`",
                t["outcome"],
                fmt(t.get("duration_s"), ".1f"),
                (t.get("detail") or "").replace("|", "/").replace("\n", " ")[:160],
            ]
            for t in sorted(tests["tests"], key=lambda t: (order.get(t["outcome"], 5), t["nodeid"]))
        ],
    )
