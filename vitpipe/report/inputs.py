"""The report's inputs: what the other stages wrote (params.yaml, metrics/, plots/, profile/,
data/prepared/), read by name into dicts and pandas frames.

A missing file reads as empty, so a report can be built from a partial pipeline; the section
that needs it then says what is missing. Extra columns and keys are ignored."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from vitpipe import params, pipeline
from vitpipe.report import studies as studies_results
from vitpipe.report.studies import Studies

SCRATCH = pipeline.SCRATCH


@dataclass
class Run:
    """One trained network over its seeds: the scratch run (Algorithm 1) or a fine-tuned
    variant (Algorithm 2). `train`, `test`, `curve` and `evals` are the means over seeds (what
    one-number sections read); the per-seed lists are what the intervals are made of."""

    name: str
    spec: dict  # the network: params.yaml `model:` or `variants.<name>`
    recipe: params.TrainParams | None  # the recipe that trained it (variant overrides applied)
    seeds: list[int]
    trains: list[dict]  # metrics/train_scratch/seed-<s>.json | metrics/finetune/<name>/seed-<s>.json
    tests: list[dict]  # metrics/evaluate/<name>/seed-<s>.json
    pretrain: dict  # metrics/pretrain/<name>.json ({} for scratch)
    curves: list[pd.DataFrame]  # plots/.../seed-<s>/train.tsv (per optimizer step)
    evals_by_seed: list[pd.DataFrame]  # plots/.../seed-<s>/eval.tsv (per evaluation)
    corrects: list[list[bool] | None] = field(default_factory=list)  # eval/<name>/seed-<s>/predictions.csv:
    #                                     per test image (store order), whether the model got it right

    @property
    def train(self) -> dict:
        return mean_dict(self.trains)

    @property
    def test(self) -> dict:
        return mean_dict(self.tests)

    @property
    def curve(self) -> pd.DataFrame:
        return mean_frame(self.curves)

    @property
    def evals(self) -> pd.DataFrame:
        return mean_frame(self.evals_by_seed)

    @property
    def top1s(self) -> list[float | None]:
        """Test top-1 per seed, in the order of `seeds` (None where that seed has no result)."""
        return [t.get("top1") for t in self.tests]

    @property
    def is_scratch(self) -> bool:
        return self.name == SCRATCH

    @property
    def label(self) -> str:
        return "scratch (Alg. 1)" if self.is_scratch else f"{self.name} fine-tuned (Alg. 2)"

    @property
    def is_cnn(self) -> bool:
        """A convolutional network (ResNet, ConvNeXt): its family has no token attention."""
        from vitpipe.models import family_of

        family = family_of(self.spec.get("arch"))
        return family is not None and not family.attention

    @property
    def params(self) -> int | None:
        return self.test.get("params", self.train.get("params"))

    @property
    def top1(self) -> float | None:
        return self.test.get("top1")

    @property
    def train_s(self) -> float | None:
        return self.train.get("wall_time_s")

    @property
    def pretrain_s(self) -> float:
        """Pretraining wall time paid for this run's starting weights (0: none, or imported)."""
        return float(self.pretrain.get("wall_time_s") or 0.0)

    @property
    def peak_memory_mb(self) -> float | None:
        """The best memory reading the training stage made: CUDA allocator peak, else RSS."""
        return self.train.get("peak_cuda_allocated_mb") or self.train.get("peak_rss_mb")


def mean_dict(ds: list[dict]) -> dict:
    """Numbers averaged over the seeds that have them; other values from the first seed."""
    ds = [d for d in ds if d]
    if not ds:
        return {}
    out = dict(ds[0])
    for k, v in ds[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            vals = [d[k] for d in ds if isinstance(d.get(k), (int, float))]
            out[k] = vals[0] if len(set(vals)) == 1 else sum(vals) / len(vals)  # steps stay 150, not 150.0
    return out


def mean_frame(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Per-step means over the seeds' series (steps every seed reached)."""
    frames = [f for f in frames if not f.empty and "step" in f]
    if not frames:
        return pd.DataFrame()
    if len(frames) == 1:
        return frames[0]
    both = pd.concat(frames)
    counts = both.groupby("step").size()
    mean = both.groupby("step", as_index=False).mean(numeric_only=True)
    return mean[mean.step.map(counts) == len(frames)].reset_index(drop=True)


@dataclass
class Inputs:
    doc: dict  # params.yaml
    meta: dict  # data/prepared/<dataset>/meta.json
    prepared: Path  # data/prepared/<dataset>
    runs: list[Run]
    profile: dict  # metrics/profile.json
    compute: pd.DataFrame  # profile/compute.csv: one row per model on profile.device
    devices: pd.DataFrame  # profile/devices.csv: one row per model x device profile
    missing: list[str] = field(default_factory=list)  # expected files that were not there
    studies: Studies = field(default_factory=Studies)  # studies/results/ (studies/dvc.yaml), with staleness

    @property
    def image_size(self) -> int:
        return int(self.meta.get("image_size") or self.doc["data"]["image_size"])

    @property
    def num_classes(self) -> int | None:
        return self.meta.get("num_classes")

    @property
    def dataset(self) -> str:
        return self.meta.get("dataset") or self.doc["data"]["dataset"]

    @property
    def scratch(self) -> Run:
        return self.runs[0]


class _Reader:
    """Reads files under `root`, remembering which were missing."""

    def __init__(self, root: Path):
        self.root = root
        self.missing: list[str] = []

    def _path(self, rel: str | Path) -> Path | None:
        path = self.root / rel
        if path.exists():
            return path
        self.missing.append(str(rel))
        return None

    def json(self, rel) -> dict:
        path = self._path(rel)
        return json.loads(path.read_text()) if path else {}

    def table(self, rel, sep=",") -> pd.DataFrame:
        path = self._path(rel)
        return pd.read_csv(path, sep=sep) if path else pd.DataFrame()

    def correct(self, rel) -> list[bool] | None:
        """Per test image, predicted == actual (predictions.csv: actual,predicted in store order)."""
        t = self.table(rel)
        if t.empty or not {"actual", "predicted"} <= set(t.columns):
            return None
        return (t.actual.astype(str) == t.predicted.astype(str)).tolist()


def _recipe(doc: dict, section: str, variant: str | None) -> params.TrainParams | None:
    try:
        return params.train_params(doc, section, variant)
    except Exception:  # a recipe the training stage would refuse: the report still renders
        return None


def load(root: Path | str = ".", check_stale: bool = True) -> Inputs:
    root = Path(root)
    doc = yaml.safe_load((root / params.PARAMS_FILE).read_text())
    read = _Reader(root)
    prepared = pipeline.prepared_dir(doc["data"]["dataset"])
    meta = read.json(prepared / "meta.json")
    seeds = list(doc.get("seeds") or [0])

    def run(name, spec, recipe, pretrain):
        return Run(
            name,
            dict(spec),
            recipe,
            seeds,
            [read.json(pipeline.train_metrics(name, s)) for s in seeds],
            [read.json(pipeline.eval_metrics(name, s)) for s in seeds],
            pretrain,
            [read.table(pipeline.steplog(name, s) / pipeline.TRAIN_LOG, "\t") for s in seeds],
            [read.table(pipeline.steplog(name, s) / pipeline.EVAL_LOG, "\t") for s in seeds],
            [read.correct(pipeline.eval_dir(name, s) / pipeline.PREDICTIONS) for s in seeds],
        )

    runs = [run(SCRATCH, doc["model"], _recipe(doc, "train", None), {})]
    for name, spec in (doc.get("variants") or {}).items():
        runs.append(run(name, spec, _recipe(doc, "finetune", name), read.json(pipeline.pretrain_metrics(name))))
    return Inputs(
        doc=doc,
        meta=meta,
        prepared=root / prepared,
        runs=runs,
        profile=read.json(pipeline.PROFILE_METRICS),
        compute=read.table(pipeline.PROFILE_COMPUTE),
        devices=read.table(pipeline.PROFILE_DEVICES),
        missing=read.missing,
        studies=studies_results.load(root, check_stale),
    )
