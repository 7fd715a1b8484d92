"""A typed, validated view of params.yaml.

Every stage calls `load()` (or one of the section loaders) before any compute: a bad value
fails here with one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vitpipe.errors import ParamError, UserError

PARAMS_FILE = "params.yaml"
DATASETS = ("digits", "cifar10", "cifar100", "pets", "imagefolder")
OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = ("fp32", "bf16", "fp16")
SOURCES = ("fractal", "timm", "npz", "file")
RESUME = ("auto", "fresh")


@dataclass(frozen=True)
class DataParams:
    dataset: str = "digits"
    archive: str | None = None   # local archive/folder to import instead of downloading
    url: str | None = None       # override the official download URL (a mirror)
    md5: str | None = "default"
    image_size: int = 32
    split: dict = field(default_factory=lambda: {"train": 0.7, "val": 0.1, "test": 0.2})
    seed: int = 0
    workers: int = 2

    @property
    def raw_dir(self) -> Path:
        return Path("data/raw") / self.dataset

    @property
    def prepared_dir(self) -> Path:
        return Path("data/prepared") / self.dataset


@dataclass(frozen=True)
class TrainParams:
    """One recipe for the one training loop: train (scratch), pretrain and finetune."""

    steps: int = 100
    batch_size: int = 64
    micro_batch: int = 64
    optimizer: str = "adamw"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.05
    warmup_steps: int = 10
    label_smoothing: float = 0.0
    grad_clip: float | None = 1.0
    precision: str = "fp32"
    activation_checkpointing: bool = False
    compile: bool = False
    checkpoint_every: int = 100
    eval_every: int = 50
    resume: str = "auto"
    nproc: int = 1
    seed: int = 0
    augment: bool = True
    # fractal pretraining only
    classes: int = 0
    images_per_class: int = 0

    @property
    def accum_steps(self) -> int:
        return self.batch_size // self.micro_batch


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 256
    latency_batches: int = 5


def read_yaml(path: str | Path = PARAMS_FILE) -> dict:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found: run the stage from the repository root (where dvc.yaml is)")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path} must be a mapping of sections (data:, model:, train: …)")
    return doc


def _build(cls, section: dict | None, prefix: str):
    """Dataclass from a params section: unknown keys and wrong types fail by name."""
    section = section or {}
    if not isinstance(section, dict):
        raise ParamError(prefix, section, "a mapping of keys")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in section.items():
        if key not in fields:
            raise ParamError(f"{prefix}.{key}", value, "a known key: " + ", ".join(fields))
        default = fields[key].default
        if default is dataclasses.MISSING:
            default = fields[key].default_factory()
        values[key] = _coerce(f"{prefix}.{key}", value, default)
    return cls(**values)


def _coerce(key: str, value: Any, default: Any) -> Any:
    if value is None or default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ParamError(key, value, "true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamError(key, value, "an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ParamError(key, value, "a finite number")
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise ParamError(key, value, "a string")
    if isinstance(default, dict) and not isinstance(value, dict):
        raise ParamError(key, value, "a mapping")
    return value


def _positive(key: str, value, allow_zero: bool = False):
    if value is None or value < 0 or (value == 0 and not allow_zero):
        raise ParamError(key, value, "a number >= 0" if allow_zero else "a positive number")


def _choice(key: str, value, allowed):
    if value not in allowed:
        raise ParamError(key, value, "one of: " + ", ".join(map(str, allowed)))


def data_params(doc: dict) -> DataParams:
    p = _build(DataParams, doc.get("data"), "data")
    _choice("data.dataset", p.dataset, DATASETS)
    _positive("data.image_size", p.image_size)
    _positive("data.workers", p.workers)
    split = p.split
    if set(split) != {"train", "val", "test"}:
        raise ParamError("data.split", split, "a mapping with exactly the keys train, val, test")
    for k, v in split.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
            raise ParamError(f"data.split.{k}", v, "a fraction between 0 and 1")
    official_test = p.dataset in ("cifar10", "cifar100", "pets")  # these keep their own test split
    if split["train"] <= 0 or (split["test"] <= 0 and not official_test):
        raise ParamError("data.split", split, "train and test fractions must be > 0")
    if abs(sum(split.values()) - 1.0) > 1e-6:
        raise ParamError("data.split", split, f"fractions that sum to 1 (these sum to {sum(split.values()):g})")
    if p.md5 is not None and p.md5 != "default":
        if not (isinstance(p.md5, str) and len(p.md5) == 32 and all(c in "0123456789abcdef" for c in p.md5.lower())):
            raise ParamError("data.md5", p.md5, "default, null, or a 32-hex-digit md5")
    return p


def train_params(doc: dict, section: str, variant: str | None = None) -> TrainParams:
    """The recipe of `section` (train | pretrain | finetune); with `variant`, overlaid by that
    variant's own `<section>:` keys (e.g. a smaller micro_batch for a bigger model)."""
    base = doc.get(section) or {}
    override = ((doc.get("variants") or {}).get(variant) or {}).get(section) if variant else None
    if override is not None and not isinstance(override, dict):
        raise ParamError(f"variants.{variant}.{section}", override, f"a mapping of {section} keys to override")
    override = override or {}
    _build(TrainParams, override, f"variants.{variant}.{section}")  # names an unknown key where it is
    p = _build(TrainParams, {**base, **override}, section)

    def key(k: str) -> str:
        return f"variants.{variant}.{section}.{k}" if k in override else f"{section}.{k}"

    for k in ("steps", "batch_size", "micro_batch", "checkpoint_every", "nproc", "lr"):
        _positive(key(k), getattr(p, k))
    for k in ("warmup_steps", "weight_decay", "label_smoothing", "momentum", "seed"):
        _positive(key(k), getattr(p, k), allow_zero=True)
    if p.eval_every is not None:
        _positive(key("eval_every"), p.eval_every)
    if p.grad_clip is not None:
        _positive(key("grad_clip"), p.grad_clip)
    if p.label_smoothing >= 1:
        raise ParamError(key("label_smoothing"), p.label_smoothing, "a number in [0, 1)")
    if p.momentum >= 1:
        raise ParamError(key("momentum"), p.momentum, "a number in [0, 1)")
    if p.warmup_steps >= p.steps:
        raise ParamError(key("warmup_steps"), p.warmup_steps, f"fewer than {key('steps')}={p.steps}")
    _choice(key("optimizer"), p.optimizer, OPTIMIZERS)
    _choice(key("precision"), p.precision, PRECISIONS)
    _choice(key("resume"), p.resume, RESUME)
    if p.batch_size % p.micro_batch:
        divisors = [d for d in range(1, p.batch_size + 1) if p.batch_size % d == 0]
        raise ParamError(key("micro_batch"), p.micro_batch,
                         f"a divisor of {key('batch_size')}={p.batch_size}: {', '.join(map(str, divisors))}")
    if p.nproc > 1 and p.accum_steps % p.nproc:
        raise ParamError(key("nproc"), p.nproc,
                         f"a count that divides batch_size/micro_batch={p.accum_steps} (each process takes whole micro-batches)")
    if section == "pretrain":
        _positive(key("classes"), p.classes)
        _positive(key("images_per_class"), p.images_per_class)
    return p


def evaluate_params(doc: dict) -> EvaluateParams:
    p = _build(EvaluateParams, doc.get("evaluate"), "evaluate")
    _positive("evaluate.batch_size", p.batch_size)
    _positive("evaluate.latency_batches", p.latency_batches)
    return p


def model_spec(doc: dict, image_size: int) -> dict:
    from vitpipe.models import validate_spec

    spec = doc.get("model")
    if not isinstance(spec, dict):
        raise ParamError("model", spec, "a mapping with at least `arch`")
    validate_spec(spec, image_size, "model")
    return dict(spec)


def variant_spec(doc: dict, name: str, image_size: int) -> dict:
    from vitpipe.models import validate_spec

    variants = doc.get("variants") or {}
    if name not in variants:
        raise ParamError("variants", name, "a variant defined in params.yaml: " + ", ".join(variants))
    spec = variants[name]
    if not isinstance(spec, dict):
        raise ParamError(f"variants.{name}", spec, "a mapping with at least `arch` and `source`")
    spec = dict(spec)
    spec.setdefault("source", "fractal")
    spec.setdefault("weights", None)
    _choice(f"variants.{name}.source", spec["source"], SOURCES)
    if spec["source"] != "fractal" and not spec["weights"]:
        raise ParamError(f"variants.{name}.weights", None,
                         f"a timm model name or a file path (source={spec['source']} needs weights)")
    validate_spec(spec, image_size, f"variants.{name}")
    return spec


def variant_names(doc: dict) -> list[str]:
    return list((doc.get("variants") or {}).keys())
