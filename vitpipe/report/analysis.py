"""The report's numbers: this run's data set against the reference report's figures, as
pandas frames, and one verdict per claim of the reference (holds / does not hold / not
tested). No text layout and no plotting here: document.py writes, figures.py draws."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from vitpipe.costmodel import compute, reference, sharding
from vitpipe.costmodel.devices import DEVICES, LOCAL, PRECISION_KEYS, Device, get_device
from vitpipe.models import describe, model_config, spec_keys
from vitpipe.report import stats
from vitpipe.report.inputs import Inputs, Run

HOLDS, FAILS, INCONCLUSIVE, UNTESTED = "holds", "does not hold", "inconclusive", "not tested"
VERDICTS = (HOLDS, FAILS, INCONCLUSIVE, UNTESTED)
# What a verdict rests on. Only MEASURED could come out otherwise on another machine or run;
# COMPUTED reads the same anywhere (the compute model or a count of layers). The studies
# pipeline's numbers are claims.STUDY.
MEASURED = "measured in this run"
COMPUTED = "computed by the compute model"
NOT_TESTED = "not tested"
EVIDENCE = (MEASURED, COMPUTED, NOT_TESTED)
# A printed count within this of the exact one "holds": the reference rounds to 0.1M-1M,
# and the ViT paper's totals count a 1000-class head.
COUNT_TOLERANCE = 0.05
# Table 1 is about ImageNet models: counted at 224 px with a 1000-class head
TABLE1_IMAGE_SIZE, TABLE1_CLASSES = 224, 1000
MEMORY_MODELS = ("vit_b8", "vit_b16", "vit_b32")  # the reference's Fig. 3
ACCURACY_TARGETS = (0.5, 0.8, 0.9)  # validation top-1 for time-to-accuracy
GIB = 2**30


@dataclass
class Claim:
    """One statement of the reference, re-derived with this run's data, and what the verdict
    rests on (`evidence`, one of EVIDENCE; `why`: for *not tested*, the reason)."""

    section: str
    claim: str
    reference: str
    this_run: str
    verdict: str
    evidence: str = COMPUTED
    why: str = ""
    test: str = ""  # the threshold or tolerance the verdict applies, printed beside it
    kind: str = "reference"  # "reference": a claim the reference makes; "question": one vitpipe asks
    key: str = ""  # what the row compares; no two rows of the report share one

    def __post_init__(self):
        if self.verdict == UNTESTED:
            self.evidence = NOT_TESTED

    @property
    def evidence_text(self) -> str:
        return f"{self.evidence} ({self.why})" if self.why else self.evidence


def verdict(ok: bool | None) -> str:
    return UNTESTED if ok is None else HOLDS if ok else FAILS


def count_sentence(claims: list[Claim]) -> str:
    """'Of the 11 claims, 4 hold, 3 do not hold, 1 is inconclusive and 3 are not tested; the
    verdicts rest on ...': every verdict kind and every evidence kind counted, so they add up."""

    def n_of(k: int, one: str, many: str) -> str:
        return f"{k} {one if k == 1 else many}"

    v = {w: sum(c.verdict == w for c in claims) for w in VERDICTS}
    e = {k: sum(c.evidence == k for c in claims) for k in EVIDENCE}
    kinds = [
        n_of(v[HOLDS], "holds", "hold"),
        n_of(v[FAILS], "does not hold", "do not hold"),
        n_of(v[INCONCLUSIVE], "is inconclusive", "are inconclusive"),
        n_of(v[UNTESTED], "is not tested", "are not tested"),
    ]
    rest = [
        f"{e[MEASURED]} on what this run measured",
        f"{e[COMPUTED]} on the compute model alone (they read the same on any machine)",
    ]
    return (
        f"Of the {len(claims)} claims, {', '.join(kinds[:-1])} and {kinds[-1]}; of the "
        f"{len(claims) - e[NOT_TESTED]} tested, {', '.join(rest[:-1])} and {rest[-1]}."
    )


# ---------------------------------------------------------------------------------------
# 1. Parameters (the reference's Table 1)


def parameter_table() -> pd.DataFrame:
    """One row per Table-1 model: exact count, the reference's formulas, its printed figures."""
    rows = []
    for r in reference.reference_table(TABLE1_IMAGE_SIZE, TABLE1_CLASSES):
        ref = reference.TABLE1[r["model"]]
        rows.append(
            {
                "model": r["model"],
                "network": describe({"arch": r["model"]}, TABLE1_IMAGE_SIZE),
                "exact": r["exact"],
                "formula": r["seed_formula"],
                "formula_no_head": r["seed_formula_no_head"],
                "exact_no_head": r["exact_no_head"],
                "formula_no_head_error": r["seed_formula_no_head_error"],
                "ref_calculated_m": ref.get("calculated_m"),
                "ref_printed_m": ref["total_m"],
                "printed_error": r["ref_total_error"],
                "holds": abs(r["ref_total_error"]) <= COUNT_TOLERANCE,
            }
        )
    return pd.DataFrame(rows)


def parameter_claims(t: pd.DataFrame) -> list[Claim]:
    vit, cnn = t[t.model.str.startswith("vit")], t[t.model.str.startswith("resnet")]
    out = []
    for group, rows in (("ViT-B/L/H", vit), ("ResNet-18/34/50/101", cnn)):
        worst = rows.loc[rows.printed_error.abs().idxmax()]
        out.append(
            Claim(
                "1",
                f"{group} parameter counts (Table 1)",
                ", ".join(f"{m:g}M" for m in rows.ref_printed_m),
                ", ".join(f"{e / 1e6:.1f}M" for e in rows.exact)
                + f" (worst {worst.printed_error:+.1%}, {worst.network})",
                verdict(bool(rows.holds.all())),
                COMPUTED,
            )
        )
    r101, b16 = (t.set_index("model").loc[m] for m in ("resnet101", "vit_b16"))
    ref_ratio, ratio = r101.ref_printed_m / b16.ref_printed_m, r101.exact / b16.exact
    out.append(
        Claim(
            "1",
            "the deepest ResNet (101) is comparable in size to ViT-Base",
            f"{ref_ratio:.2f}x ViT-B",
            f"{ratio:.2f}x ViT-B",
            verdict(abs(ratio - 1) <= 0.2),
            COMPUTED,
        )
    )
    return out


# ---------------------------------------------------------------------------------------
# 2. Memory at the reference's setting (its Fig. 3)


def profile_setting(inputs: Inputs) -> dict:
    p = inputs.doc.get("profile") or {}
    return {
        "image_size": p.get("image_size"),
        "batch": p.get("batch_size"),
        "device": p.get("device"),
        "precision": p.get("precision", "fp32"),
        "optimizer": p.get("optimizer", "adamw"),
        "attention": p.get("attention", "sdpa"),
        "num_classes": p.get("num_classes"),
        "steps": p.get("schedule_steps"),
    }


def at_reference_setting(inputs: Inputs) -> bool:
    """The reference trained at 224 px, batch 512, on a T4."""
    s = profile_setting(inputs)
    return (s["image_size"], s["batch"], s["device"]) == (224, reference.TIME["batch"], "t4")


def memory_table(inputs: Inputs) -> pd.DataFrame:
    """ViT-B/8, B/16, B/32 on profile.device at profile.batch_size: the prediction, the plan,
    activation checkpointing as the other way to fit, and the reference's reading."""
    c = inputs.compute
    if c.empty:
        return pd.DataFrame()
    s = profile_setting(inputs)
    rows = []
    for model in MEMORY_MODELS:
        hit = c[c.model == model]
        if hit.empty:
            continue
        r = hit.iloc[0]
        ckpt = {"required_bytes": float("nan"), "fits": None}
        if s["device"] not in LOCAL:  # "local" would benchmark this machine: the profile stage's job
            cfg = model_config({"arch": model}, s["num_classes"], s["image_size"])
            ckpt = compute.estimate(
                cfg, s["batch"], s["device"], s["precision"], s["optimizer"], s["attention"], checkpointing=True
            )
        ref = reference.MEMORY.get(model, {})
        rows.append(
            {
                # profile/compute.csv is in GiB, as the report
                "model": model,
                "network": r["name"],
                "peak_gib": r.peak_gib,
                "required_gib": r.required_gib,
                "capacity_gib": r.capacity_gib,
                "need_ratio": r.required_gib / r.capacity_gib,
                "fits": _bool(r.fits),
                "micro_batch": int(r.micro_batch) if r.micro_batch == r.micro_batch and r.micro_batch else None,
                "accum_steps": int(r.accum_steps) if r.accum_steps == r.accum_steps and r.accum_steps else None,
                "checkpointing_required_gib": ckpt["required_bytes"] / GIB,
                "checkpointing_fits": ckpt["fits"],
                "ref_fits": ref.get("fits"),
                "ref_gb": ref.get("used_gb") or ref.get("needed_gb"),
                "ref_ratio": ref.get("fraction_of_gpu"),
            }
        )
    return pd.DataFrame(rows)


def _bool(v) -> bool:
    return v is True or str(v).lower() == "true"


def memory_claims(inputs: Inputs, m: pd.DataFrame) -> list[Claim]:
    out = []
    same = at_reference_setting(inputs)
    for r in m.itertuples():
        if r.ref_fits is None:
            continue
        ref = f"fits ({r.ref_ratio:.0%} of the T4)" if r.ref_fits else f"does not fit (needs {r.ref_ratio:.2f}x the T4)"
        ours = (
            f"{'fits' if r.fits else 'does not fit'} (needs {r.required_gib:.1f} GiB, "
            f"{r.need_ratio:.2f}x of {r.capacity_gib:.1f} GiB)"
        )
        claim = f"{r.network} {'fits' if r.ref_fits else 'does not fit'} a 16 GB T4 at batch 512, from scratch"
        out.append(
            Claim(
                "2",
                claim,
                ref,
                ours,
                verdict(bool(r.fits) == bool(r.ref_fits) if same else None),
                COMPUTED,
                "" if same else "this run's `profile:` is not the reference's setting",
            )
        )
    return out


def run_memory_table(inputs: Inputs) -> pd.DataFrame:
    """This run's networks: predicted training peak at their micro-batch against what the
    training stage measured (CUDA allocator peak on a GPU; process RSS on a CPU)."""
    rows = []
    for run in inputs.runs:
        if run.recipe is None or not inputs.num_classes:
            continue
        cfg = model_config(run.spec, inputs.num_classes, inputs.image_size)
        attention = run.train.get("attention", "sdpa")
        attention = attention if attention in compute.ATTENTION else "sdpa"
        mem = compute.memory(
            cfg,
            run.recipe.micro_batch,
            run.recipe.precision,
            run.recipe.optimizer,
            attention,
            run.recipe.activation_checkpointing,
        )
        rows.append(
            {
                "run": run.name,
                "micro_batch": run.recipe.micro_batch,
                "predicted_mib": mem["peak"] / 2**20,
                "cuda_mb": run.train.get("peak_cuda_allocated_mb"),
                "rss_mb": run.train.get("peak_rss_mb"),
            }
        )
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------
# 3. Time (its Fig. 4)
#
# Every time here comes from the time model (`costmodel.steptime` through `compute.timing`):
# a step built from its operations, timed on a device's datasheet numbers (or this machine's
# measured matmul peak and bandwidth), its constants fitted once to timm's RTX 3090 table.

SPLIT = ("compute_s", "memory_s", "overhead_s")  # where a step's time goes, as shares of it


def train_gflops(inputs: Inputs, run: Run) -> float | None:
    if not inputs.num_classes:
        return None
    cfg = model_config(run.spec, inputs.num_classes, inputs.image_size)
    return compute.flops(cfg)["train"] / 1e9


def local_device(inputs: Inputs) -> Device | None:
    """This machine as the profile stage measured it (metrics/profile.json: the fp32 matmul
    peak and the copy bandwidth), a CPU to the time model; None when the profile did not run."""
    peak, bandwidth = inputs.profile.get("local_peak_gflops"), inputs.profile.get("local_bandwidth_gbs")
    if not peak or not bandwidth:
        return None
    d = inputs.devices
    local = d[d.device == "local"] if not d.empty and "device" in d else d
    label = str(local.device_label.iloc[0]) if not local.empty else "this machine"
    return Device("local", label, 0, {k: peak * 1e9 for k in PRECISION_KEYS}, bandwidth=bandwidth * 1e9)


def run_timing(inputs: Inputs, run: Run, device: Device) -> dict | None:
    """The time model's training img/s and split for `run` as its recipe ran it (batch,
    micro-batch, precision, optimizer, checkpointing) on `device`; None without a recipe."""
    r = run.recipe
    if r is None or not inputs.num_classes:
        return None
    precision = run.train.get("precision") or r.precision
    precision = precision if precision in compute.PRECISIONS else "fp32"  # `auto` on a CPU is fp32
    attention = run.train.get("attention")
    attention = attention if attention in compute.ATTENTION else "sdpa"  # training turns fused attention on
    cfg = model_config(run.spec, inputs.num_classes, inputs.image_size)
    t = compute.timing(
        cfg, r.batch_size, r.micro_batch, device, precision, r.optimizer, attention, r.activation_checkpointing
    )
    return {**t, "setting": f"{r.micro_batch} x {r.accum_steps}, {precision}, {r.optimizer}"}


def throughput_table(inputs: Inputs) -> pd.DataFrame:
    """Each training run's measured img/s (the training stage's wall time) next to the time
    model's prediction for that run on this machine (`local_device`), and last the profile
    stage's own calibration run (measured and predicted by the profile stage). Runs on a GPU
    get no prediction: metrics/profile.json records a CPU's numbers only (no SM count, no
    half-precision peak)."""
    device = local_device(inputs)
    rows = []
    for run in inputs.runs:
        measured = run.train.get("img_per_s")
        if not measured:
            continue
        on_cpu = run.train.get("device", "cpu") == "cpu"
        t = run_timing(inputs, run, device) if device is not None and on_cpu else None
        predicted = t["train_img_per_s"] if t else None
        rows.append(
            {
                "run": run.name,
                "kind": "training",
                "setting": t["setting"] if t else "",
                "img_per_s": measured,
                "predicted_img_per_s": predicted,
                "measured_over_predicted": measured / predicted if predicted else None,
                **{k: t["time_split"][k] if t else None for k in SPLIT},
            }
        )
    p = inputs.profile
    if p.get("local_img_per_s") and p.get("local_predicted_img_per_s"):
        rows.append(
            {
                "run": "calibration",
                "kind": "profile",
                "setting": "the profile stage's small ViT, fp32, adamw",
                "img_per_s": p["local_img_per_s"],
                "predicted_img_per_s": p["local_predicted_img_per_s"],
                "measured_over_predicted": p["local_img_per_s"] / p["local_predicted_img_per_s"],
                **{k: None for k in SPLIT},
            }
        )
    return pd.DataFrame(rows)


def reference_schedule(device: Device) -> dict:
    """The reference's scratch schedule (REFERENCE_SETTING: its model, batch, micro-batch,
    steps, precision, optimizer, attention) on `device`: img/s, ETA in hours and the split."""
    s = reference.REFERENCE_SETTING
    cfg = model_config({"arch": s["scratch"]["model"]}, s["num_classes"], s["image_size"])
    t = compute.timing(
        cfg, s["batch"], s["scratch"]["micro_batch"], device, s["precision"], s["optimizer"], s["attention"]
    )
    img_s = t["train_img_per_s"]
    return {"img_per_s": img_s, "eta_h": s["steps"] * s["batch"] / img_s / 3600, **t["time_split"]}


def eta_table(inputs: Inputs) -> pd.DataFrame:
    """The reference's schedule on every device profile (datasheet numbers only) and on this
    machine (its measured peak and bandwidth, when the profile stage ran)."""
    targets = list(DEVICES.values())
    local = local_device(inputs)
    if local is not None:
        targets.append(local)
    return pd.DataFrame([{"device": d.name, "device_label": d.label, **reference_schedule(d)} for d in targets])


def scratch_reference_row() -> dict:
    """reference_rows()'s row of the scratch ViT-B/32's img/s: the one claim 3 is scored on."""
    return next(r for r in reference.reference_rows() if r["run"].startswith("scratch"))


def time_claims() -> list[Claim]:
    """Claim 3, the T4's ETA of the scratch ViT-B/32, scored on its img/s: the time model's
    prediction at REFERENCE_SETTING from the T4's datasheet (nothing fitted to the reference:
    the model's constants come from timm's RTX 3090 table) against the reported 38.5 img/s,
    within reference.TOLERANCE."""
    t, row = reference.TIME, scratch_reference_row()
    claim = "ViT-B/32 from scratch, 10,000 steps at batch 512 on a T4 takes ~36 h"
    ref = f"{t['img_per_s']:g} img/s, ETA {t['eta_h_low']:g}-{t['eta_h_high']:g} h ({t['eta_h_text']:g} h)"
    eta_h = t["steps"] * t["batch"] / row["predicted"] / 3600
    this = (
        f"{row['predicted']:.1f} img/s predicted ({row['ratio']:.2f}x the reported), ETA {eta_h:.1f} h, at "
        f"{row['setting']}: the T4's datasheet peak and bandwidth through the time model calibrated on the "
        "RTX 3090 training table only"
    )
    return [
        Claim(
            "3",
            claim,
            ref,
            this,
            verdict(row["verdict"] == "matches"),
            COMPUTED,
            test=f"predicted img/s within ±{reference.TOLERANCE:.0%} of its {t['img_per_s']:g}",
        )
    ]


# ---------------------------------------------------------------------------------------
# 4. Scratch against fine-tuning (its section 5.3)


def same_network(a: dict, b: dict) -> bool:
    keys = ("arch", *sorted(spec_keys(a.get("arch"))))  # the network keys its family declares
    return all(a.get(k) == b.get(k) for k in keys)


def twin(inputs: Inputs) -> Run | None:
    """The fine-tuned variant with the scratch network's architecture: like for like."""
    return next((r for r in inputs.runs[1:] if same_network(r.spec, inputs.scratch.spec)), None)


def eval_spacing(run: Run) -> int | None:
    """Optimizer steps between two validation evaluations (a time to accuracy is rounded up to one)."""
    e = run.evals
    return int(e.step.diff().dropna().median()) if len(e) >= 2 else None


def seed_hits(run: Run, target: float, pretraining: bool = False) -> list[tuple[int, float] | None]:
    """Per seed: (step, training seconds) of its first evaluation at or above `target`
    validation top-1, None where it never got there; with `pretraining`, its seconds added."""
    extra = run.pretrain_s if pretraining else 0.0
    return [None if h is None else (h[0], h[1] + extra) for h in (_first_hit(e, target) for e in run.evals_by_seed)]


def time_to_accuracy(run: Run, target: float) -> tuple[int, float] | None:
    """(step, training seconds) to `target` validation top-1: the median over seeds of each
    seed's first evaluation at or above it; None if fewer than half the seeds got there."""
    hits = seed_hits(run, target)
    reached = [h for h in hits if h is not None]
    if not reached or len(reached) * 2 <= len(hits):
        return None
    never = [math.inf] * (len(hits) - len(reached))
    return int(stats.spread([h[0] for h in reached] + never)[0]), stats.spread([h[1] for h in reached] + never)[0]


def _first_hit(e: pd.DataFrame, target: float) -> tuple[int, float] | None:
    if e.empty or "val_acc" not in e:
        return None
    hit = e[e.val_acc >= target]
    if hit.empty:
        return None
    first = hit.iloc[0]
    return int(first.step), float(first.elapsed_s) if "elapsed_s" in e else float("nan")


def _per_seed(run: Run, col: str, how: str) -> list[float]:
    return [float(getattr(e[col], how)()) for e in run.evals_by_seed if not e.empty and col in e]


def accuracy_table(inputs: Inputs) -> pd.DataFrame:
    """Per run: final/best validation accuracy (each seed's own, averaged), test top-1, and the
    median time and steps to each target."""
    rows = []
    for run in inputs.runs:
        finals = [float(e.val_acc.iloc[-1]) for e in run.evals_by_seed if not e.empty and "val_acc" in e]
        bests = _per_seed(run, "val_acc", "max")
        row = {
            "run": run.name,
            "label": run.label,
            "steps": run.train.get("steps"),
            "train_s": run.train_s,
            "pretrain_s": run.pretrain_s,
            "pretrain_steps": run.pretrain.get("steps"),
            "final_val": stats.over_seeds(finals).mean if finals else None,
            "best_val": stats.over_seeds(bests).mean if bests else None,
            "test_top1": run.top1,
            "test_top1_ci": stats.over_seeds(run.top1s),
        }
        for target in ACCURACY_TARGETS:
            hit = time_to_accuracy(run, target)
            row[f"steps_to_{target:.0%}"] = hit[0] if hit else None
            row[f"s_to_{target:.0%}"] = hit[1] if hit else None
        rows.append(row)
    return pd.DataFrame(rows)


SEEDS_TEST, IMAGES_TEST = "seeds", "images"


@dataclass
class Comparison:
    """Run a against run b on test top-1. With two or more seeds the verdict comes from the
    t-interval of the seed-paired difference: it holds the training noise between seeds, which
    a test on one seed's images leaves out. With one seed there is no spread to judge by, so
    it comes from McNemar's exact test on that seed's test images (`images`), conditional on
    that one training run of each. `images` is reported in both cases where predictions exist."""

    a: Run
    b: Run
    seeds: stats.Interval
    images: stats.PairedImages | None
    images_seed: int | None
    method: str  # SEEDS_TEST | IMAGES_TEST
    verdict: stats.Verdict

    @property
    def method_short(self) -> str:
        return "seed-paired t-interval" if self.method == SEEDS_TEST else f"{stats.MCNEMAR}, seed {self.images_seed}"

    @property
    def method_text(self) -> str:
        if self.method == SEEDS_TEST:
            return (
                f"the 95% t-interval of the seed-paired difference over {self.seeds.n} seeds, which holds the "
                "seed-to-seed training noise that a test on one seed's test images would leave out"
            )
        return (
            f"{stats.MCNEMAR} on seed {self.images_seed}'s {self.images.n} test images: one seed gives no "
            "spread over seeds, so the test holds the test set's noise and is conditional on that one training "
            "run of each"
        )


def compare(a: Run, b: Run) -> Comparison:
    pairs = [(x, y) for x, y in zip(a.top1s, b.top1s) if x is not None and y is not None]
    diff = stats.paired([x for x, _ in pairs], [y for _, y in pairs])
    images, seed = None, None
    for s, ca, cb in zip(a.seeds, a.corrects, b.corrects):
        if ca is not None and cb is not None and len(ca) == len(cb):
            images, seed = stats.mcnemar(ca, cb), s
            break
    if diff.n < 2 and images is not None:
        return Comparison(a, b, diff, images, seed, IMAGES_TEST, stats.image_verdict(images, _who(a), _who(b)))
    return Comparison(a, b, diff, images, seed, SEEDS_TEST, stats.verdict(diff))


def _who(run: Run) -> str:
    return "scratch" if run.is_scratch else f"{run.name} fine-tuned"


def finetune_comparison(inputs: Inputs) -> Comparison | None:
    """Fine-tuned minus scratch test top-1: the same network, the same seeds, the same steps."""
    t = twin(inputs)
    return None if t is None else compare(t, inputs.scratch)


def finetune_gain(inputs: Inputs) -> stats.Interval:
    c = finetune_comparison(inputs)
    return stats.over_seeds([]) if c is None else c.seeds


def baseline_differences(inputs: Inputs) -> pd.DataFrame:
    """Each ViT run against the CNN baseline on test top-1, with its verdict on 'the ViT beats
    the CNN' (over seeds, or image by image with one seed)."""
    cnn = next((r for r in inputs.runs if r.is_cnn), None)
    rows = []
    for r in inputs.runs:
        if cnn is None or r is cnn or r.is_cnn:
            continue
        c = compare(r, cnn)
        rows.append(
            {
                "run": r.name,
                "label": r.label,
                "baseline": cnn.name,
                "diff": c.seeds,
                "comparison": c,
                "verdict": c.verdict,
            }
        )
    return pd.DataFrame(rows)


def summary_metrics(inputs: Inputs) -> dict:
    """Flat keys for `dvc metrics diff`: every test top-1 as mean, sd and 95% interval over
    seeds, the test set's own Wilson half-width, the paired differences with the test that
    decided each (`.test`: seeds | images) and McNemar's p on the first seed's test images."""
    out: dict = {"seeds": len(inputs.scratch.seeds)}

    def put(prefix, ci: stats.Interval):
        for k in ("mean", "sd", "lo", "hi"):
            v = getattr(ci, k)
            out[f"{prefix}_{'ci95_' + k if k in ('lo', 'hi') else k}"] = None if math.isnan(v) else round(v, 5)

    def put_comparison(prefix, c: Comparison):
        put(f"{prefix}.top1", c.seeds)
        out[f"{prefix}.test"] = c.method
        out[f"{prefix}.verdict"] = c.verdict.word
        if c.images is not None:
            put_images(prefix, c.images)

    def put_images(prefix, t: stats.PairedImages):
        # p to 3 significant digits: it can be 1e-36, which a fixed number of decimals rounds to 0
        out.update(
            {
                f"{prefix}.mcnemar_p": float(f"{t.p:.3g}"),
                f"{prefix}.only_first_right": t.a_only,
                f"{prefix}.only_second_right": t.b_only,
                f"{prefix}.image_diff": round(t.diff, 5),
            }
        )

    for r in inputs.runs:
        ci = stats.over_seeds(r.top1s)
        put(f"{r.name}.top1", ci)
        n = r.test.get("test_images")
        if n and ci.n:
            lo, hi = stats.wilson(round(ci.mean * n), int(n))
            out[f"{r.name}.top1_test_set_half"] = round((hi - lo) / 2, 5)
    c = finetune_comparison(inputs)
    if c is not None:
        put_comparison("finetune_minus_scratch", c)
    for row in baseline_differences(inputs).itertuples():
        put_comparison(f"{row.run}_minus_{row.baseline}", row.comparison)
    return out


FINETUNE_CLAIM = "fine-tuning a pretrained ViT beats training it from scratch, at equal training steps"
TIME_CLAIM = "fine-tuning reaches scratch's accuracy in a fraction of the scratch time"


def finetune_claims(inputs: Inputs) -> tuple[list[Claim], dict]:
    """Fine-tuning beats scratch at equal steps and reaches scratch's accuracy sooner (without and
    with pretraining counted), in this run. Returns the claims and the facts behind them (for the
    report's sentences). Equal total compute is the studies pipeline's (claims.question_claims)."""
    f = reference.FINETUNE
    ref_acc = f"{f['cifar100_top1']:.2%} CIFAR-100 top-1 after {f['hours']:g} h of fine-tuning"
    ref_time = (
        f"{f['hours']:g} h fine-tuning against ~{reference.TIME['eta_h_text']:g} h from scratch "
        f"({reference.TIME['eta_h_text'] / f['hours']:.1f}x less), pretraining not counted"
    )
    scratch, t = inputs.scratch, twin(inputs)
    facts: dict = {"twin": t}
    if t is None or scratch.top1 is None or t.top1 is None:
        why = "no variant has the scratch network" if t is None else "a run has no test metrics"
        return [
            Claim("4", FINETUNE_CLAIM, ref_acc, why, UNTESTED, why=why),
            Claim("4", TIME_CLAIM, ref_time, why, UNTESTED, why=why),
        ], facts
    c = finetune_comparison(inputs)
    facts.update(comparison=c, gain=c.seeds.mean, diff=c.seeds, diff_verdict=c.verdict)
    means = f"{t.top1:.1%} fine-tuned vs {scratch.top1:.1%} from scratch" + (
        f" (means of {c.seeds.n} seeds)" if c.seeds.n > 1 else ""
    )
    acc = Claim(
        "4",
        FINETUNE_CLAIM,
        ref_acc,
        f"{means}, {t.train.get('steps')} vs {scratch.train.get('steps')} steps: {_diff_text(c)}",
        c.verdict.word,
        MEASURED,
    )
    return [acc, *time_claims_finetune(inputs, t, ref_time, facts)], facts


def _diff_text(c: Comparison) -> str:
    if c.method == IMAGES_TEST:
        return c.verdict.why
    return f"{100 * c.seeds.mean:+.1f} points; {c.verdict.why}"


def time_claims_finetune(inputs: Inputs, t: Run, ref_time: str, facts: dict) -> list[Claim]:
    """Time to the median final validation top-1 of scratch's seeds: per seed, then the median
    and range over seeds; without pretraining (as the reference counted) and with it."""
    scratch = inputs.scratch
    finals = [float(e.val_acc.iloc[-1]) for e in scratch.evals_by_seed if not e.empty and "val_acc" in e]
    if not finals:
        return [Claim("4", TIME_CLAIM, ref_time, "no validation series", UNTESTED, why="no validation series")]
    target = stats.spread(finals)[0]
    spacing = eval_spacing(scratch)
    facts.update(target=target, spacing=spacing)
    s_hits = seed_hits(scratch, target)
    out = []
    for pretraining in (False, True):
        t_hits = seed_hits(t, target, pretraining)
        ts = [math.inf if h is None else h[1] for h in t_hits]
        ss = [math.inf if h is None else h[1] for h in s_hits]
        (tm, tlo, thi), (sm, slo, shi) = stats.spread(ts), stats.spread(ss)
        facts[f"time_{'with' if pretraining else 'without'}_pretraining"] = (tm, tlo, thi, sm, slo, shi)
        ok = True if thi < slo else False if tlo >= shi else None
        word = INCONCLUSIVE if ok is None else verdict(ok)
        this = (
            f"time to {target:.1%} validation top-1, fine-tuning: {_secs(tm)}{_range(tlo, thi)}"
            + (f" ({t.pretrain_s:.0f} s of pretraining included)" if pretraining else "")
            + f"; from scratch: {_secs(sm)}{_range(slo, shi)} (median [range] over {len(ts)} "
            f"seed{'s' if len(ts) > 1 else ''}; evaluated every {spacing or '?'} steps)"
        )
        if ok is None:
            this += ": the seeds' ranges overlap"
        claim = TIME_CLAIM + (", pretraining counted" if pretraining else ", pretraining not counted")
        out.append(
            Claim("4", claim, ref_time if not pretraining else "not counted by the reference", this, word, MEASURED)
        )
    return out


def _range(lo: float, hi: float) -> str:
    return f" [{_secs(lo)}–{_secs(hi)}]" if lo != hi else ""


def _secs(v: float) -> str:
    return "never" if math.isinf(v) else f"{v:,.1f} s" if v < 10 else f"{v:,.0f} s"


# ---------------------------------------------------------------------------------------
# 5. Variants (its Fig. 6)


def variant_table(inputs: Inputs) -> pd.DataFrame:
    rows = []
    for run in inputs.runs:
        top1 = stats.over_seeds(run.top1s)
        rows.append(
            {
                "run": run.name,
                "label": run.label,
                "network": describe(run.spec, inputs.image_size),
                "kind": "CNN" if run.is_cnn else "ViT",
                "fine_tuned": not run.is_scratch,
                "params": run.params,
                "train_gflops": train_gflops(inputs, run),
                "test_top1": run.top1,
                "test_top1_lo": top1.lo,
                "test_top1_hi": top1.hi,
                "train_s": run.train_s,
                "train_s_sd": stats.over_seeds([t.get("wall_time_s") for t in run.trains]).sd,
                "steps": run.train.get("steps"),
                "img_per_s": run.train.get("img_per_s"),
                "ms_per_image": 1000 / run.train["img_per_s"] if run.train.get("img_per_s") else None,
                "cuda_memory_mib": run.train.get("peak_cuda_allocated_mb"),
                "infer_img_per_s": run.test.get("infer_img_per_s"),
            }
        )
    return pd.DataFrame(rows)


def compared_networks(v: pd.DataFrame) -> pd.DataFrame:
    """Distinct networks of one family (ViT or CNN) that this run trained: the family with
    the most distinct parameter counts. Comparing across families mixes family with size."""
    done = v.dropna(subset=["params", "ms_per_image"]).drop_duplicates("params")
    if done.empty:
        return done
    family = done.kind.value_counts().idxmax()
    return done[done.kind == family].sort_values("params")


def variant_claims(v: pd.DataFrame) -> list[Claim]:
    """More parameters cost more time and more memory, within one family: time per image from
    the training stages; memory only from the CUDA allocator (process RSS holds the interpreter
    and libraries too, so it cannot rank networks of this size)."""
    by = compared_networks(v)
    claim = "more parameters take more training time and more memory"
    ref = "ViT-L ~11 h vs ViT-B ~5 h; smaller patches need more memory"
    if len(by) < 2:
        trained = ", ".join(f"{r.run} ({r.kind})" for r in v.drop_duplicates("params").itertuples())
        return [
            Claim(
                "5",
                claim,
                ref,
                f"one network per family trained ({trained})",
                UNTESTED,
                why="this run trains no two sizes of one family; a ViT against a ResNet mixes family with size",
            )
        ]
    time_up = by.ms_per_image.is_monotonic_increasing
    has_mem = by.cuda_memory_mib.notna().all()
    mem_up = by.cuda_memory_mib.is_monotonic_increasing if has_mem else None
    order = " < ".join(
        f"{r.run} {r.params / 1e6:.2f}M ({r.ms_per_image:.2f} ms/image"
        + (f", {r.cuda_memory_mib:,.0f} MiB" if has_mem else "")
        + ")"
        for r in by.itertuples()
    )
    this = f"{order}: time per image {'rises' if time_up else 'does not rise'} with parameters" + (
        f", peak CUDA memory {'rises' if mem_up else 'does not rise'}"
        if has_mem
        else "; memory not measured (no CUDA allocator on this machine), so only time is tested"
    )
    return [Claim("5", claim, ref, this, verdict(time_up and (mem_up is not False)), MEASURED)]


# Past one device: what replicating (DDP) and sharding (FSDP) need per device, from the
# compute model. ViT-giant/14 (1.0 B parameters) is the first size whose fp32 AdamW state
# alone outgrows a 16 GB card.
SHARDING_MODELS = ("vit_l16", "vit_h14", "vit_giant_patch14_224")
SHARDING_DEVICES = (1, 4)


def sharding_table(inputs: Inputs) -> pd.DataFrame:
    """Per model and device count on profile.device at profile.batch_size: DDP or FSDP (the
    planner's decision), the micro-batch that fits and the state bytes each device holds."""
    s = profile_setting(inputs)
    if s["device"] in LOCAL or not s["batch"]:
        return pd.DataFrame()
    device = get_device(s["device"])
    rows = []
    for name in SHARDING_MODELS:
        spec = {"arch": name}
        cfg = model_config(spec, s["num_classes"], s["image_size"])
        kw = {"precision": s["precision"], "optimizer": s["optimizer"], "attention": s["attention"]}
        ddp_micro = compute.plan(cfg, s["batch"], device, **kw)["micro_batch"]
        for devices in SHARDING_DEVICES:
            d = sharding.decide(cfg, s["batch"], device, devices, **kw)
            rows.append(
                {
                    "network": describe(spec, s["image_size"]),
                    "devices": devices,
                    "params": compute.param_counts(cfg)["total"],
                    "ddp_micro_batch": ddp_micro,
                    "parallel": d["parallel"],
                    "micro_batch": ddp_micro if d["parallel"] == "ddp" else d["micro_batch"],
                    "state_gib": sharding.state_bytes(cfg, devices if d["parallel"] == "fsdp" else 1, s["optimizer"])
                    / 2**30,
                    "fewest_devices": d["fewest_devices"],
                    "capacity_gib": device.memory_bytes / 2**30,
                    "device_label": device.label,
                }
            )
    return pd.DataFrame(rows)
