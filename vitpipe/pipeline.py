"""The pipeline, described once: each stage's name, script, params sections, what it runs
over (foreach / matrix) and the paths it writes, as functions of (params, variant, seed).

dvc.yaml stays the file DVC and people read; its code deps and its plots are written from
this manifest and the import graph (`python scripts/stage_code.py --write`), and a test
checks that its stages, scripts, params and outputs are the ones named here. The stages,
the report, the scripts and the CLI read their paths from here, so a path is spelled once.

A path function takes the run's names: `scratch_weights(0)` is a path, `scratch_weights(SEED)`
the template dvc.yaml writes (`models/scratch/seed-${item.seed}/model.pt`). The bottom layer:
no torch, no other vitpipe module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path as P

SCRATCH = "scratch"  # the run name of Algorithm 1 (eval/scratch/, metrics/evaluate/scratch/)

# dvc.yaml's placeholders: the path functions below give dvc.yaml's templates when called with them
SEED, VARIANT, KEY, DATASET = "${item.seed}", "${item.variant}", "${key}", "${data.dataset}"

PARAMS_OK = P("metrics/params_ok.txt")  # validate's output; in git, so a fresh clone has it


# ---------------------------------------------------------------------------------------
# Paths


def raw_dir(dataset: str) -> P:
    return P("data/raw") / dataset


def prepared_dir(dataset: str) -> P:
    return P("data/prepared") / dataset


def pretrained_weights(variant: str) -> P:
    return P("models/pretrained") / f"{variant}.pt"


def pretrain_metrics(variant: str) -> P:
    return P("metrics/pretrain") / f"{variant}.json"


def pretrain_steplog(variant: str) -> P:
    """Folder of train.tsv / eval.tsv of pretrain@<variant>."""
    return P("plots/pretrain") / variant


def _seed(seed) -> str:
    return f"seed-{seed}"


def scratch_weights(seed) -> P:
    return P("models/scratch") / _seed(seed) / "model.pt"


def finetune_weights(variant: str, seed) -> P:
    return P("models/finetune") / variant / _seed(seed) / "model.pt"


def trained_weights(run: str, seed) -> P:
    """The weights evaluate@<run> reads: run is `scratch` or a variant."""
    return scratch_weights(seed) if run == SCRATCH else finetune_weights(run, seed)


def train_metrics(run: str, seed) -> P:
    """metrics of train_scratch@<seed> (run `scratch`) or finetune@<variant>-<seed>."""
    if run == SCRATCH:
        return P("metrics/train_scratch") / f"{_seed(seed)}.json"
    return P("metrics/finetune") / run / f"{_seed(seed)}.json"


def steplog(run: str, seed) -> P:
    """Folder of train.tsv / eval.tsv of train_scratch@<seed> or finetune@<variant>-<seed>."""
    if run == SCRATCH:
        return P("plots/train_scratch") / _seed(seed)
    return P("plots/finetune") / run / _seed(seed)


def eval_metrics(run: str, seed) -> P:
    return P("metrics/evaluate") / run / f"{_seed(seed)}.json"


def eval_dir(run: str, seed) -> P:
    """classes.json, attention.npz and predictions.csv of one evaluated run."""
    return P("eval") / run / _seed(seed)


TRAIN_LOG, EVAL_LOG = "train.tsv", "eval.tsv"  # the files of a step-log folder
PREDICTIONS = "predictions.csv"
PREPROCESS_METRICS = P("metrics/preprocess.json")
PROFILE_METRICS, PROFILE_COMPUTE, PROFILE_DEVICES = (
    P("metrics/profile.json"),
    P("profile/compute.csv"),
    P("profile/devices.csv"),
)
SUMMARY = P("metrics/summary.json")
REPORT_MD, REPORT_HTML, REPORT_FIGURES = P("reports/report.md"), P("reports/report.html"), P("reports/figures")
# The studies pipeline (studies/dvc.yaml): the report reads its records (studies/results/) and knobs.
# The report stage depends on its dvc.lock, which changes whenever a study reruns, not on the
# records: a dep on another stage's output would put every studies stage upstream of the report,
# and a default `dvc repro` would rerun the stale ones (about 20 minutes).
STUDIES_PARAMS, STUDIES_LOCK = P("studies/params.yaml"), P("studies/dvc.lock")


# ---------------------------------------------------------------------------------------
# Stages


@dataclass(frozen=True)
class Plot:
    """A per-step series a stage writes, drawn by `dvc plots` (a stage-level plot, so DVC
    expands it with the stage's foreach/matrix: every run of params.yaml has its curves and
    no entry names a file that cannot exist)."""

    path: str
    props: dict


@dataclass(frozen=True)
class Stage:
    name: str
    script: str  # stages/<name>.py
    params: tuple[str, ...]  # the params.yaml keys dvc.yaml lists (`params.yaml` alone: every key)
    over: dict = field(default_factory=dict)  # matrix axis -> params key ({"seed": "seeds"}); foreach: {"key": ...}
    outs: tuple[str, ...] = ()  # its outs and metrics as dvc.yaml writes them (templates)
    plots: tuple[Plot, ...] = ()
    args: tuple[str, ...] = ()  # the script's arguments (templates): `python <script> <args>`


def _curves(folder: P) -> tuple[Plot, ...]:
    """A training run's step log: the loss per optimizer step, and validation top-1."""
    return (
        Plot(
            str(folder / TRAIN_LOG),
            {
                "x": "step",
                "y": "loss",
                "title": "training loss per optimizer step",
                "x_label": "optimizer step",
                "y_label": "cross-entropy loss",
            },
        ),
        Plot(
            str(folder / EVAL_LOG),
            {
                "x": "step",
                "y": "val_acc",
                "title": "validation top-1",
                "x_label": "optimizer step",
                "y_label": "validation top-1 (fraction)",
            },
        ),
    )


def _confusion(folder: P) -> tuple[Plot, ...]:
    return (Plot(str(folder / PREDICTIONS), {"template": "confusion", "x": "actual", "y": "predicted"}),)


def stages() -> list[Stage]:
    """Every stage of dvc.yaml, in its order."""
    recipe_data = ("data.dataset", "data.train_fraction")
    return [
        Stage("validate", "stages/validate.py", ("params.yaml",), outs=(str(PARAMS_OK),)),
        Stage(
            "download",
            "stages/download.py",
            ("data.dataset", "data.archive", "data.url", "data.md5"),
            outs=(str(raw_dir(DATASET)),),
        ),
        Stage(
            "preprocess",
            "stages/preprocess.py",
            ("data.image_size", "data.split", "data.seed"),
            outs=(str(prepared_dir(DATASET)), str(PREPROCESS_METRICS)),
        ),
        Stage(
            "profile",
            "stages/profile_compute.py",
            ("profile",),
            outs=(str(PROFILE_COMPUTE), str(PROFILE_DEVICES), str(PROFILE_METRICS)),
        ),
        Stage(
            "pretrain",
            "stages/pretrain.py",
            ("variants.${key}", "pretrain", "data.image_size"),
            over={"key": "variants"},
            args=(KEY,),
            outs=(str(pretrained_weights(KEY)), str(pretrain_metrics(KEY))),
            plots=_curves(pretrain_steplog(KEY)),
        ),
        Stage(
            "train_scratch",
            "stages/train_scratch.py",
            ("model", "train", *recipe_data),
            over={"seed": "seeds"},
            args=(SEED,),
            outs=(str(scratch_weights(SEED)), str(train_metrics(SCRATCH, SEED))),
            plots=_curves(steplog(SCRATCH, SEED)),
        ),
        Stage(
            "finetune",
            "stages/finetune.py",
            (f"variants.{VARIANT}", "finetune", *recipe_data),
            over={"variant": "variants", "seed": "seeds"},
            args=(VARIANT, SEED),
            outs=(str(finetune_weights(VARIANT, SEED)), str(train_metrics(VARIANT, SEED))),
            plots=_curves(steplog(VARIANT, SEED)),
        ),
        Stage(
            "evaluate_scratch",
            "stages/evaluate.py",
            ("evaluate",),
            over={"seed": "seeds"},
            args=(SCRATCH, SEED),
            outs=(
                str(eval_dir(SCRATCH, SEED) / "classes.json"),
                str(eval_dir(SCRATCH, SEED) / "attention.npz"),
                str(eval_metrics(SCRATCH, SEED)),
            ),
            plots=_confusion(eval_dir(SCRATCH, SEED)),
        ),
        Stage(
            "evaluate",
            "stages/evaluate.py",
            ("evaluate",),
            over={"variant": "variants", "seed": "seeds"},
            args=(VARIANT, SEED),
            outs=(
                str(eval_dir(VARIANT, SEED) / "classes.json"),
                str(eval_dir(VARIANT, SEED) / "attention.npz"),
                str(eval_metrics(VARIANT, SEED)),
            ),
            plots=_confusion(eval_dir(VARIANT, SEED)),
        ),
        Stage(
            "report",
            "stages/report.py",
            ("seeds", "data", "model", "train", "finetune", "pretrain", "variants", "profile"),
            outs=(str(SUMMARY), str(REPORT_MD), str(REPORT_HTML), str(REPORT_FIGURES)),
        ),
    ]


def stage(name: str) -> Stage:
    return next(s for s in stages() if s.name == name)


def training_runs(doc: dict) -> list[tuple[str, str, str | None]]:
    """The training stages one params file makes, as (stage name, recipe section, variant):
    train_scratch (once: its seeds share the network and recipe), pretrain@<v> where the
    variant is pretrained here (source fractal), finetune@<v>. What the planner costs."""
    runs = [("train_scratch", "train", None)]
    for v, spec in (doc.get("variants") or {}).items():
        if (spec or {}).get("source", "fractal") == "fractal":
            runs.append((f"pretrain@{v}", "pretrain", v))
        runs.append((f"finetune@{v}", "finetune", v))
    return runs


def run_names(doc: dict) -> list[str]:
    """The trained networks the report compares: `scratch`, then each variant in order."""
    return [SCRATCH, *(doc.get("variants") or {})]


def expand(template: str, **names) -> str:
    """A dvc.yaml template with the run's names filled in: expand(steplog(VARIANT, SEED), variant='vit_tiny', seed=0)."""
    for placeholder, key in ((SEED, "seed"), (VARIANT, "variant"), (KEY, "key"), (DATASET, "dataset")):
        if key in names:
            template = template.replace(placeholder, str(names[key]))
    return template
