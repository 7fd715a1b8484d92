"""The report's numbers: this run's data set against the reference report's figures, as
pandas frames, and one verdict per claim of the reference (holds / does not hold / not
tested). No text layout and no plotting here: document.py writes, figures.py draws."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from vitpipe.costmodel import compute
from vitpipe.costmodel import reference
from vitpipe.costmodel.devices import LOCAL
from vitpipe.models import describe, model_config
from vitpipe.report import stats
from vitpipe.report.inputs import Inputs, Run

HOLDS, FAILS, UNTESTED = "holds", "does not hold", "not tested by this run"
# A printed count within this of the exact one "holds": the reference rounds to 0.1M-1M,
# and the ViT paper's totals count a 1000-class head.
COUNT_TOLERANCE = 0.05
# Table 1 is about ImageNet models: counted at 224 px with a 1000-class head
TABLE1_IMAGE_SIZE, TABLE1_CLASSES = 224, 1000
MEMORY_MODELS = ("vit_b8", "vit_b16", "vit_b32")     # the reference's Fig. 3
ACCURACY_TARGETS = (0.5, 0.8, 0.9)                   # validation top-1 for time-to-accuracy
GB = 1e9


@dataclass
class Claim:
    """One statement of the reference, re-derived with this run's data."""
    section: str
    claim: str
    reference: str
    this_run: str
    verdict: str


def verdict(ok: bool | None) -> str:
    return UNTESTED if ok is None else HOLDS if ok else FAILS


# ---------------------------------------------------------------------------------------
# 1. Parameters (the reference's Table 1)


def parameter_table() -> pd.DataFrame:
    """One row per Table-1 model: exact count, the reference's formulas, its printed figures."""
    rows = []
    for r in reference.reference_table(TABLE1_IMAGE_SIZE, TABLE1_CLASSES):
        ref = reference.TABLE1[r["model"]]
        rows.append({
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
        })
    return pd.DataFrame(rows)


def parameter_claims(t: pd.DataFrame) -> list[Claim]:
    vit, cnn = t[t.model.str.startswith("vit")], t[t.model.str.startswith("resnet")]
    out = []
    for group, rows in (("ViT-B/L/H", vit), ("ResNet-18/34/50/101", cnn)):
        worst = rows.loc[rows.printed_error.abs().idxmax()]
        out.append(Claim(
            "1", f"{group} parameter counts (Table 1)",
            ", ".join(f"{m:g}M" for m in rows.ref_printed_m),
            ", ".join(f"{e / 1e6:.1f}M" for e in rows.exact) + f" (worst {worst.printed_error:+.1%}, {worst.network})",
            verdict(bool(rows.holds.all()))))
    r101, b16 = (t.set_index("model").loc[m] for m in ("resnet101", "vit_b16"))
    ref_ratio, ratio = r101.ref_printed_m / b16.ref_printed_m, r101.exact / b16.exact
    out.append(Claim("1", "the deepest ResNet (101) is comparable in size to ViT-Base",
                     f"{ref_ratio:.2f}x ViT-B", f"{ratio:.2f}x ViT-B",
                     verdict(abs(ratio - 1) <= 0.2)))
    return out


# ---------------------------------------------------------------------------------------
# 2. Memory at the reference's setting (its Fig. 3)


def profile_setting(inputs: Inputs) -> dict:
    p = inputs.doc.get("profile") or {}
    return {"image_size": p.get("image_size"), "batch": p.get("batch_size"), "device": p.get("device"),
            "precision": p.get("precision", "fp32"), "optimizer": p.get("optimizer", "adamw"),
            "attention": p.get("attention", "sdpa"), "num_classes": p.get("num_classes"),
            "steps": p.get("schedule_steps")}


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
        if s["device"] not in LOCAL:   # "local" would benchmark this machine: the profile stage's job
            cfg = model_config({"arch": model}, s["num_classes"], s["image_size"])
            ckpt = compute.estimate(cfg, s["batch"], s["device"], s["precision"], s["optimizer"],
                                    s["attention"], checkpointing=True)
        ref = reference.MEMORY.get(model, {})
        rows.append({
            "model": model, "network": r["name"], "peak_gb": r.peak_gb, "required_gb": r.required_gb,
            "capacity_gb": r.capacity_gb, "need_ratio": r.required_gb / r.capacity_gb, "fits": _bool(r.fits),
            "micro_batch": int(r.micro_batch) if r.micro_batch == r.micro_batch and r.micro_batch else None,
            "accum_steps": int(r.accum_steps) if r.accum_steps == r.accum_steps and r.accum_steps else None,
            "checkpointing_required_gb": ckpt["required_bytes"] / GB, "checkpointing_fits": ckpt["fits"],
            "ref_fits": ref.get("fits"), "ref_gb": ref.get("used_gb") or ref.get("needed_gb"),
            "ref_ratio": ref.get("fraction_of_gpu"),
        })
    return pd.DataFrame(rows)


def _bool(v) -> bool:
    return v is True or str(v).lower() == "true"


def memory_claims(inputs: Inputs, m: pd.DataFrame) -> list[Claim]:
    out = []
    same = at_reference_setting(inputs)
    for r in m.itertuples():
        if r.ref_fits is None:
            continue
        ref = (f"fits ({r.ref_gb:g} GB, {r.ref_ratio:.0%} of the T4)" if r.ref_fits
               else f"does not fit (needs {r.ref_gb:g} GB, {r.ref_ratio:.2f}x)")
        ours = (f"{'fits' if r.fits else 'does not fit'} (needs {r.required_gb:.1f} GB, "
                f"{r.need_ratio:.2f}x of {r.capacity_gb:.1f} GB)")
        claim = f"{r.network} {'fits' if r.ref_fits else 'does not fit'} a 16 GB T4 at batch 512, from scratch"
        out.append(Claim("2", claim, ref, ours,
                         verdict(bool(r.fits) == bool(r.ref_fits) if same else None)))
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
        mem = compute.memory(cfg, run.recipe.micro_batch, run.recipe.precision, run.recipe.optimizer,
                             attention, run.recipe.activation_checkpointing)
        rows.append({"run": run.name, "micro_batch": run.recipe.micro_batch,
                     "predicted_mb": mem["peak"] / 2**20,
                     "cuda_mb": run.train.get("peak_cuda_allocated_mb"), "rss_mb": run.train.get("peak_rss_mb")})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------
# 3. Time (its Fig. 4)


def train_gflops(inputs: Inputs, run: Run) -> float | None:
    if not inputs.num_classes:
        return None
    cfg = model_config(run.spec, inputs.num_classes, inputs.image_size)
    return compute.flops(cfg)["train"] / 1e9


def throughput_table(inputs: Inputs) -> pd.DataFrame:
    """Measured training img/s of each run, the FLOP/s it achieved, its MFU against this
    machine's measured peak, and the img/s the profile's calibrated MFU predicted."""
    peak = inputs.profile.get("local_peak_gflops")
    mfu_cal = inputs.profile.get("calibrated_mfu")
    rows = []
    for run in inputs.runs:
        measured, flops = run.train.get("img_per_s"), train_gflops(inputs, run)
        if not measured or not flops:
            continue
        achieved = measured * flops
        predicted = mfu_cal * peak / flops if peak and mfu_cal else None
        rows.append({"run": run.name, "img_per_s": measured, "train_gflops": flops, "achieved_gflops": achieved,
                     "mfu": achieved / peak if peak else None, "predicted_img_per_s": predicted,
                     "measured_over_predicted": measured / predicted if predicted else None})
    return pd.DataFrame(rows)


def eta_table(inputs: Inputs, thr: pd.DataFrame) -> pd.DataFrame:
    """The reference's schedule (its model, batch and steps) on every device profile, plus
    this machine at the MFU its own scratch training reached."""
    model = reference.TIME["model"]
    d = inputs.devices
    if d.empty or model not in set(d.model):
        return pd.DataFrame()
    rows = d[d.model == model][["device", "device_label", "mfu", "img_per_s", "eta_h"]].copy()
    rows["source"] = ["calibrated MFU (profile)" if x == "local" else "device profile MFU" for x in rows.device]
    c = inputs.compute
    hit = c[c.model == model] if not c.empty else c
    scratch = thr[thr.run == inputs.scratch.name] if not thr.empty else thr
    peak = inputs.profile.get("local_peak_gflops")
    s = profile_setting(inputs)
    if not hit.empty and not scratch.empty and peak:
        mfu = float(scratch.mfu.iloc[0])
        img_s = mfu * peak / float(hit.train_gflops.iloc[0])
        local = d[(d.model == model) & (d.device == "local")]
        rows = pd.concat([rows, pd.DataFrame([{
            "device": "local-measured",
            "device_label": (local.device_label.iloc[0] if not local.empty else "this machine"),
            "mfu": mfu, "img_per_s": img_s, "eta_h": s["steps"] * s["batch"] / img_s / 3600,
            "source": "MFU of this run's scratch training"}])], ignore_index=True)
    return rows.reset_index(drop=True)


def time_claims(inputs: Inputs, eta: pd.DataFrame) -> list[Claim]:
    t = reference.TIME
    ref = f"{t['img_per_s']:g} img/s, ETA {t['eta_h_low']:g}-{t['eta_h_high']:g} h ({t['eta_h_text']:g} h)"
    t4 = eta[eta.device == "t4"] if not eta.empty else eta
    same = at_reference_setting(inputs) and profile_setting(inputs)["steps"] == t["steps"]
    if t4.empty:
        return [Claim("3", "ViT-B/32 from scratch, 10,000 steps at batch 512 on a T4 takes ~36 h", ref,
                      "no profile for the T4", verdict(None))]
    r = t4.iloc[0]
    ok = t["eta_h_low"] * 0.9 <= r.eta_h <= t["eta_h_high"] * 1.1 if same else None
    return [Claim("3", "ViT-B/32 from scratch, 10,000 steps at batch 512 on a T4 takes ~36 h", ref,
                  f"{r.img_per_s:.1f} img/s, ETA {r.eta_h:.1f} h at MFU {r.mfu:.2f}", verdict(ok))]


# ---------------------------------------------------------------------------------------
# 4. Scratch against fine-tuning (its section 5.3)


def same_network(a: dict, b: dict) -> bool:
    keys = ("arch", "patch", "dim", "depth", "heads", "mlp_ratio", "pool")
    return all(a.get(k) == b.get(k) for k in keys)


def twin(inputs: Inputs) -> Run | None:
    """The fine-tuned variant with the scratch network's architecture: like for like."""
    return next((r for r in inputs.runs[1:] if same_network(r.spec, inputs.scratch.spec)), None)


def time_to_accuracy(run: Run, target: float) -> tuple[int, float] | None:
    """(step, training seconds) to `target` validation top-1: the median over seeds of each
    seed's first evaluation at or above it; None if fewer than half the seeds got there."""
    hits = [_first_hit(e, target) for e in run.evals_by_seed]
    reached = [h for h in hits if h is not None]
    if not reached or len(reached) * 2 <= len(hits):
        return None
    steps = sorted(h[0] for h in reached) + [float("inf")] * (len(hits) - len(reached))
    secs = sorted(h[1] for h in reached) + [float("inf")] * (len(hits) - len(reached))
    mid = (len(hits) - 1) / 2
    med = (lambda xs: (xs[int(mid)] + xs[int(mid + 0.5)]) / 2)
    return int(med(steps)), float(med(secs))


def _first_hit(e: pd.DataFrame, target: float) -> tuple[int, float] | None:
    if e.empty or "val_acc" not in e:
        return None
    hit = e[e.val_acc >= target]
    if hit.empty:
        return None
    first = hit.iloc[0]
    return int(first.step), float(first.elapsed_s) if "elapsed_s" in e else float("nan")


def accuracy_table(inputs: Inputs) -> pd.DataFrame:
    """Per run: final/best validation accuracy, test top-1, and time and steps to each target."""
    rows = []
    for run in inputs.runs:
        e = run.evals
        ci = stats.over_seeds(run.top1s)
        row = {"run": run.name, "label": run.label, "steps": run.train.get("steps"), "train_s": run.train_s,
               "pretrain_s": run.pretrain_s, "pretrain_steps": run.pretrain.get("steps"),
               "final_val": float(e.val_acc.iloc[-1]) if not e.empty and "val_acc" in e else None,
               "best_val": float(e.val_acc.max()) if not e.empty and "val_acc" in e else None,
               "test_top1": run.top1, "test_top1_ci": ci}
        for target in ACCURACY_TARGETS:
            hit = time_to_accuracy(run, target)
            row[f"steps_to_{target:.0%}"] = hit[0] if hit else None
            row[f"s_to_{target:.0%}"] = hit[1] if hit else None
        rows.append(row)
    return pd.DataFrame(rows)


def finetune_gain(inputs: Inputs) -> stats.Interval:
    """Fine-tuned minus scratch test top-1, paired by seed: the same network, the same seeds."""
    t = twin(inputs)
    if t is None:
        return stats.over_seeds([])
    pairs = [(a, b) for a, b in zip(t.top1s, inputs.scratch.top1s) if a is not None and b is not None]
    return stats.paired([a for a, _ in pairs], [b for _, b in pairs])


def baseline_differences(inputs: Inputs) -> pd.DataFrame:
    """Each ViT run minus the CNN baseline, test top-1 paired by seed, with its verdict on
    'the ViT beats the CNN'."""
    cnn = next((r for r in inputs.runs if r.is_cnn), None)
    rows = []
    for r in inputs.runs:
        if cnn is None or r is cnn or r.is_cnn:
            continue
        pairs = [(a, b) for a, b in zip(r.top1s, cnn.top1s) if a is not None and b is not None]
        d = stats.paired([a for a, _ in pairs], [b for _, b in pairs])
        rows.append({"run": r.name, "label": r.label, "baseline": cnn.name, "diff": d, "verdict": stats.verdict(d)})
    return pd.DataFrame(rows)


def summary_metrics(inputs: Inputs) -> dict:
    """Flat keys for `dvc metrics diff`: every test top-1 as mean, sd and 95% interval over
    seeds, the test set's own Wilson half-width, and the paired differences."""
    out: dict = {"seeds": len(inputs.scratch.seeds)}

    def put(prefix, ci: stats.Interval):
        for k in ("mean", "sd", "lo", "hi"):
            v = getattr(ci, k)
            out[f"{prefix}_{'ci95_' + k if k in ('lo', 'hi') else k}"] = None if v != v else round(v, 5)

    for r in inputs.runs:
        ci = stats.over_seeds(r.top1s)
        put(f"{r.name}.top1", ci)
        n = r.test.get("test_images")
        if n and ci.n:
            lo, hi = stats.wilson(round(ci.mean * n), int(n))
            out[f"{r.name}.top1_test_set_half"] = round((hi - lo) / 2, 5)
    put("finetune_minus_scratch.top1", finetune_gain(inputs))
    for row in baseline_differences(inputs).itertuples():
        put(f"{row.run}_minus_{row.baseline}.top1", row.diff)
    return out


def finetune_claims(inputs: Inputs) -> tuple[list[Claim], dict]:
    """Fine-tuning beats scratch training, in accuracy and in time to reach scratch's accuracy.
    Returns the claims and the numbers behind them (for the report's sentences)."""
    f = reference.FINETUNE
    ref_acc = f"{f['cifar100_top1']:.2%} CIFAR-100 top-1 after {f['hours']:g} h of fine-tuning"
    ref_time = (f"{f['hours']:g} h fine-tuning against ~{reference.TIME['eta_h_text']:g} h from scratch "
                f"({reference.TIME['eta_h_text'] / f['hours']:.1f}x less)")
    scratch, t = inputs.scratch, twin(inputs)
    facts: dict = {"twin": t}
    if t is None or scratch.top1 is None or t.top1 is None:
        why = "no variant has the scratch network" if t is None else "a run has no test metrics"
        return [Claim("4", "fine-tuning a pretrained ViT beats training it from scratch", ref_acc, why, verdict(None)),
                Claim("4", "fine-tuning reaches its accuracy in a fraction of the scratch time", ref_time, why,
                      verdict(None))], facts
    diff = finetune_gain(inputs)
    v = stats.verdict(diff)
    facts.update(gain=diff.mean, diff=diff, diff_verdict=v)
    acc = Claim("4", "fine-tuning a pretrained ViT beats training it from scratch", ref_acc,
                f"{t.top1:.1%} fine-tuned vs {scratch.top1:.1%} from scratch (means of {diff.n} seeds), same network "
                f"and {t.train.get('steps')} vs {scratch.train.get('steps')} steps: {100 * diff.mean:+.1f} points, "
                f"{v.why}", v.word)
    # time to reach the accuracy scratch training ends with
    target = float(scratch.evals.val_acc.iloc[-1]) if not scratch.evals.empty else None
    hit_t = time_to_accuracy(t, target) if target is not None else None
    hit_s = time_to_accuracy(scratch, target) if target is not None else None
    facts.update(target=target, hit_twin=hit_t, hit_scratch=hit_s)
    if target is None or hit_s is None:
        return [acc, Claim("4", "fine-tuning reaches its accuracy in a fraction of the scratch time", ref_time,
                           "no validation series", verdict(None))], facts
    if hit_t is None:
        this = f"fine-tuning never reached scratch's final {target:.1%} validation top-1"
        ok = False
    else:
        with_pre = hit_t[1] + t.pretrain_s
        facts.update(speedup=hit_s[1] / hit_t[1] if hit_t[1] else float("inf"),
                     speedup_with_pretrain=hit_s[1] / with_pre if with_pre else float("inf"))
        this = (f"{target:.1%} validation top-1 after {hit_t[1]:.0f} s ({hit_t[0]} steps) fine-tuning vs "
                f"{hit_s[1]:.0f} s ({hit_s[0]} steps) from scratch ({facts['speedup']:.1f}x; "
                f"{facts['speedup_with_pretrain']:.2f}x counting {t.pretrain_s:.0f} s of pretraining)")
        ok = hit_t[1] < hit_s[1]
    return [acc, Claim("4", "fine-tuning reaches its accuracy in a fraction of the scratch time", ref_time,
                       this, verdict(ok))], facts


# ---------------------------------------------------------------------------------------
# 5. Variants (its Fig. 6)


def variant_table(inputs: Inputs) -> pd.DataFrame:
    rows = []
    for run in inputs.runs:
        rows.append({"run": run.name, "label": run.label, "network": describe(run.spec, inputs.image_size),
                     "kind": "CNN" if run.is_cnn else "ViT", "fine_tuned": not run.is_scratch,
                     "params": run.params, "train_gflops": train_gflops(inputs, run), "test_top1": run.top1,
                     "train_s": run.train_s, "steps": run.train.get("steps"),
                     "img_per_s": run.train.get("img_per_s"),
                     "ms_per_image": 1000 / run.train["img_per_s"] if run.train.get("img_per_s") else None,
                     "peak_memory_mb": run.peak_memory_mb,
                     "memory_source": "CUDA allocator" if run.train.get("peak_cuda_allocated_mb") else "process RSS",
                     "infer_img_per_s": run.test.get("infer_img_per_s")})
    return pd.DataFrame(rows)


def compared_networks(v: pd.DataFrame) -> pd.DataFrame:
    """The distinct networks to rank against each other: the fine-tuned variants (one recipe,
    as in the reference's Fig. 6) when there are two or more, else every run."""
    done = v.dropna(subset=["params", "ms_per_image", "peak_memory_mb"])
    tuned = done[done.fine_tuned].drop_duplicates("params")
    return (tuned if len(tuned) >= 2 else done.drop_duplicates("params")).sort_values("params")


def variant_claims(v: pd.DataFrame) -> list[Claim]:
    """More parameters cost more time and more memory: the rank order of distinct networks."""
    by = compared_networks(v)
    claim = "more parameters take more training time and more memory"
    ref = "ViT-L ~11 h vs ViT-B ~5 h; smaller patches need more memory"
    if len(by) < 2:
        return [Claim("5", claim, ref, "fewer than two distinct networks trained", verdict(None))]
    time_up = by.ms_per_image.is_monotonic_increasing
    mem_up = by.peak_memory_mb.is_monotonic_increasing
    order = " < ".join(f"{r.run} {r.params / 1e6:.2f}M ({r.ms_per_image:.2f} ms/image, {r.peak_memory_mb:,.0f} MB)"
                       for r in by.itertuples())
    this = (f"{order}: time per image {'rises' if time_up else 'does not rise'} with parameters, "
            f"peak memory {'rises' if mem_up else 'does not rise'}")
    return [Claim("5", claim, ref, this, verdict(time_up and mem_up))]
