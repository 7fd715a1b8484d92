"""The two tables of the headline: the reference's claims (each once, restatements merged, each
with the threshold its verdict applies) and the questions vitpipe asks beyond them. Every
comparison of accuracies the report makes is one Holm family: its verdicts come from the
adjusted p-values."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from vitpipe.costmodel import reference
from vitpipe.report import analysis as an
from vitpipe.report import stats
from vitpipe.report import verdicts as vd
from vitpipe.report.inputs import Inputs
from vitpipe.report.studies import Studies

REFERENCE, QUESTION = "reference", "question"
STUDY = "measured by the studies pipeline"


@dataclass
class Findings:
    reference: list[an.Claim]
    questions: list[an.Claim]
    comparisons: list[vd.Comparison]  # from the studies, Holm-adjusted
    default_ps: dict[str, float] = field(default_factory=dict)  # the default run's comparisons: raw p
    holm: dict[str, float] = field(default_factory=dict)  # every comparison's adjusted p
    settings: list[vd.Setting] = field(default_factory=list)
    memory: list[dict] = field(default_factory=list)
    flops: dict = field(default_factory=dict)
    data: dict | None = None
    spread: dict | None = None

    @property
    def all(self) -> list[an.Claim]:
        return self.reference + self.questions


def word_by_p(diff: float, p: float) -> str:
    if math.isnan(p) or p >= vd.ALPHA:
        return vd.INCONCLUSIVE
    return vd.HOLDS if diff > 0 else vd.FAILS


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


def p_text(p: float) -> str:
    """A bootstrap p of 0 means below its resolution (1 / resamples): never print 'p = 0'."""
    return "n/a" if math.isnan(p) else "< 0.001" if p < 0.001 else f"= {p:.2g}"


def comparison_text(c: vd.Comparison) -> str:
    return (
        f"{100 * c.mean_a:.1f}% vs {100 * c.mean_b:.1f}%: {_pts(c.diff)} points [{_pts(c.lo)}, {_pts(c.hi)}], "
        f"Holm p {p_text(c.p_holm)}, {c.conditioning} ({c.cite})"
    )


def budget_comparisons(f: Findings) -> list[vd.Comparison]:
    """Fine-tuned minus scratch at each budget, from the one pretraining run (the curves' points)."""
    return [c for c in f.comparisons if c.key.startswith("budget_") and c.key.endswith(".finetune_minus_scratch")]


def build(inputs: Inputs, st: Studies) -> Findings:
    settings = [vd.assumed_setting(inputs.doc.get("profile") or {}), vd.reference_setting()]
    f = Findings([], [], [], settings=settings)
    f.comparisons = vd.budget_comparisons(st)
    crossed = vd.crossed_comparison(st)
    equal = vd.equal_compute_comparison(st)
    f.comparisons += [c for c in (crossed, equal) if c is not None]
    f.data, f.spread = vd.data_efficiency(st), vd.pretraining_spread(st)
    ps = {c.key: c.p for c in f.comparisons}
    if f.data:
        ps["data_efficiency.interaction"] = f.data["p"]
    default = an.finetune_comparison(inputs)
    if default is not None and default.seeds.n >= 2:
        f.default_ps["finetune_minus_scratch"] = stats.t_p_value(default.seeds)
    for row in an.baseline_differences(inputs).itertuples():
        if row.comparison.seeds.n >= 2:
            f.default_ps[f"{row.run}_minus_{row.baseline}"] = stats.t_p_value(row.comparison.seeds)
    f.holm = stats.holm({**ps, **f.default_ps})
    for c in f.comparisons:
        c.p_holm = f.holm[c.key]
    f.reference = reference_claims(inputs, st, f, crossed)
    f.questions = question_claims(inputs, st, f, equal)
    return f


def reference_claims(inputs: Inputs, st: Studies, f: Findings, crossed) -> list[an.Claim]:
    params = an.parameter_claims(an.parameter_table())[:2]
    for c, key in zip(params, ("params.vit", "params.resnet")):
        c.test, c.key = f"printed total within ±{an.COUNT_TOLERANCE:.0%} of the exact count", key
    out = params
    f.flops = vd.flops_comparison()
    r = f.flops["ratios"]
    out.append(
        an.Claim(
            "1",
            "the deepest ResNet (101) needs computation comparable to ViT-Base",
            "84.8M vs 86M parameters (its Table 1)",
            f"forward FLOPs: {r['vit_b16']:.2f}x ViT-B/16, {r['vit_b32']:.2f}x ViT-B/32",
            f.flops["verdict"],
            an.COMPUTED,
            why=""
            if f.flops["verdict"] != vd.DEPENDS
            else "the setting here is the patch size: comparable to ViT-B/32, not to ViT-B/16",
            test=f"forward FLOPs at 224 px within {1 / vd.COMPARABLE:g}x-{vd.COMPARABLE:g}x",
            key="compute.resnet101_vs_vit_base",
        )
    )
    f.memory = vd.memory_verdicts(f.settings)
    cap = f.memory[0]["at"][0]["capacity_bytes"]
    for m in f.memory:
        net = m["model"].replace("vit_b", "ViT-B/")
        says = "fits" if m["ref_fits"] else "does not fit"
        ours = "; ".join(f"({tag}) {a['ratio']:.2f}x, {w}" for tag, a, w in zip("AR", m["at"], m["words"]))
        out.append(
            an.Claim(
                "2",
                f"{net} {says} a 16 GB T4, from scratch",
                (f"{m['ref_ratio']:.0%} of the GPU" if m["ref_fits"] else f"needs {m['ref_ratio']:.2f}x"),
                f"needs {ours} (settings A and R of §2)",
                m["verdict"],
                an.COMPUTED,
                test=f"needed ≤ the T4's {cap / vd.GIB:.1f} GiB ({cap / vd.GB:.1f} GB), at each setting",
                key=f"memory.{m['model']}",
            )
        )
    time = an.time_claims()[0]  # the time model at the reference's setting, against its img/s
    time.key = "time.vit_b32_t4_eta"
    out.append(time)
    out.append(finetune_claim(inputs, st, f, crossed))
    variants = an.variant_claims(an.variant_table(inputs))[0]
    variants.test, variants.key = "time and memory rise with parameters within one family", "variants.size_cost"
    out.append(variants)
    out.append(data_claim(inputs, f))
    return out


def finetune_claim(inputs: Inputs, st: Studies, f: Findings, crossed) -> an.Claim:
    """Fine-tuning a pretrained ViT beats training it from scratch (the reference: 91.94% after
    4.35 h against a 36 h scratch schedule). Time to accuracy and accuracy at equal steps are one
    claim: read from the budget curves, every budget both arms ran."""
    ft = reference.FINETUNE
    ref = f"{ft['cifar100_top1']:.2%} CIFAR-100 in {ft['hours']:g} h vs ~{reference.TIME['eta_h_text']:g} h scratch ETA"
    claim = "fine-tuning a pretrained ViT beats training it from scratch (pretraining not counted)"
    test = "fine-tuned minus scratch test top-1 > 0 at every budget run, Holm-adjusted p < 0.05"
    budget = budget_comparisons(f)
    if budget:
        words = [c.verdict for c in budget] + ([crossed.verdict] if crossed else [])
        verdict = words[0] if len(set(words)) == 1 else vd.DEPENDS
        this = "; ".join(f"{c.key.split('.')[0].split('_')[1]} steps {_pts(c.diff)} pts" for c in budget)
        if crossed:
            this += f"; over {crossed.pretraining_runs} pretraining runs {_pts(crossed.diff)} pts"
        return an.Claim(
            "4",
            claim,
            ref,
            this,
            verdict,
            STUDY,
            test=test,
            key="finetune.beats_scratch",
            why="" if verdict != vd.DEPENDS else "depends on the budget",
        )
    c = an.finetune_comparison(inputs)
    if c is None:
        return an.Claim(
            "4",
            claim,
            ref,
            "no variant has the scratch network",
            vd.UNTESTED,
            test=test,
            key="finetune.beats_scratch",
            why="no like-for-like variant",
        )
    p = f.holm.get("finetune_minus_scratch", math.nan)
    return an.Claim(
        "4",
        claim,
        ref,
        f"{c.seeds.mean * 100:+.1f} pts at {inputs.scratch.train.get('steps')} steps",
        word_by_p(c.seeds.mean, p),
        an.MEASURED,
        test=test,
        key="finetune.beats_scratch",
    )


MATCHED = 2.0  # a CNN "matched in size": its parameters within 2x of the ViT's


def data_claim(inputs: Inputs, f: Findings) -> an.Claim:
    """Tested only against a CNN matched in size: otherwise the sweep's numbers are reported and
    the row says what a test would take."""
    claim = "a ViT needs more data than a CNN (its conclusion)"
    ref = "argued from the literature; not measured"
    test = f"with a CNN within {MATCHED:g}x the ViT's parameters: its lead shrinks with more data, Holm p < 0.05"
    if f.data is None:
        return an.Claim(
            "6",
            claim,
            ref,
            "no data sweep",
            vd.UNTESTED,
            test=test,
            key="data.efficiency",
            why="run `dvc repro studies/dvc.yaml` (its data_sweep stages)",
        )
    d = f.data
    p = f.holm.get("data_efficiency.interaction", math.nan)
    leads = ", ".join(f"{k:g}: {_pts(v)}" for k, v in d["leads"].items())
    this = (
        f"the CNN's lead by share of the training split {leads} points; it shrinks by {_pts(d['interaction'])} "
        f"[{_pts(d['lo'])}, {_pts(d['hi'])}], Holm p {p_text(p)} "
        f"({', '.join(s.cite.strip('()') for s in d['studies'])})"
    )
    ratio = vd.params_ratio(d["cnn"], inputs.doc.get("model") or {}, inputs.num_classes or 10, inputs.image_size)
    if ratio is None or not 1 / MATCHED <= ratio <= MATCHED:
        size = f"{ratio:.0f}x the ViT's parameters" if ratio else "of unknown size"
        return an.Claim(
            "6",
            claim,
            ref,
            this,
            vd.UNTESTED,
            test=test,
            key="data.efficiency",
            why=f"the sweep's CNN ({d['cnn']}) is {size} and every share trains "
            f"{d['small']['steps']} steps; a test needs a CNN of about the ViT's size (not in the "
            "model registry) and a budget per share long enough for both to converge",
        )
    return an.Claim("6", claim, ref, this, word_by_p(d["interaction"], p), STUDY, test=test, key="data.efficiency")


def question_claims(inputs: Inputs, st: Studies, f: Findings, equal) -> list[an.Claim]:
    out = []
    test = "fine-tuned minus scratch > 0, Holm-adjusted p < 0.05"
    if equal is not None:
        out.append(
            an.Claim(
                "4",
                "fine-tuning beats scratch at equal total training FLOPs, pretraining counted",
                "not measured (its weights were downloaded)",
                comparison_text(equal),
                equal.verdict,
                STUDY,
                test=test,
                kind=QUESTION,
                key="finetune.equal_compute",
            )
        )
    else:
        out.append(
            an.Claim(
                "4",
                "fine-tuning beats scratch at equal total training FLOPs, pretraining counted",
                "not measured",
                "no equal-compute study",
                vd.UNTESTED,
                test=test,
                kind=QUESTION,
                key="finetune.equal_compute",
                why="run `dvc repro studies/dvc.yaml:equal_compute`",
            )
        )
    timed = [
        c
        for c in an.finetune_claims(inputs)[0]
        if c.claim.startswith(an.TIME_CLAIM) and not c.claim.endswith("not counted")
    ]
    for c in timed:
        c.kind, c.key = QUESTION, "finetune.time_with_pretraining"
        c.claim = "fine-tuning reaches scratch's final accuracy sooner, pretraining counted"
        c.test = "every seed's time below every scratch seed's (ranges apart)"
        c.reference, c.this_run = "not counted", c.this_run.split(";")[0].replace("time to", "to")
        out.append(c)
    for c in f.comparisons:
        if c.key.endswith("adamw_minus_sgd"):
            out.append(
                an.Claim(
                    "4",
                    "the fine-tuning optimiser matters: AdamW (scratch's recipe) beats SGD",
                    "SGD momentum 0.9 (its Algorithm 2)",
                    comparison_text(c),
                    c.verdict,
                    STUDY,
                    test="AdamW minus SGD > 0, Holm-adjusted p < 0.05",
                    kind=QUESTION,
                    key="finetune.optimizer",
                )
            )
    rows = list(an.baseline_differences(inputs).itertuples())
    if rows:
        ps = {r.run: f.holm.get(f"{r.run}_minus_{r.baseline}", math.nan) for r in rows}
        words = [word_by_p(r.diff.mean, ps[r.run]) for r in rows]
        out.append(
            an.Claim(
                "5",
                f"the ViT beats the CNN baseline ({rows[0].baseline}) on this data, at "
                f"{inputs.scratch.train.get('steps')} steps",
                "not compared",
                "; ".join(f"{r.run} {_pts(r.diff.mean)} pts" for r in rows),
                words[0] if len(set(words)) == 1 else vd.DEPENDS,
                an.MEASURED,
                test="ViT minus CNN > 0 per ViT run, Holm-adjusted p < 0.05",
                kind=QUESTION,
                key="baseline.vit_vs_cnn",
            )
        )
    return out


def count_sentence(claims: list[an.Claim], what: str) -> str:
    words = [vd.HOLDS, vd.FAILS, vd.DEPENDS, vd.INCONCLUSIVE, vd.UNTESTED]
    n = {w: sum(c.verdict == w for c in claims) for w in words}
    tested = [c for c in claims if c.verdict != vd.UNTESTED]
    by = {e: sum(c.evidence == e for c in tested) for e in (an.MEASURED, STUDY, an.COMPUTED)}
    parts = ", ".join(f"{w}: {n[w]}" for w in words)
    rest = ", ".join(f"{k} {e}" for e, k in by.items() if k)
    return f"{what}: {len(claims)} rows ({parts}); of the {len(tested)} tested, {rest}."
