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

from vitpipe import params

SCRATCH = "scratch"


@dataclass
class Run:
    """One trained network: the scratch run (Algorithm 1) or a fine-tuned variant (Algorithm 2)."""
    name: str
    spec: dict               # the network: params.yaml `model:` or `variants.<name>`
    recipe: params.TrainParams | None   # the recipe that trained it (variant overrides applied)
    train: dict              # metrics/train_scratch.json | metrics/finetune/<name>.json
    test: dict               # metrics/evaluate/<name>.json
    pretrain: dict           # metrics/pretrain/<name>.json ({} for scratch)
    curve: pd.DataFrame      # plots/.../train.tsv (per optimizer step)
    evals: pd.DataFrame      # plots/.../eval.tsv (per evaluation)

    @property
    def is_scratch(self) -> bool:
        return self.name == SCRATCH

    @property
    def label(self) -> str:
        return "scratch (Alg. 1)" if self.is_scratch else f"{self.name} fine-tuned (Alg. 2)"

    @property
    def is_cnn(self) -> bool:
        return str(self.spec.get("arch", "")).startswith("resnet")

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


@dataclass
class Inputs:
    doc: dict                       # params.yaml
    meta: dict                      # data/prepared/<dataset>/meta.json
    prepared: Path                  # data/prepared/<dataset>
    runs: list[Run]
    profile: dict                   # metrics/profile.json
    compute: pd.DataFrame           # profile/compute.csv: one row per model on profile.device
    devices: pd.DataFrame           # profile/devices.csv: one row per model x device profile
    missing: list[str] = field(default_factory=list)   # expected files that were not there

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


def _recipe(doc: dict, section: str, variant: str | None) -> params.TrainParams | None:
    try:
        return params.train_params(doc, section, variant)
    except Exception:   # a recipe the training stage would refuse: the report still renders
        return None


def load(root: Path | str = ".") -> Inputs:
    root = Path(root)
    doc = yaml.safe_load((root / params.PARAMS_FILE).read_text())
    read = _Reader(root)
    prepared = Path("data/prepared") / doc["data"]["dataset"]
    meta = read.json(prepared / "meta.json")
    runs = [Run(SCRATCH, dict(doc["model"]), _recipe(doc, "train", None),
                read.json("metrics/train_scratch.json"), read.json("metrics/evaluate/scratch.json"), {},
                read.table("plots/train_scratch/train.tsv", "\t"), read.table("plots/train_scratch/eval.tsv", "\t"))]
    for name, spec in (doc.get("variants") or {}).items():
        runs.append(Run(name, dict(spec), _recipe(doc, "finetune", name),
                        read.json(f"metrics/finetune/{name}.json"), read.json(f"metrics/evaluate/{name}.json"),
                        read.json(f"metrics/pretrain/{name}.json"),
                        read.table(f"plots/finetune/{name}/train.tsv", "\t"),
                        read.table(f"plots/finetune/{name}/eval.tsv", "\t")))
    return Inputs(doc=doc, meta=meta, prepared=root / prepared, runs=runs,
                  profile=read.json("metrics/profile.json"), compute=read.table("profile/compute.csv"),
                  devices=read.table("profile/devices.csv"), missing=read.missing)
