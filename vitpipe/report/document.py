"""The report stage's work: the pipeline's outputs -> reports/report.md (+ figures) and the
same report as one self-contained HTML file.

Each section re-derives a result of the reference report (Dittakavi, "Exploring the Computational Power of ViTs", ECE 629, Purdue, 2022: a course
report that trained vit_jax on a Colab T4) with this run's data, puts the reference's number
next to ours and says whether it holds. Numbers come from analysis, figures from
figures; this module only words and lays them out. Every sentence that states a
finding is built from the data, so it changes when the data does."""

from __future__ import annotations

import json
import platform
import re
import subprocess
import time
from importlib import metadata
from pathlib import Path

import pandas as pd

from vitpipe.atomic import write_json, write_text
from vitpipe.costmodel import reference
from vitpipe.costmodel.devices import get_device
from vitpipe.report import analysis as an
from vitpipe.report import claims as cl
from vitpipe.report import figures as figs
from vitpipe.report import stats
from vitpipe.report import verdicts as vd
from vitpipe.report.html import render_html
from vitpipe.report.inputs import Inputs, load

REPORT_DIR = Path("reports")
HEADLINE = "Headline"  # scripts/pr_comment.py lifts this section into the pull request
SUMMARY = "metrics/summary.json"  # accuracies over seeds: mean, sd, 95% interval (flat keys)
DASH = "–"
WIDE_CELL = 90  # characters: a longer value goes below its table
# What `dvc repro` itself writes into the git tree: a change there is this run, not a change of code
PIPELINE_OUTPUTS = ("dvc.lock", "metrics", "reports", "eval", "plots", "profile", "data", "models")
REFERENCE_NAME = (
    "the reference report (*Exploring the Computational Power of ViTs*, V. A. Dittakavi, ECE 629 "
    "course report, Purdue University, 2022), which trained Google's vit_jax on a Colab T4"
)


# ---------------------------------------------------------------------------------------
# Formatting


def pct(v, digits: int = 1) -> str:
    return DASH if _missing(v) else f"{100 * v:.{digits}f}%"


def num(v, fmt: str = ",.1f", unit: str = "") -> str:
    return DASH if _missing(v) else f"{v:{fmt}}{unit}"


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and v != v)


_NUMERIC_CELL = re.compile(r"^([-+]?[\d,.]+\s*(%|x|M|GiB|MiB|s|h| h| s)?|–)$")


def ci_text(ci: stats.Interval) -> str:
    """'66.0% ± 2.1 [61.2, 70.8]': mean ± sd over seeds [95% t-interval]; one seed: the value."""
    if ci.n == 0:
        return DASH
    if ci.n == 1:
        return f"{100 * ci.mean:.1f}% (1 seed)"
    lo, hi = max(ci.lo, 0.0), min(ci.hi, 1.0)  # an accuracy's interval ends at 0% and 100%
    return f"{100 * ci.mean:.1f}% ± {100 * ci.sd:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def md_table(df: pd.DataFrame) -> str:
    """A pipe table of preformatted cells; columns of numbers are right-aligned."""
    df = df.fillna(DASH).astype(str)
    align = ["right" if df[c].str.match(_NUMERIC_CELL).all() else "left" for c in df.columns]
    return df.to_markdown(index=False, disable_numparse=True, colalign=align)


def image(alt: str, path: str | None) -> list[str]:
    return [f"![{alt}]({path})", ""] if path else []


# ---------------------------------------------------------------------------------------
# Sections


def section_parameters(f: figs.Figures) -> tuple[list[str], list[an.Claim]]:
    t = an.parameter_table()
    claims = an.parameter_claims(t)
    table = pd.DataFrame(
        {
            "network": t.network,
            "exact": t.exact.map("{:,}".format),
            "reference's formulas": t.formula.map("{:,}".format),
            "formulas without the fc head": t.formula_no_head.map("{:,}".format),
            "… vs exact without head": t.formula_no_head_error.map(lambda e: f"{e:+.2%}"),
            "reference: calculated": t.ref_calculated_m.map(lambda m: num(m, "g", "M")),
            "reference: printed total": t.ref_printed_m.map(lambda m: f"{m:g}M"),
            "printed vs exact": t.printed_error.map(lambda e: f"{e:+.1%}"),
            "holds?": t.holds.map({True: "yes", False: "no"}),
        }
    )
    cnn, vit = t[t.model.str.startswith("resnet")], t[t.model.str.startswith("vit")]
    worst = t.loc[t.formula_no_head_error.abs().idxmax()]
    r50 = t.set_index("model").loc["resnet50"]
    ratio = cnn.ref_printed_m * 1e6 / cnn.exact
    lines = [
        "## 1. Parameters (the reference's Table 1)",
        "",
        f"Counted at {an.TABLE1_IMAGE_SIZE} px with a {an.TABLE1_CLASSES}-class head (ImageNet, where the "
        "published counts come from). *Exact* is the number of parameters of the torchvision / timm model, "
        "from its layer shapes (`vitpipe.costmodel.compute`, checked against the built models by the tests). The "
        "reference's formulas are `((f·f·d)+b)·k` per convolution, `L·(k·d·3·d_h + d·d + d·d_mlp + d_mlp·d)` "
        "for the encoder and `((c·p)+1)·c` for a fully connected layer.",
        "",
        md_table(table),
        "",
        f"- The printed ViT totals are within {vit.printed_error.abs().max():.1%} of the exact counts "
        f"({'within' if vit.holds.all() else 'not all within'} the {an.COUNT_TOLERANCE:.0%} tolerance); "
        f"the printed ResNet totals are {ratio.min():.1f}x to {ratio.max():.1f}x the exact counts "
        f"({'all' if (~cnn.holds).all() else 'not all'} outside it).",
        f"- Without the fully connected head, the reference's conv and encoder formulas land within "
        f"{abs(worst.formula_no_head_error):.2%} of the exact counts (largest gap: {worst.network}).",
        f"- Its fc formula squares the class count: for ResNet-50's 2048 → {an.TABLE1_CLASSES} head it gives "
        f"{(r50.formula - r50.formula_no_head) / 1e6:,.1f}M parameters where the layer has "
        f"{(r50.exact - r50.exact_no_head) / 1e6:.2f}M.",
        f"- ResNet-101 has {claims[-1].this_run} parameters (the reference's table: {claims[-1].reference}). The "
        "reference's claim that the deepest ResNet is comparable to ViT-Base is about computation, so the claims "
        "table scores it on forward FLOPs.",
        "",
        *image("Parameters: exact against the reference", figs.parameters(f, t)),
    ]
    return lines, claims


def section_memory(inputs: Inputs, f: figs.Figures, findings: cl.Findings) -> tuple[list[str], list[an.Claim]]:
    s = an.profile_setting(inputs)
    m = an.memory_table(inputs)
    head = ["## 2. Memory (its Fig. 3)", ""]
    if m.empty:
        return head + [
            "The profile stage's outputs (`profile/compute.csv`) are missing, or `profile.models` has "
            f"none of {', '.join(an.MEMORY_MODELS)}: run `dvc repro profile`.",
            "",
        ], []
    claims = [c for c in findings.reference if c.section == "2"]
    setting = (
        f"{s['image_size']} px, batch {s['batch']}, {s['precision']}, {s['optimizer']}, "
        f"{s['attention']} attention, {s['num_classes']} classes, on the `{s['device']}` profile "
        f"({m.capacity_gib.iloc[0]:.1f} GiB)"
    )
    table = pd.DataFrame(
        {
            "network": m.network,
            "predicted peak": m.peak_gib.map(lambda v: f"{v:.1f} GiB"),
            "needed": m.required_gib.map(lambda v: f"{v:.1f} GiB"),
            "x capacity": m.need_ratio.map(lambda v: f"{v:.2f}x"),
            "fits at once?": m.fits.map({True: "yes", False: "no"}),
            "plan that fits": [
                "batch at once" if r.fits else (f"{r.micro_batch} x {r.accum_steps}" if r.micro_batch else "none")
                for r in m.itertuples()
            ],
            "checkpointed": [
                DASH
                if r.checkpointing_fits is None
                else f"{r.checkpointing_required_gib:.1f} GiB, {'fits' if r.checkpointing_fits else 'does not fit'}"
                for r in m.itertuples()
            ],
            "reference": [
                DASH
                if r.ref_fits is None
                else (f"ran, {r.ref_ratio:.0%} of the T4" if r.ref_fits else f"failed, {r.ref_ratio:.2f}x the T4")
                for r in m.itertuples()
            ],
        }
    )
    fit = [r.network for r in m.itertuples() if r.fits]
    lines = head + [
        f"Training from scratch at {setting}, vitpipe's `profile:` (the setting it assumed before the reference's "
        "was stated): the compute model's prediction for PyTorch (weights, gradients, optimizer state, activations "
        "and a backward transient; *needed* adds 5% slack and the CUDA context; *plan*: micro-batch x "
        "accumulation steps; *checkpointed*: with activation checkpointing; `docs/compute.md`). The "
        "verdicts are scored at two settings below.",
        "",
        md_table(table),
        "",
    ]
    planned = [r.network for r in m.itertuples() if not r.fits and r.micro_batch]
    stuck = [r.network for r in m.itertuples() if not r.fits and not r.micro_batch]
    lines.append(
        f"- At batch {s['batch']}: "
        + "; ".join(
            part
            for part in (
                f"{', '.join(fit)} {'fits' if len(fit) == 1 else 'fit'} at once" if fit else "",
                f"{', '.join(planned)} {'fits' if len(planned) == 1 else 'fit'} by gradient accumulation over the "
                "micro-batch in the plan column (the same effective batch in more, smaller steps)"
                if planned
                else "",
                f"{', '.join(stuck)} {'fits' if len(stuck) == 1 else 'fit'} in no micro-batch" if stuck else "",
            )
            if part
        )
        + "."
    )
    for r in m.itertuples():
        if r.ref_fits and not r.fits:
            lines.append(
                f"- The reference ran {r.network} at batch {s['batch']}; this model needs "
                f"{r.required_gib:.1f} GiB for it in PyTorch. Its '{r.ref_ratio:.0%} of GPU memory' is what "
                "JAX/XLA reserved at start-up (it pre-allocates most of the GPU), not what the step needed, "
                "and XLA's compiled step keeps fewer activations than PyTorch's eager autograd."
            )
        if r.ref_fits is False and r.ref_ratio:
            lines.append(
                f"- For {r.network} the reference's estimate of {r.ref_ratio:.2f}x the GPU is "
                f"{'below' if r.need_ratio > r.ref_ratio else 'above'} this model's {r.need_ratio:.2f}x."
            )
    lines.append("")
    lines += two_settings(findings)
    lines += image("Predicted training memory of ViT-B/8, B/16 and B/32", figs.memory(f, m, s))
    lines += _sharded_memory(inputs)
    lines += _measured_memory(inputs)
    return lines, claims


def _count(v) -> str:
    return str(int(v)) if pd.notna(v) and v else DASH


def _sharded_memory(inputs: Inputs) -> list[str]:
    """Past one device: DDP replicates the whole state on every device, FSDP shards it."""
    t = an.sharding_table(inputs)
    if t.empty:
        return []
    s = an.profile_setting(inputs)
    table = pd.DataFrame(
        {
            "network": t.network,
            "parameters": t.params.map(lambda v: f"{v / 1e6:,.0f} M"),
            "devices": t.devices.astype(str),
            "engine": [
                ("DDP" if r.parallel == "ddp" else "FSDP" if r.parallel == "fsdp" else "nothing fits")
                for r in t.itertuples()
            ],
            "micro-batch": t.micro_batch.map(_count),
            "state per device (weights, grads, optimizer)": t.state_gib.map(lambda v: f"{v:.2f} GiB"),
            "fewest devices that shard it": t.fewest_devices.map(_count),
        }
    )
    return [
        f"### Past one {t.device_label.iloc[0]} ({t.capacity_gib.iloc[0]:.1f} GiB): replicate or shard",
        "",
        f"Computed by the compute model (nothing here ran), at batch {s['batch']}, {s['precision']}, "
        f"{s['optimizer']}. Under DDP every device holds the whole state, so more devices never make a model fit "
        "that does not fit one; FSDP (`parallel: fsdp`, docs/distributed.md) holds 1/N of it on each of N "
        "devices, plus the weights of the blocks being all-gathered. `vitpipe plan MODEL --device "
        f"{s['device']} --devices N` gives the overrides.",
        "",
        md_table(table),
        "",
    ]


def _measured_memory(inputs: Inputs) -> list[str]:
    rm = an.run_memory_table(inputs)
    if rm.empty:
        return []
    gpu = rm.cuda_mb.notna().any()
    table = pd.DataFrame(
        {
            "run": rm.run,
            "micro-batch": rm.micro_batch.map(str),
            "predicted peak": rm.predicted_mib.map(lambda v: f"{v:,.1f} MiB"),
            "measured CUDA peak": rm.cuda_mb.map(lambda v: num(v, ",.1f", " MiB")),
            "measured process RSS": rm.rss_mb.map(lambda v: num(v, ",.1f", " MiB")),
        }
    )
    lines = ["**Prediction against measurement, this run's networks.**", "", md_table(table), ""]
    if gpu:
        ratio = (rm.cuda_mb / rm.predicted_mib).dropna()
        lines.append(
            f"- Measured CUDA allocator peaks are {ratio.min():.2f}x to {ratio.max():.2f}x the predicted peaks."
        )
    else:
        over = (rm.rss_mb - rm.predicted_mib).dropna()
        lines.append(
            f"- This run trained on a CPU, where only the process's resident memory is measured: it holds "
            f"the interpreter, torch's libraries and the data as well ({over.min():,.0f} to "
            f"{over.max():,.0f} MiB beyond the predicted training peak), so it bounds the prediction "
            "rather than tests it. On a GPU the training stages record the CUDA allocator's peak, and "
            "`pytest -m gpu` checks the prediction against it for ViT-B/32, B/16 and B/8."
        )
    return lines + [""]


def _share(v) -> str:
    return DASH if _missing(v) else f"{100 * v:.0f}%"


def section_time(inputs: Inputs, f: figs.Figures) -> tuple[list[str], list[an.Claim]]:
    claims = an.time_claims()
    eta = an.eta_table(inputs)
    thr = an.throughput_table(inputs)
    t, s = reference.TIME, reference.REFERENCE_SETTING
    lines = [
        "## 3. Time (its Fig. 4)",
        "",
        f"The reference trained ViT-B/32 from scratch on a T4 at {t['img_per_s']:g} img/s and printed an ETA "
        f"of {t['eta_h_low']:g}–{t['eta_h_high']:g} h for {t['steps']:,} steps at batch {t['batch']}. Every "
        "time below comes from vitpipe's time model (`vitpipe/costmodel/steptime.py`, docs/compute.md): a "
        "training step built from its operations, matmuls at the tensor-core rate with an efficiency that "
        "follows their shapes (*compute-bound*), norms, activations, softmax, casts and the optimizer update "
        "at memory bandwidth (*memory-bound*), and a fixed cost per kernel launched (*launches*). Its few "
        "constants were fitted once, to timm's RTX 3090 training table; a card enters only through its "
        "datasheet (`vitpipe/costmodel/devices.yaml`), so nothing here is fitted to the reference.",
        "",
        f"**The reference's setting**, as vitpipe reads it: {vd.reference_setting().text}, on the T4 "
        f"(evidence: {s['evidence']}).",
        "",
    ]
    lines += _reference_schedule(inputs, eta, claims[0])
    lines += _reference_reconciled()
    lines += _this_machine(thr)
    lines += image(
        "ETA of the reference's schedule per device, and throughput on this machine",
        figs.time(f, same_speed_rows(eta), thr),
    )
    return lines, claims


def _reference_schedule(inputs: Inputs, eta: pd.DataFrame, claim: an.Claim) -> list[str]:
    """The reference's scratch schedule on every device profile, with the split that says why."""
    t, shown = reference.TIME, same_speed_rows(eta)
    table = pd.DataFrame(
        {
            "device": shown.device_label,
            "img/s": shown.img_per_s.map(lambda v: f"{v:,.1f}"),
            "ETA": shown.eta_h.map(lambda v: f"{v:,.1f} h"),
            "= days": shown.eta_h.map(lambda v: f"{v / 24:,.1f}"),
            "compute-bound": shown.compute_s.map(_share),
            "memory-bound": shown.memory_s.map(_share),
            "launches": shown.overhead_s.map(_share),
        }
    )
    lines = [
        f"**The reference's schedule on every device profile** (ViT-B/32, {t['steps']:,} steps x {t['batch']}, "
        "at the reference's setting; the split is the share of a step's time):",
        "",
        md_table(table),
        "",
    ]
    t4 = eta[eta.device == "t4"].iloc[0]
    dev = get_device("t4")
    lines.append(
        f"- On the T4 the time model predicts {t4.img_per_s:.1f} img/s and {t4.eta_h:.1f} h against the "
        f"reference's {t['img_per_s']:g} img/s and {t['eta_h_low']:g}–{t['eta_h_high']:g} h: claim 3 "
        f"**{claim.verdict}** (its test: {claim.test}). It rests on the T4's datasheet ({dev.peak('fp32') / 1e12:g} "
        f"TFLOP/s {reference.REFERENCE_SETTING['precision']}, as vit_jax trains; {dev.bandwidth / 1e9:g} GB/s) "
        "and on the time model calibrated on the RTX 3090 table only; nothing was fitted to the reference."
        + (
            ""
            if claim.verdict == an.HOLDS
            else " A mismatch says the model and the reference's log disagree "
            "at this setting; which of them is off, no T4 measured here can tell."
        )
    )
    gpus = eta[eta.device != "local"]
    fast = gpus.loc[gpus.eta_h.idxmin()]
    lines.append(
        f"- The fastest profile, {fast.device_label}, would take {fast.eta_h:.1f} h "
        f"({t['eta_h_text'] / fast.eta_h:.0f}x less than the reference's {t['eta_h_text']:g} h)."
    )
    mem = gpus.loc[gpus.memory_s.idxmax()]
    lines.append(
        f"- Compute-bound work takes {gpus.compute_s.min():.0%} to {gpus.compute_s.max():.0%} of a step "
        f"over the profiles; {mem.device_label} spends the most in memory-bound work ({mem.memory_s:.0%} "
        f"of its step, at {get_device(mem.device).bandwidth / 1e9:g} GB/s), kernel launches at most "
        f"{gpus.overhead_s.max():.0%}."
    )
    merged = [r.device_label for r in shown.itertuples() if " / " in r.device_label]
    if merged:
        lines.append(f"- Profiles that differ only in memory give the same time and share a row ({'; '.join(merged)}).")
    local = eta[eta.device == "local"]
    if not local.empty:
        lines.append(
            f"- On {local.device_label.iloc[0]}, from its measured matmul peak and bandwidth, it would take "
            f"{local.eta_h.iloc[0] / 24:,.0f} days."
        )
    lines += _assumed_setting_eta(inputs)
    return lines + [""]


def _assumed_setting_eta(inputs: Inputs) -> list[str]:
    """The T4 row of profile/devices.csv: the same schedule at vitpipe's `profile:` setting."""
    d, model = inputs.devices, reference.TIME["model"]
    hit = d[(d.model == model) & (d.device == "t4")] if not d.empty and "eta_h" in d else d
    if hit.empty:
        return []
    r, p = hit.iloc[0], an.profile_setting(inputs)
    return [
        f"- At vitpipe's `profile:` setting ({p['image_size']} px, {p['precision']}, {p['optimizer']}, "
        f"{p['attention']} attention, micro-batch {_count(r.micro_batch)}; "
        f"`profile/devices.csv`) the T4 would take {r.eta_h:,.1f} h at {r.img_per_s:.1f} img/s."
    ]


def _reference_reconciled() -> list[str]:
    """reference_rows(): each of the reference's timed runs, predicted next to reported."""
    rows = reference.reference_rows()
    table = pd.DataFrame(
        {
            "run": [r["run"] for r in rows],
            "setting": [r["setting"] for r in rows],
            "reported": [f"{r['reported']:g} {r['unit']}" for r in rows],
            "predicted": [f"{r['predicted']:,.1f} {r['unit']}" for r in rows],
            "predicted ÷ reported": [f"{r['ratio']:.2f}x" for r in rows],
            "verdict": [f"**{r['verdict']}**" for r in rows],
        }
    )
    n = sum(r["verdict"] == "matches" for r in rows)
    return [
        "**The reference's times, predicted.** Each of its timed runs at its setting, predicted by the time model "
        f"on the T4's datasheet; *matches* means within ±{reference.TOLERANCE:.0%} of the reported figure "
        f"(`vitpipe/costmodel/reference.py`).",
        "",
        md_table(table),
        "",
        f"- {n} of {len(rows)} match. The reference does not give its fine-tuning steps: the fine-tuning rows "
        f"assume vit_jax's short schedule of {reference.FINETUNE_STEPS} steps (its README), so they test the "
        "setting as much as the model.",
        "",
    ]


def _this_machine(thr: pd.DataFrame) -> list[str]:
    """This machine: each training run's measured img/s next to the time model's prediction for it."""
    if thr.empty:
        return [
            "No run measured its training speed on this machine: run the training stages and `dvc repro profile`.",
            "",
        ]
    table = pd.DataFrame(
        {
            "run": thr.run,
            "micro-batch x accumulation, precision, optimizer": thr.setting.replace("", DASH),
            "measured img/s": thr.img_per_s.map(lambda v: f"{v:,.1f}"),
            "predicted img/s": thr.predicted_img_per_s.map(lambda v: num(v, ",.1f")),
            "measured ÷ predicted": thr.measured_over_predicted.map(lambda v: num(v, ".2f", "x")),
            "compute-bound": thr.compute_s.map(_share),
            "memory-bound": thr.memory_s.map(_share),
            "launches": thr.overhead_s.map(_share),
        }
    )
    lines = [
        "**This machine: measured against predicted.** Each training run's img/s (the training stage's wall "
        "time, evaluations and checkpoints included) next to the time model's prediction for that run on this "
        "machine's measured matmul peak and bandwidth (`metrics/profile.json`); the last row is the profile "
        "stage's own calibration run, measured and predicted by that stage.",
        "",
        md_table(table),
        "",
    ]
    ratio = thr[thr.kind == "training"].measured_over_predicted.dropna()
    if not ratio.empty:
        lines.append(
            f"- Measured img/s is {ratio.min():.2f}x to {ratio.max():.2f}x the prediction over this run's "
            f"{len(ratio)} training run{'s' if len(ratio) > 1 else ''}."
        )
    cal = thr[thr.kind == "profile"]
    if not cal.empty:
        lines.append(
            f"- The calibration run: {cal.img_per_s.iloc[0]:,.1f} img/s measured against "
            f"{cal.predicted_img_per_s.iloc[0]:,.1f} predicted ({cal.measured_over_predicted.iloc[0]:.2f}x)."
        )
    return lines + [""]


def same_speed_rows(eta: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct prediction: profiles that differ only in memory (V100 16/32 GB) give
    the same time and are listed together; the A100 40/80 GB differ in bandwidth too, so they do not."""
    keys = ["img_per_s", "eta_h", *an.SPLIT]
    return (
        eta.groupby(keys, sort=False, as_index=False)
        .agg(device_label=("device_label", " / ".join), device=("device", "first"))
        .reset_index(drop=True)
    )


def section_finetune(inputs: Inputs, f: figs.Figures, findings: cl.Findings) -> tuple[list[str], list[an.Claim]]:
    claims, facts = an.finetune_claims(inputs)
    acc = an.accuracy_table(inputs)
    targets = [f"{t:.0%}" for t in an.ACCURACY_TARGETS]
    # two narrow tables rather than one of ten columns: what each run cost and scored, then its
    # validation curve's landmarks
    table = pd.DataFrame(
        {
            "run": acc.label,
            "steps": acc.steps.map(lambda v: num(v, ",.0f")),
            "training time": acc.train_s.map(lambda v: num(v, ",.1f", " s")),
            "pretraining": [
                DASH if not r.pretrain_s else f"{r.pretrain_s:,.0f} s ({r.pretrain_steps:,.0f} steps)"
                for r in acc.itertuples()
            ],
            "test top-1, mean ± sd [95% CI]": acc.test_top1_ci.map(ci_text),
        }
    )
    val = pd.DataFrame(
        {"run": acc.label, "final val top-1": acc.final_val.map(pct), "best val top-1": acc.best_val.map(pct)}
    )
    for t in targets:
        val[f"to {t}: s (steps)"] = [
            "not reached" if _missing(s) else f"{s:,.1f} s ({int(n)})"
            for s, n in zip(acc[f"s_to_{t}"], acc[f"steps_to_{t}"])
        ]
    scratch, twin = inputs.scratch, facts.get("twin")
    spacing = an.eval_spacing(scratch)
    lines = [
        "## 4. Scratch against fine-tuning (its §5.3)",
        "",
        f"The reference fine-tuned a pretrained ViT-B/16 (Algorithm 2) to {reference.FINETUNE['cifar100_top1']:.2%} "
        f"CIFAR-100 top-1 in {reference.FINETUNE['hours']:g} h, where training from scratch (Algorithm 1) showed an "
        f"ETA of ~{reference.TIME['eta_h_text']:g} h. Here, in the default pipeline, both train for "
        f"{scratch.train.get('steps')} steps (one budget; the curves over budgets follow). Training time excludes model building "
        "and the final evaluation; pretraining is listed apart. Final and best validation top-1 are each seed's "
        "own, averaged; times to an accuracy are medians over seeds, read at the evaluations"
        + (f" (every {spacing} steps)" if spacing else "")
        + ".",
        "",
        md_table(table),
        "",
        "Validation top-1, and the time to a validation top-1 of " + ", ".join(targets) + ":",
        "",
        md_table(val),
        "",
    ]
    if twin is None:
        lines.append(
            "- No variant has the scratch network's architecture, so the algorithms are compared across "
            "networks only (give a variant the `model:` sizes to compare like for like)."
        )
    else:
        for c in claims[1:]:  # time to accuracy, read from the default run
            lines.append(f"- {c.claim[0].upper()}{c.claim[1:]}: {c.this_run} (**{c.verdict}**).")
        lines += how_sure(inputs, twin)
    lines.append("")
    lines += section_budgets(inputs, findings, f)
    lines += section_less_data(findings)
    lines += image(
        "Validation accuracy against wall time and against steps",
        figs.scratch_vs_finetune(f, inputs.runs, inputs.num_classes),
    )
    lines += ["The training curves of every run (`dvc plots show` draws the same series from `plots/`):", ""]
    lines += image("Training loss, learning rate, throughput and memory per step", figs.training_curves(f, inputs.runs))
    return lines, claims


def section_less_data(findings: cl.Findings) -> list[str]:
    """The reference's conclusion that a ViT needs more data than a CNN, from the data sweep."""
    d = findings.data
    if d is None:
        return [
            "### Less data",
            "",
            "Not tested: `dvc repro studies/dvc.yaml:data_sweep` trains the ViT and a CNN "
            "from scratch on shares of the training split.",
            "",
        ]
    rows = []
    for pt in d["points"]:
        for kind in ("vit", "cnn"):
            r = pt[kind]
            rows.append(
                {
                    "share": f"{pt['fraction']:g}",
                    "network": "ViT" if kind == "vit" else d["cnn"],
                    "train images": f"{r['runs'][0]['train_images']:,}",
                    "lr": f"{r['chosen_lr']:g}",
                    "test top-1": ci_text(stats.over_seeds([x["test_top1"] for x in r["runs"]])),
                }
            )
    p = findings.holm.get("data_efficiency.interaction", float("nan"))
    claim = next(c for c in findings.reference if c.key == "data.efficiency")
    return [
        "### Less data: the ViT against a CNN, both from scratch",
        "",
        "Each network's learning rate tuned at every share ("
        + ", ".join(s.cite.strip("()") for s in d["studies"])
        + ").",
        "",
        md_table(pd.DataFrame(rows)),
        "",
        "- The CNN's lead over the ViT: "
        + ", ".join(f"{k:g} of the data: {100 * v:+.1f} points" for k, v in d["leads"].items())
        + f"; it shrinks by {100 * d['interaction']:+.1f} points [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}] "
        f"with more data, Holm p {cl.p_text(p)}. The reference's 'a ViT needs more data than a CNN': "
        f"**{claim.verdict}**" + (f" ({claim.why})." if claim.why else "."),
        "- What it rests on: the CNN has far more parameters than the ViT (a CNN matched in size and compute "
        "would make the comparison fair: a ResNet of about 0.3M parameters, not in the model registry); every "
        f"share trains the same {d['small']['steps']} steps, where §4's curves show the ViT still far from "
        "converged, so a share here changes how often each image is seen more than what the ViT can reach; and "
        "two shares of one small data set: a sign, not a scaling law.",
        "",
    ]


def how_sure(inputs: Inputs, twin) -> list[str]:
    """What the intervals mean here: seeds, and the test set's own size."""
    scratch = inputs.scratch
    n_test = scratch.test.get("test_images")
    out = []
    ci_s, ci_t = stats.over_seeds(scratch.top1s), stats.over_seeds(twin.top1s)
    if n_test:
        w = [stats.wilson(round(c.mean * n_test), int(n_test)) for c in (ci_s, ci_t) if c.n]
        halves = ", ".join(f"±{100 * (hi - lo) / 2:.1f}" for lo, hi in w)
        out.append(
            f"- How sure: the test set adds its own noise: {int(n_test)} images give one run's accuracy a 95% "
            f"Wilson interval of {halves} points (scratch, fine-tuned), whatever the seed."
        )
    return out


def section_variants(inputs: Inputs, f: figs.Figures, findings: cl.Findings) -> tuple[list[str], list[an.Claim]]:
    v = an.variant_table(inputs)
    claims = an.variant_claims(v)
    table = pd.DataFrame(
        {
            "run": v.label,
            "network": v.network,
            "params": v.params.map(lambda p: num(p, ",.0f")),
            "train GFLOP/image": v.train_gflops.map(lambda x: num(x, ".3f")),
            "test top-1 (mean of seeds)": v.test_top1.map(pct),
            "training time": v.train_s.map(lambda s: num(s, ",.1f", " s")),
            "train img/s": v.img_per_s.map(lambda x: num(x, ",.1f")),
            "inference img/s": v.infer_img_per_s.map(lambda x: num(x, ",.0f")),
        }
    )
    if v.cuda_memory_mib.notna().any():
        table["peak CUDA memory"] = v.cuda_memory_mib.map(lambda m: num(m, ",.0f", " MiB"))
    lines = [
        "## 5. Variants (its Fig. 6)",
        "",
        "The reference fine-tuned ViT-B and ViT-L at patch 8/16/32 and found that more parameters cost more "
        "time and memory. Here: every network this run trained, the CNN baseline included.",
        "",
        md_table(table),
        "",
    ]
    done = v.dropna(subset=["test_top1"])
    if not done.empty:
        cnn, vit = done[done.kind == "CNN"], done[done.kind == "ViT"]
        if not cnn.empty and not vit.empty:
            c, b = cnn.loc[cnn.test_top1.idxmax()], vit.loc[vit.test_top1.idxmax()]
            lines.append(
                f"- At {inputs.scratch.train.get('steps')} steps, the CNN baseline {c.run} ({c.params / 1e6:.2f}M "
                f"parameters) reaches {pct(c.test_top1)}, the best ViT of the default run ({b.run}, "
                f"{b.params / 1e6:.2f}M) {pct(b.test_top1)} (means over seeds); §4 has the ViT at larger budgets."
            )
        for d in an.baseline_differences(inputs).itertuples():
            p = findings.holm.get(f"{d.run}_minus_{d.baseline}", float("nan"))
            lines.append(
                f"- {d.label} against the CNN baseline {d.baseline}: {an._diff_text(d.comparison)}; Holm "
                f"p {cl.p_text(p)}: 'the ViT beats the CNN here' **{cl.word_by_p(d.diff.mean, p)}** at "
                f"{inputs.scratch.train.get('steps')} steps, conditional on 1 pretraining run (§4's budget "
                "curves show how far that rests on the budget)."
            )
    c = claims[0]
    lines.append(
        f"- More parameters, more time and memory: {c.this_run}; **{c.verdict}**" + (f" ({c.why})." if c.why else ".")
    )
    if c.verdict == an.UNTESTED:
        lines.append(
            "- What the compute model says instead, within one family: §7's table (ViT-Ti to ViT-L at one "
            "patch size) — training FLOPs and activation memory rise with the width and depth."
        )
    lines.append("")
    lines += image("Accuracy, training time and parameters per run", figs.variants(f, v))
    return lines, claims


def section_looks(inputs: Inputs, report_dir: Path) -> list[str]:
    """Attention rollout of the scratch and fine-tuned ViTs and Grad-CAM of the CNN, on the same
    test images (the evaluate stage computed them from the first seed's weights)."""
    seed = inputs.scratch.seeds[0]
    found = {
        r.name: Path(inputs.prepared).parents[2] / "eval" / r.name / f"seed-{seed}" / "attention.npz"
        for r in inputs.runs
    }
    found = {name: p for name, p in found.items() if p.exists()}
    lines = ["## 6. What it looks at", ""]
    if not found:
        return lines + ["No attention maps yet (`eval/<run>/seed-<s>/attention.npz`): run `dvc repro`.", ""]
    import torch

    from vitpipe.evaluation import attention_maps

    maps = {r: attention_maps.read_maps(p) for r, p in found.items()}
    first = next(iter(maps.values()))
    classes = inputs.meta.get("classes") or [str(i) for i in range(int(first["labels"].max()) + 1)]
    rows = {f"{name}\n{m['method']}": torch.from_numpy(m["maps"]) for name, m in maps.items()}
    path = attention_maps.attention_figure(
        Path(report_dir) / figs.SUBDIR / "attention.png",
        first["images"],
        rows,
        [classes[int(i)] for i in first["labels"]],
    )
    spread = {name: _spread(m["maps"]) for name, m in maps.items()}
    by_method: dict[str, list[str]] = {}
    for name, m in maps.items():
        by_method.setdefault(str(m["method"]), []).append(f"{name} {spread[name]:.2f}")
    measures = "; ".join(f"{method}: {', '.join(v)}" for method, v in by_method.items())
    lines += [
        f"One test image per class (seed {seed}'s weights). A ViT's attention rollout (Abnar & Zuidema, 2020: "
        "the heads' attention averaged, the residual added, multiplied through the blocks) shows which "
        "patches the class token draws on; a CNN's Grad-CAM shows which cells of a convolution stage "
        "raise the class score. They are different quantities on different grids, so each is summarised "
        "only against maps of its own kind: the share of the map in its brightest quarter of cells (1.0: all "
        f"in one place, 0.25: spread evenly) — {measures}.",
        "",
    ]
    return lines + image("What each model looks at", f"{figs.SUBDIR}/{Path(path).name}")


def _spread(maps) -> float:
    """Mean share of each map's mass in its top quarter of cells: how concentrated it is."""
    import numpy as np

    flat = np.asarray(maps, dtype=np.float64).reshape(len(maps), -1)
    flat = flat / np.clip(flat.sum(1, keepdims=True), 1e-12, None)
    top = np.sort(flat, axis=1)[:, ::-1][:, : max(1, flat.shape[1] // 4)]
    return float(top.sum(1).mean())


def section_scaling(inputs: Inputs, report_dir: Path) -> list[str]:
    """How ViT cost scales with resolution, patch and size: the compute model, nothing trained."""
    from vitpipe.report import scaling

    tables = scaling.scaling_tables(an.profile_setting(inputs))
    figures = scaling.scaling_figures(Path(report_dir) / figs.SUBDIR, tables, relative_to=Path(report_dir))
    return scaling.scaling_section(tables, figures, heading="## 7. How the cost scales")


def section_data(inputs: Inputs, f: figs.Figures) -> list[str]:
    meta = inputs.meta
    patches = {"scratch": inputs.doc["model"].get("patch")} | {
        r.name: r.spec.get("patch") for r in inputs.runs[1:] if r.spec.get("patch")
    }
    patches = {k: v for k, v in patches.items() if v}
    size = inputs.image_size
    lines = ["## 8. The data", ""]
    if meta:
        sizes = meta.get("sizes", {})
        lines.append(
            f"**{inputs.dataset}**: {meta.get('num_classes')} classes, "
            + ", ".join(f"{n:,} {k}" for k, n in sizes.items())
            + f" images at {size}x{size} px ({meta.get('skipped_total', 0)} skipped as unreadable); "
            + (
                "the dataset's official test split."
                if meta.get("official_test_split")
                else "split "
                + "/".join(f"{k} {v:.0%}" for k, v in (inputs.doc["data"].get("split") or {}).items())
                + f" with seed {inputs.doc['data'].get('seed')}."
            )
        )
        lines.append("")
    tokens = ", ".join(f"patch {p} → {(size // p) ** 2} tokens" for p in sorted(set(patches.values())))
    ref_tokens = ", ".join(f"B/{p} → {(224 // p) ** 2}" for p in (32, 16, 8))
    lines += [
        f"At {size} px: {tokens} (plus the class token). The reference's ViT-B at 224 px: {ref_tokens}. "
        "Attention's cost grows with the square of the token count, which is why B/8 needs the most memory.",
        "",
    ]
    lines += image("Sample images with each variant's patch grid", figs.patch_grid(f, inputs.prepared, patches))
    return lines


def section_run(inputs: Inputs, report_s: float) -> list[str]:
    doc = inputs.doc
    runs = inputs.runs
    per_run = {r.name: sum(t.get("wall_time_s") or 0 for t in r.trains) for r in runs}
    train_total = sum(per_run.values()) + sum(r.pretrain_s for r in runs)
    local = inputs.devices[inputs.devices.device == "local"] if not inputs.devices.empty else inputs.devices
    machine = (
        f"{platform.system()} {platform.machine()}, {_cpu_count()} CPU cores"
        + (f"; {local.device_label.iloc[0]}" if not local.empty else "")
        + f"; trained on {', '.join(sorted({r.train.get('device', '?') for r in runs if r.train}))}"
    )

    def recipe(section: str) -> str:
        p = doc.get(section) or {}
        return ", ".join(
            f"{k} {p[k]}" for k in ("steps", "batch_size", "micro_batch", "optimizer", "lr", "precision") if k in p
        )

    rows = [
        ("dataset", f"{inputs.dataset} at {inputs.image_size} px"),
        ("scratch network (`model:`)", json.dumps(doc.get("model"))),
        ("variants", "; ".join(f"{n}: {json.dumps(s)}" for n, s in (doc.get("variants") or {}).items())),
        ("train (Alg. 1)", recipe("train")),
        ("finetune (Alg. 2)", recipe("finetune")),
        (
            "pretrain",
            recipe("pretrain")
            + f", {json.dumps({k: doc['pretrain'][k] for k in ('classes', 'images_per_class') if k in (doc.get('pretrain') or {})})}",
        ),
        ("profile", json.dumps({k: v for k, v in (doc.get("profile") or {}).items() if k != "models"})),
        ("machine", machine),
        ("versions", _versions()),
        ("git revision", _git_revision()),
        (
            f"training wall time, every seed ({len(inputs.scratch.seeds)}) of every run",
            f"{train_total:,.0f} s ("
            + ", ".join(
                f"{r.name} {per_run[r.name]:,.0f} s"
                + (f" + {r.pretrain_s:,.0f} s pretraining once" if r.pretrain_s else "")
                for r in runs
            )
            + "; model building, evaluation and start-up not counted)",
        ),
        ("report built in", f"{report_s:.1f} s"),
    ]
    # long values (network specs, the profile) go below the table, so its cells stay narrow
    short = [(k, v if len(v) <= WIDE_CELL else "below") for k, v in rows]
    lines = ["## 9. This run", "", md_table(pd.DataFrame(short, columns=["", "value"])), ""]
    lines += [f"- {k}: {v}" for k, v in rows if len(v) > WIDE_CELL] + [""]
    if inputs.missing:
        lines += [f"Missing inputs (their sections say so): {', '.join(f'`{m}`' for m in inputs.missing)}.", ""]
    return lines


def _cpu_count() -> int:
    from vitpipe.hardware.probe import cpu_count

    return cpu_count()


def _versions() -> str:
    names = ("torch", "timm", "dvc", "numpy", "pandas", "matplotlib", "vitpipe")
    out = [f"Python {platform.python_version()}"]
    for n in names:
        try:
            out.append(f"{n} {metadata.version(n)}")
        except metadata.PackageNotFoundError:
            pass
    return ", ".join(out)


def _git_revision() -> str:
    def git(*args) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        rev = git("rev-parse", "--short", "HEAD")
        dirty = git(
            "status", "--porcelain", "--untracked-files=no", "--", ".", *(f":(exclude){p}" for p in PIPELINE_OUTPUTS)
        )
    except (OSError, subprocess.SubprocessError):
        return "(git unavailable)"
    return (rev or "(no commit)") + (" + uncommitted changes to code or params" if dirty else "")


def two_settings(findings: cl.Findings) -> list[str]:
    """The reference's three memory observations scored at vitpipe's assumed setting and at the
    reference's own; a verdict that flips between them is 'depends on the setting'."""
    if not findings.memory:
        return []
    a, b = findings.settings
    rows = []
    for m in findings.memory:
        ref = (
            f"ran, {m['ref_ratio']:.0%} ({m['ref_gb']:g} GB used)"
            if m["ref_fits"]
            else f"failed, {m['ref_ratio']:.2f}x ({m['ref_gb']:g} GB)"
        )
        cells = [
            f"{x['ratio']:.2f}x, {x['required_bytes'] / vd.GIB:.1f} GiB ({x['required_bytes'] / vd.GB:.1f} GB): {w}"
            for x, w in zip(m["at"], m["words"])
        ]
        rows.append(
            {
                "network": m["model"].replace("vit_b", "ViT-B/"),
                "reference": ref,
                "assumed (A)": cells[0],
                "reference's (R)": cells[1],
                "verdict": f"**{m['verdict']}**",
            }
        )
    r = reference.REFERENCE_SETTING
    return [
        "**The verdicts at two settings.** (A) " + f"{a.name}: {a.text}. (R) {b.name}: {b.text}, on the T4 "
        f"({r['evidence']}). Each cell: the memory needed against the T4's capacity, and whether that agrees with "
        "the reference's observation. The reference's GB are 10^9 bytes; vitpipe's GiB are 2^30 (its T4 shows "
        f"{reference.T4_MEMORY_MIB:,} MiB = {reference.T4_MEMORY_MIB * 2**20 / vd.GB:.1f} GB).",
        "",
        md_table(pd.DataFrame(rows)),
        "",
        "- A verdict is *depends on the setting* where the two settings disagree: the reference's text does not "
        "say which it ran, so the claim holds only under one reading of it.",
        "",
    ]


def _claim_rows(claims: list[an.Claim], first: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "#": [str(first + i) for i in range(len(claims))],
            "§": [c.section for c in claims],
            "claim": [c.claim for c in claims],
            "test": [c.test for c in claims],
            "verdict": [f"**{c.verdict}**" for c in claims],
            "evidence": [c.evidence for c in claims],
        }
    )


def _claim_notes(claims: list[an.Claim], first: int) -> list[str]:
    """The long text of each row, below its table (numbered like the rows)."""
    return [
        f"{first + i}. Reference: {c.reference}. Here: {c.this_run}." + (f" ({c.why})" if c.why else "")
        for i, c in enumerate(claims)
    ]


def claims_section(findings: cl.Findings) -> list[str]:
    ref, own = findings.reference, findings.questions
    n = len(ref)
    family = len(findings.holm)
    return [
        cl.count_sentence(ref, "The reference's claims"),
        "",
        md_table(_claim_rows(ref, 1)),
        "",
        *_claim_notes(ref, 1),
        "",
        cl.count_sentence(own, "Questions vitpipe asks beyond the reference (not counted above)"),
        "",
        md_table(_claim_rows(own, n + 1)),
        "",
        *_claim_notes(own, n + 1),
        "",
        f"Every comparison of accuracies above and in §4 is one family of {family} tests, corrected by Holm's "
        "step-down method (each p multiplied by the number of hypotheses not yet rejected): a verdict *holds* or "
        "*does not hold* only where its adjusted p is below 0.05, *inconclusive* otherwise. Accuracy intervals "
        "from the studies are a hierarchical bootstrap (pretraining runs, then seeds within each, then test "
        "images, resampled together) and say on how many pretraining runs they are conditional.",
        "",
    ]


def section_headline(inputs: Inputs, findings: cl.Findings) -> list[str]:
    scratch, twin = inputs.scratch, an.twin(inputs)
    st = inputs.studies
    lines = [f"## {HEADLINE}", ""]
    meta = inputs.meta
    pre = inputs.doc.get("pretrain") or {}
    n_pre = pre.get("classes", 0) * pre.get("images_per_class", 0)
    data = (
        f"scikit-learn's 8x8 handwritten digits upsampled to {inputs.image_size} px (each "
        f"{inputs.image_size // 8} px block is one source pixel), {sum((meta.get('sizes') or {}).values()):,} "
        "images in 10 classes"
        if inputs.dataset == "digits"
        else f"{inputs.dataset} at {inputs.image_size} px"
    )
    lines += [
        f"**What was trained.** A {(scratch.params or 0) / 1e6:.2f}M-parameter ViT on {data}; fine-tuning "
        f"starts from pretraining on {n_pre:,} synthetic fractal images ({pre.get('classes')} classes), not "
        "ImageNet. The reference fine-tuned ViT-B/16 (86M parameters, pretrained on ImageNet-21k) to "
        f"{reference.FINETUNE['cifar100_top1']:.2%} on CIFAR-100: its accuracies and these are on different "
        "data and networks and are never compared as numbers; only the direction of each claim is.",
        "",
    ]
    budget = cl.budget_comparisons(findings)
    if budget:
        lines += [
            "**Fine-tuned against scratch, by budget** (test top-1; learning rates tuned per budget on the "
            "validation split; "
            + "; ".join(f"at {c.key.split('.')[0].split('_')[1]} steps: {cl.comparison_text(c)}" for c in budget)
            + ").",
            "",
        ]
    else:
        c = an.finetune_comparison(inputs)
        if c is not None and twin is not None and twin.top1 is not None and scratch.top1 is not None:
            p = findings.holm.get("finetune_minus_scratch", float("nan"))
            seeds = c.method == an.SEEDS_TEST
            word = cl.word_by_p(c.seeds.mean, p) if seeds else c.verdict.word
            lines += [
                f"**Fine-tuned against scratch** at {scratch.train.get('steps')} steps each: "
                f"{ci_text(stats.over_seeds(twin.top1s))} against {ci_text(stats.over_seeds(scratch.top1s))}; "
                f"{an._diff_text(c)} (**{word}**, by {c.method_text}"
                + (f"; Holm p {cl.p_text(p)}" if seeds else "")
                + "), conditional on 1 pretraining run. The "
                "budget curves are missing: `dvc repro studies/dvc.yaml`.",
                "",
            ]
    eq = next((c for c in findings.comparisons if c.key.startswith("equal_compute")), None)
    if eq is not None:
        lines += [
            f"**At equal total training FLOPs**, pretraining counted ({eq.label}): {cl.comparison_text(eq)}: "
            f"**{eq.verdict}** for fine-tuning.",
            "",
        ]
    if findings.spread:
        sp = findings.spread
        lines += [
            f"**Pretraining is a random factor.** Fine-tuned from {len(sp['means'])} pretraining runs "
            f"(`pretrain.seed` {', '.join(map(str, sp['pretrain_seeds']))}), the mean accuracy moves with "
            f"an sd of {100 * sp['between']:.1f} points between runs against {100 * sp['within']:.1f} between "
            f"fine-tuning seeds of one run {sp['study'].cite}. Verdicts from one pretraining run say so; the "
            "default pipeline's are all conditional on its one run.",
            "",
        ]
    runs = pd.DataFrame(
        {
            "run": [r.label for r in inputs.runs],
            "params": [num(r.params, ",.0f") for r in inputs.runs],
            "steps": [num(r.train.get("steps"), ",.0f") for r in inputs.runs],
            "test top-1 [95% CI]": [ci_text(stats.over_seeds(r.top1s)) for r in inputs.runs],
        }
    )
    lines += [
        f"The default pipeline's runs ({len(scratch.seeds)} seeds each, one pretraining run; mean ± sd over "
        "seeds [t-interval]):",
        "",
        md_table(runs),
        "",
    ]
    if st.all:
        stale = [s.stage for s in st.all if s.stale]
        lines += [
            "Numbers marked with a stage come from the studies pipeline (`dvc repro studies/dvc.yaml`). "
            + (
                f"Stale (their inputs changed since they ran; {st.stale_check}): {', '.join(stale)}."
                if stale
                else f"None is stale ({st.stale_check or 'not checked'})."
            ),
            "",
        ]
    return lines + claims_section(findings)


def section_budgets(inputs: Inputs, findings: cl.Findings, f: figs.Figures) -> list[str]:
    """Both arms over budgets, with their learning rates tuned per budget: the curves."""
    st = inputs.studies
    if not st.budgets:
        return ["### Budgets", "", "No budget curves: `dvc repro studies/dvc.yaml` trains them.", ""]
    rows = []
    for (arm, steps), s in sorted(st.budgets.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        r = s.record
        accs = [x["test_top1"] for x in r["runs"]]
        ci = stats.over_seeds(accs)
        rows.append(
            {
                "arm": arm,
                "steps": str(steps),
                "lr": f"{r['chosen_lr']:g}",
                "val top-1 per lr": ", ".join(f"{x['lr']:g}: {pct(x['val_acc'], 0)}" for x in r["sweep"]),
                "test top-1": ci_text(ci),
                "stage": f"`{s.stage}`" + (" (stale)" if s.stale else ""),
            }
        )
    if st.equal_compute:
        r = st.equal_compute.record
        ci = stats.over_seeds([x["test_top1"] for x in r["runs"]])
        rows.append(
            {
                "arm": "scratch",
                "steps": f"{r['steps']:,}",
                "lr": f"{r['chosen_lr']:g}",
                "val top-1 per lr": f"lr of `{r['lr_from']}`",
                "test top-1": ci_text(ci),
                "stage": f"`{st.equal_compute.stage}`" + (" (stale)" if st.equal_compute.stale else ""),
            }
        )
    lines = [
        "### Budgets: both arms over training steps",
        "",
        "Each arm trained for each budget, its learning rate chosen on the validation split at that budget "
        "(first seed, final validation top-1), then run with the other seeds; fine-tuning from the default "
        "pipeline's one pretraining run. *finetune_adamw* fine-tunes with scratch's recipe (AdamW, weight "
        "decay, label smoothing): the optimiser ablation.",
        "",
        md_table(pd.DataFrame(rows)),
        "",
    ]
    for c in findings.comparisons:
        lines.append(f"- {c.label}: {cl.comparison_text(c)}: **{c.verdict}**.")
    lines.append("")
    lines += image("Test accuracy against training budget", figs.budget_curves(f, st))
    return lines


GLOSSARY = (
    (
        "micro-batch",
        "the images one forward and backward pass holds in memory; gradients of several are "
        "summed (gradient accumulation) to make one optimizer step on the whole batch",
    ),
    (
        "time model",
        "a step's time built from its operations on a device's datasheet (`vitpipe/costmodel/steptime.py`): "
        "*compute-bound* matmuls at the tensor-core rate, *memory-bound* work at memory bandwidth, and a "
        "fixed cost per kernel launch, whose shares of the step are its *split*",
    ),
    (
        "SDPA",
        "PyTorch's fused scaled_dot_product_attention, which never stores the tokens x tokens attention "
        "matrix; *eager* attention stores it",
    ),
    ("DDP / FSDP", "data parallel: every device holds the whole model / fully sharded: each holds 1/N of it"),
    (
        "attention rollout",
        "the attention of every block multiplied through, residual added: which patches the class token draws on",
    ),
    ("McNemar's exact test", "two models scored on the same images: a binomial test of the images only one gets right"),
    ("Wilson interval", "the 95% interval of one accuracy from a finite test set"),
    (
        "hierarchical bootstrap",
        "resampling pretraining runs, seeds within them and test images, so the interval "
        "holds all three sources of noise",
    ),
    ("Holm correction", "the adjustment of p-values for the number of comparisons made"),
    ("stale", "a studies result whose inputs (code, params, data, pretraining) changed since its stage ran"),
)


def section_glossary() -> list[str]:
    return ["## Glossary", "", *[f"- **{k}**: {v}." for k, v in GLOSSARY], ""]


# ---------------------------------------------------------------------------------------
# The report


def build(inputs: Inputs, report_dir: Path, findings: cl.Findings | None = None) -> str:
    started = time.perf_counter()
    f = figs.Figures(report_dir, inputs.runs)
    findings = findings or cl.build(inputs, inputs.studies)
    body = []
    for section in (
        lambda: section_parameters(f),
        lambda: section_memory(inputs, f, findings),
        lambda: section_time(inputs, f),
        lambda: section_finetune(inputs, f, findings),
        lambda: section_variants(inputs, f, findings),
    ):
        lines, _ = section()
        body += lines
    body += section_looks(inputs, report_dir)
    body += section_scaling(inputs, report_dir)
    body += section_data(inputs, f)
    intro = [
        "# vitpipe report: what a Vision Transformer costs, from scratch and fine-tuned",
        "",
        "Numbers come from two DVC pipelines: the default one (`dvc repro`, minutes on a CPU: every run with 3 "
        "seeds and one pretraining run) and the studies (`dvc repro studies/dvc.yaml`, about 20 minutes: "
        "budgets, tuned learning rates, more pretraining runs, less data; then `dvc repro -f -s report` rebuilds "
        "this report from their records). A number from the studies names its stage, and one whose stage is "
        "stale says so. Each section re-derives a result of "
        f"{REFERENCE_NAME}, and says whether it holds here and what that verdict rests on: *measured in this "
        "run*, *measured by the studies pipeline*, *computed by the compute model* (the same on any machine), "
        "or *not tested*. Terms are explained in the glossary at the end.",
        "",
    ]
    tail = section_run(inputs, time.perf_counter() - started) + section_glossary()
    return "\n".join(intro + section_headline(inputs, findings) + body + tail)


def summary_metrics(inputs: Inputs, findings: cl.Findings) -> dict:
    """The default run's keys (analysis.summary_metrics), each verdict's conditioning, and the
    studies' comparisons with their stage, staleness, Holm-adjusted p and verdict."""
    out = an.summary_metrics(inputs)
    out["pretraining_runs"] = 1  # the default pipeline's comparisons: conditional on one run
    for key, p in findings.default_ps.items():
        out[f"{key}.p_t"] = float(f"{p:.3g}")
        out[f"{key}.p_holm"] = float(f"{findings.holm[key]:.3g}")
        out[f"{key}.conditional_on_pretraining_runs"] = 1
    for c in findings.comparisons:
        out.update(
            {
                f"studies.{c.key}.diff": round(c.diff, 5),
                f"studies.{c.key}.ci95_lo": round(c.lo, 5),
                f"studies.{c.key}.ci95_hi": round(c.hi, 5),
                f"studies.{c.key}.p_holm": float(f"{c.p_holm:.3g}"),
                f"studies.{c.key}.verdict": c.verdict,
                f"studies.{c.key}.pretraining_runs": c.pretraining_runs,
                f"studies.{c.key}.stages": ",".join(s.stage for s in c.studies),
                f"studies.{c.key}.stale": c.stale,
            }
        )
    out["holm_family_size"] = len(findings.holm)
    for claim in findings.all:
        out[f"claim.{claim.key}"] = claim.verdict
    return out


def write_report(root: Path | str = ".", report_dir: Path | str = REPORT_DIR) -> tuple[Path, Path]:
    """Build reports/report.md, its figures and reports/report.html from the outputs under `root`."""
    report_dir = Path(root) / report_dir
    inputs = load(root)
    findings = cl.build(inputs, inputs.studies)
    text = build(inputs, report_dir, findings)
    md, html = report_dir / "report.md", report_dir / "report.html"
    write_json(Path(root) / SUMMARY, summary_metrics(inputs, findings))
    write_text(md, text)
    write_text(html, render_html(text, report_dir, title="vitpipe report"))
    return md, html
