"""Verdicts that need more than one run of the default pipeline: the reference's claims scored at
two settings (vitpipe's assumption and the reference's own), claim 3 on computation, and the
accuracy claims read from the studies pipeline's curves, with an interval that holds pretraining,
seed and test-set noise and Holm's correction over every comparison the report makes."""

from __future__ import annotations

import math
from dataclasses import dataclass

from vitpipe.costmodel import compute, reference
from vitpipe.costmodel.devices import get_device
from vitpipe.errors import UserError
from vitpipe.models import model_config
from vitpipe.report import stats
from vitpipe.report.studies import Studies, Study, correct

HOLDS, FAILS, INCONCLUSIVE, UNTESTED = "holds", "does not hold", "inconclusive", "not tested"
DEPENDS = "depends on the setting"
ALPHA = 1 - stats.CONFIDENCE
GB = 1e9  # the reference speaks GB (its 16 GB T4, 17.92 GB); vitpipe GiB
GIB = 2**30


# ---------------------------------------------------------------------------------------
# Two settings for the memory and time claims


@dataclass(frozen=True)
class Setting:
    name: str
    image_size: int
    batch: int  # the effective batch (512 in both)
    micro_batch: int  # what one forward/backward holds in memory
    optimizer: str
    attention: str
    precision: str
    device: str

    @property
    def text(self) -> str:
        at_once = (
            "the whole batch at once"
            if self.micro_batch == self.batch
            else (f"micro-batch {self.micro_batch} x {self.batch // self.micro_batch} accumulation steps")
        )
        return (
            f"{self.image_size} px, batch {self.batch} as {at_once}, {self.optimizer.upper() if self.optimizer == 'sgd' else self.optimizer}"
            f"{' momentum' if self.optimizer == 'sgd' else ''}, {self.precision}, {self.attention} attention"
        )


def assumed_setting(profile: dict) -> Setting:
    """What vitpipe's `profile:` section assumes (224 px, the whole batch at once, AdamW)."""
    return Setting(
        "vitpipe's assumption (`profile:`)",
        int(profile.get("image_size") or 224),
        int(profile.get("batch_size") or 512),
        int(profile.get("batch_size") or 512),
        profile.get("optimizer", "adamw"),
        profile.get("attention", "sdpa"),
        profile.get("precision", "fp32"),
        profile.get("device", "t4"),
    )


def reference_setting() -> Setting:
    """The setting the reference most likely ran (costmodel.reference.REFERENCE_SETTING)."""
    r = reference.REFERENCE_SETTING
    return Setting(
        "the reference's (vit_jax CIFAR preset)",
        r["image_size"],
        r["batch"],
        r["scratch"]["micro_batch"],
        r["optimizer"],
        r["attention"],
        r["precision"],
        r["device"],
    )


def memory_at(model: str, s: Setting, num_classes: int = 100) -> dict:
    """Training memory of `model` at setting `s`: needed bytes (peak + slack + CUDA context)
    against the device, for one micro-batch."""
    device = get_device(s.device)
    cfg = model_config({"arch": model}, num_classes, s.image_size)
    mem = compute.memory(cfg, s.micro_batch, s.precision, s.optimizer, s.attention)
    need = compute.required_bytes(mem["peak"], device)
    return {
        "model": model,
        "setting": s.name,
        "required_bytes": need,
        "capacity_bytes": device.memory_bytes,
        "ratio": need / device.memory_bytes,
        "fits": need <= device.memory_bytes,
    }


def combine(words: list[str]) -> str:
    """One verdict over settings: the same everywhere, or 'depends on the setting'."""
    tested = [w for w in words if w != UNTESTED]
    if not tested:
        return UNTESTED
    return tested[0] if len(set(tested)) == 1 else DEPENDS


def memory_verdicts(settings: list[Setting], models=("vit_b8", "vit_b16", "vit_b32")) -> list[dict]:
    """Per model: the reference's observation, and per setting whether vitpipe's model agrees."""
    out = []
    for model in models:
        ref = reference.MEMORY[model]
        at = [memory_at(model, s) for s in settings]
        words = [HOLDS if m["fits"] == ref["fits"] else FAILS for m in at]
        out.append(
            {
                "model": model,
                "ref_fits": ref["fits"],
                "ref_ratio": ref["fraction_of_gpu"],
                "ref_gb": ref.get("used_gb") or ref.get("needed_gb"),
                "at": at,
                "words": words,
                "verdict": combine(words),
            }
        )
    return out


# ---------------------------------------------------------------------------------------
# Claim 3: the deepest ResNet is comparable to a simple ViT, in computation

COMPARABLE = 2.0  # "comparable": within a factor of 2 either way (printed in the report)


def flops_comparison(size: int = 224, classes: int = 1000) -> dict:
    """Forward FLOPs per image of ResNet-101 against ViT-Base at patch 16 and 32."""

    def fwd(m):
        return compute.flops(model_config({"arch": m}, classes, size))["forward"]

    r101 = fwd("resnet101")
    ratios = {m: r101 / fwd(m) for m in ("vit_b16", "vit_b32")}
    words = [HOLDS if 1 / COMPARABLE <= r <= COMPARABLE else FAILS for r in ratios.values()]
    return {"ratios": ratios, "words": words, "verdict": combine(words), "gflops": r101 / 1e9}


# ---------------------------------------------------------------------------------------
# Accuracy from the studies pipeline


@dataclass
class Comparison:
    """Arm a minus arm b on test top-1, with the hierarchical bootstrap's interval and p, and
    the studies it came from. `pretraining_runs`: how many pretraining runs the fine-tuned arm
    spans (1: conditional on that one run)."""

    key: str
    label: str
    a: str
    b: str
    mean_a: float
    mean_b: float
    diff: float
    lo: float
    hi: float
    p: float
    pretraining_runs: int
    seeds: int
    studies: list[Study]
    p_holm: float = math.nan

    @property
    def verdict(self) -> str:
        """'a beats b': by Holm's adjusted p at ALPHA, in the direction of the observed difference."""
        p = self.p_holm if not math.isnan(self.p_holm) else self.p
        if math.isnan(p) or p >= ALPHA:
            return INCONCLUSIVE
        return HOLDS if self.diff > 0 else FAILS

    @property
    def cite(self) -> str:
        return ", ".join(s.cite.strip("()") for s in self.studies)

    @property
    def stale(self) -> bool:
        return any(s.stale for s in self.studies)

    @property
    def conditioning(self) -> str:
        return (
            "over " + f"{self.pretraining_runs} pretraining runs"
            if self.pretraining_runs > 1
            else "conditional on 1 pretraining run"
            if self.pretraining_runs == 1
            else "no pretraining"
        )


def _runs(study: Study) -> list[list[list[int]]]:
    """A budget study's chosen-lr runs as one group: [[seed][image]]."""
    return [[correct(r) for r in study.record["runs"]]]


def compare(
    key: str, label: str, a: tuple[str, list, int], b: tuple[str, list, int], studies: list[Study]
) -> Comparison:
    (name_a, groups_a, pre_a), (name_b, groups_b, pre_b) = a, b
    diff, lo, hi, p = stats.hierarchical_bootstrap(groups_a, groups_b)
    mean = [
        sum(sum(s) / len(s) for g in groups for s in g) / sum(len(g) for g in groups) for groups in (groups_a, groups_b)
    ]
    return Comparison(
        key,
        label,
        name_a,
        name_b,
        mean[0],
        mean[1],
        diff,
        lo,
        hi,
        p,
        max(pre_a, pre_b),
        min(sum(len(g) for g in groups_a), sum(len(g) for g in groups_b)),
        studies,
    )


def budget_comparisons(st: Studies) -> list[Comparison]:
    """Fine-tuned minus scratch at every budget both arms ran; the optimiser ablation at its
    budgets (fine-tuning with scratch's AdamW recipe minus fine-tuning with SGD)."""
    out = []
    for (arm, steps), ft in sorted(st.budgets.items()):
        if arm == "finetune" and ("scratch", steps) in st.budgets:
            sc = st.budgets[("scratch", steps)]
            out.append(
                compare(
                    f"budget_{steps}.finetune_minus_scratch",
                    f"fine-tuned vs scratch at {steps} steps",
                    ("fine-tuned", _runs(ft), 1),
                    ("scratch", _runs(sc), 0),
                    [ft, sc],
                )
            )
        if arm == "finetune_adamw" and ("finetune", steps) in st.budgets:
            sgd = st.budgets[("finetune", steps)]
            out.append(
                compare(
                    f"budget_{steps}.adamw_minus_sgd",
                    f"fine-tuning with AdamW vs SGD at {steps} steps",
                    ("AdamW", _runs(ft), 1),
                    ("SGD", _runs(sgd), 1),
                    [ft, sgd],
                )
            )
    return out


def crossed_comparison(st: Studies) -> Comparison | None:
    """Fine-tuned (every pretraining run x every seed) minus scratch at the same budget: the
    interval holds pretraining noise too."""
    if st.crossed is None:
        return None
    rec = st.crossed.record
    sc = st.budgets.get(("scratch", int(rec["steps"])))
    if sc is None:
        return None
    groups = [[correct(r) for r in g["runs"]] for g in rec["groups"]]
    return compare(
        f"budget_{rec['steps']}.finetune_minus_scratch_over_pretraining",
        f"fine-tuned ({len(groups)} pretraining runs) vs scratch at {rec['steps']} steps",
        ("fine-tuned", groups, len(groups)),
        ("scratch", _runs(sc), 0),
        [st.crossed, sc],
    )


def pretraining_spread(st: Studies) -> dict | None:
    """The crossed design's two sources of spread: between pretraining runs (sd of their means)
    and between fine-tuning seeds within a run (pooled sd), in accuracy."""
    if st.crossed is None:
        return None
    groups = [[r["test_top1"] for r in g["runs"]] for g in st.crossed.record["groups"]]
    means = [sum(g) / len(g) for g in groups]
    between = stats.over_seeds(means).sd
    within = math.sqrt(sum(stats.over_seeds(g).sd ** 2 for g in groups) / len(groups))
    return {
        "means": means,
        "pretrain_seeds": [g["pretrain_seed"] for g in st.crossed.record["groups"]],
        "between": between,
        "within": within,
        "study": st.crossed,
    }


def equal_compute_comparison(st: Studies) -> Comparison | None:
    """Fine-tuned at its budget minus scratch trained for the same total training FLOPs
    (pretraining counted), on the seeds both have."""
    if st.equal_compute is None:
        return None
    rec = st.equal_compute.record
    ft = st.budgets.get(("finetune", int(rec["finetune_steps"])))
    if ft is None:
        return None
    seeds = {r["seed"] for r in rec["runs"]}
    ft_runs = [correct(r) for r in ft.record["runs"] if r["seed"] in seeds]
    return compare(
        "equal_compute.finetune_minus_scratch",
        f"fine-tuned {rec['finetune_steps']} steps vs scratch {rec['steps']:,} steps (equal training FLOPs)",
        ("fine-tuned", [ft_runs], 1),
        ("scratch", [[correct(r) for r in rec["runs"]]], 0),
        [ft, st.equal_compute],
    )


def data_efficiency(st: Studies) -> dict | None:
    """The reference's conclusion, a ViT needs more data than a CNN: the CNN's lead over the
    ViT (both from scratch, each tuned at every share) is larger on the smallest share than on
    the whole training split. The difference of the two leads gets the paired bootstrap (the
    same test images score every run; seeds resampled within each)."""
    if len(st.data_sweep) < 2:
        return None
    points = [s.record for s in st.data_sweep]
    small, full = points[0], points[-1]

    def arm(point, kind):
        return [correct(r) for r in point[kind]["runs"]]

    # lead(share) = CNN - ViT; interaction = lead(small) - lead(full) = (cnn_s + vit_f) - (vit_s + cnn_f)
    import numpy as np

    # per image, the sum of two runs' correctness (0, 1 or 2): its mean is the sum of their accuracies
    plus = [np.add(x, y) for x, y in zip(arm(small, "cnn"), arm(full, "vit"))]
    minus = [np.add(x, y) for x, y in zip(arm(small, "vit"), arm(full, "cnn"))]
    diff, lo, hi, p = stats.hierarchical_bootstrap([plus], [minus])
    leads = {
        pt["fraction"]: sum(r["test_top1"] for r in pt["cnn"]["runs"]) / len(pt["cnn"]["runs"])
        - sum(r["test_top1"] for r in pt["vit"]["runs"]) / len(pt["vit"]["runs"])
        for pt in points
    }
    return {
        "points": points,
        "leads": leads,
        "interaction": diff,
        "lo": lo,
        "hi": hi,
        "p": p,
        "studies": st.data_sweep,
        "cnn": st.data_cnn,
        "small": small,
        "full": full,
    }


def params_ratio(cnn: str, vit_spec: dict, num_classes: int, image_size: int) -> float | None:
    """Parameters of the CNN variant's network over the ViT's (None when either cannot be built)."""
    try:
        c = compute.param_counts(model_config({"arch": cnn}, num_classes, image_size))["total"]
        v = compute.param_counts(model_config(vit_spec, num_classes, image_size))["total"]
    except (UserError, KeyError, ValueError):  # a name outside the registry: the size is unknown
        return None
    return c / v
