"""A typed, validated view of params.yaml, driven by one schema.

`SCHEMA` names every key at every depth, its type, its range and what it does. The same
table checks params.yaml (`vitpipe.check_params.check_all`, the `validate` stage that runs first),
writes the params reference (`python -m vitpipe.check_params > docs/params.md`) and words the
errors: one line naming the key, the value and what is allowed, with a did-you-mean for an
unknown key. Numbers may be written as strings (`lr: 2e-3`, which YAML 1.1 reads as a
string); every number that reaches numpy or torch is range-checked.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vitpipe import pipeline, precisions
from vitpipe.errors import ParamError, UserError

PARAMS_FILE = "params.yaml"
DATASETS = ("digits", "cifar10", "cifar100", "pets", "imagefolder")
OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = precisions.TRAINING
SOURCES = ("fractal", "timm", "npz", "file")
RESUME = ("auto", "fresh")
SEED_MAX = 2**32 - 1  # numpy's seeds are 32-bit
VARIANT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")  # a stage name, a file name, a shell word


@dataclass(frozen=True)
class Key:
    """One key of params.yaml: its type, range and meaning."""

    kind: str  # int | float | bool | str | choice | fraction | split | list | section
    help: str
    lo: float | None = None  # smallest allowed (inclusive unless lo_open)
    hi: float | None = None  # largest allowed (inclusive unless hi_open)
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple = ()
    nullable: bool = False

    def allowed(self) -> str:
        if self.kind == "choice":
            text = "one of: " + ", ".join(map(str, self.choices))
        elif self.kind == "bool":
            text = "true or false"
        elif self.kind == "str":
            text = "a string"
        elif self.kind == "list":
            text = "a non-empty list"
        elif self.kind == "split":
            text = "a mapping {train, val, test} of fractions that sum to 1"
        elif self.kind in ("int", "float", "fraction"):
            text = "an integer" if self.kind == "int" else "a number"
            lo = None if self.lo is None else f"{'>' if self.lo_open else '>='} {_fmt(self.lo)}"
            hi = None if self.hi is None else f"{'<' if self.hi_open else '<='} {_fmt(self.hi)}"
            text += " " + " and ".join(x for x in (lo, hi) if x) if (lo or hi) else ""
        else:
            text = "a mapping"
        return f"null or {text}" if self.nullable else text


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _int(help, lo=None, hi=None, **kw):
    return Key("int", help, lo=lo, hi=hi, **kw)


def _num(help, lo=None, hi=None, **kw):
    return Key("float", help, lo=lo, hi=hi, **kw)


RECIPE = {
    "steps": _int("optimizer steps of the run", 1, 10**9),
    "batch_size": _int("images per optimizer step", 1, 10**7),
    "micro_batch": _int("images per forward/backward; batch_size is reached by gradient accumulation", 1, 10**7),
    "optimizer": Key("choice", "adamw or SGD with momentum", choices=OPTIMIZERS),
    "lr": _num("peak learning rate (after warmup)", 0, 10, lo_open=True),
    "momentum": _num("SGD momentum", 0, 1, hi_open=True),
    "weight_decay": _num("decoupled weight decay (not on biases, norms, tokens, position embeddings)", 0, 10),
    "warmup_steps": _int("linear warmup steps, then cosine decay to 0", 0, 10**9),
    "label_smoothing": _num("label smoothing of the cross-entropy", 0, 1, hi_open=True),
    "grad_clip": _num("global gradient-norm clip (null: none)", 0, 10**6, lo_open=True, nullable=True),
    "precision": Key(
        "choice",
        "autocast precision; fp16 adds a grad scaler; auto = bf16 where native, fp16 on older GPUs, fp32 on CPU",
        choices=PRECISIONS,
    ),
    "activation_checkpointing": Key("bool", "recompute each block in backward (ViTs only)"),
    "compile": Key("bool", "torch.compile the model"),
    "checkpoint_every": _int("steps between checkpoints", 1, 10**9),
    "eval_every": _int("steps between validation passes", 1, 10**9, nullable=True),
    "resume": Key("choice", "auto: resume this run's newest checkpoint; fresh: discard it", choices=RESUME),
    "nproc": _int("processes (GPUs) per node under torchrun", 1, 1024),
    "nnodes": _int(
        "machines of the run (torchrun c10d rendezvous at $VITPIPE_RDZV_ENDPOINT); world = nnodes x nproc", 1, 4096
    ),
    "parallel": Key(
        "choice",
        "ddp: every process holds the whole training state; fsdp: sharded over the processes "
        "(FSDP2); auto: fsdp only where the cost model says ddp does not fit the device",
        choices=("ddp", "fsdp", "auto"),
    ),
    "augment": Key("bool", "random shift and flip"),
    "deterministic": Key(
        "bool",
        "deterministic kernels only (torch raises for an op without one), cuDNN autotuning "
        "off, no flash/cuDNN attention: a resumed GPU run repeats the uninterrupted one bit for bit "
        "(docs/training.md); slower",
    ),
    "rdzv_timeout_s": _int(
        "seconds the processes and nodes wait for each other to join before the run ends in one line", 1, 86400
    ),
    "collective_timeout_s": _int(
        "seconds a collective may wait for a peer during training (a dead or stuck process) "
        "before the run ends in one line",
        1,
        86400,
    ),
}
SEED = {"seed": _int("seed of the starting weights, data order and augmentation", 0, SEED_MAX)}
FRACTAL = {
    "classes": _int("fractal classes (one random iterated function system each)", 2, 100_000),
    "images_per_class": _int("fractal images per class", 2, 100_000),
}
# The network sections (`model:`, `variants.<name>`) take the keys each model family
# declares: vitpipe.model_specs builds their schema, so that the data stages, which read
# params but never build a network, do not run the model code.
VARIANT_KEYS = {
    "source": Key("choice", "where the pretrained weights come from", choices=SOURCES),
    "weights": Key("str", "timm model name, or a path to .npz / .pt / .safetensors", nullable=True),
    "pretrain": Key("section", "overrides of pretrain: keys for this variant"),
    "finetune": Key("section", "overrides of finetune: keys for this variant"),
}
TWIN = Key(
    "str",
    "the variant fine-tuned from this same network, the headline's like-for-like "
    "(validate stops when their networks differ); null: none",
    nullable=True,
)
SCHEMA: dict[str, dict[str, Key]] = {
    "data": {
        "dataset": Key("choice", "the dataset", choices=DATASETS),
        "archive": Key("str", "a local archive or folder to import instead of downloading", nullable=True),
        "url": Key("str", "a mirror of the download (null: the official URL)", nullable=True),
        "md5": Key("str", "default: the published checksum; null: accept any; or a 32-hex-digit md5", nullable=True),
        "image_size": _int("pixels, square; every model's patch must divide it", 8, 4096),
        "split": Key("split", "fractions train/val/test; datasets with an official test split keep it"),
        "train_fraction": Key(
            "float",
            "share of the train split the training stages use (stratified; val and test "
            "stay whole): how much data a model needs",
            0,
            1,
            lo_open=True,
        ),
        "seed": _int("seed of the split", 0, SEED_MAX),
        "workers": _int("parallel decode processes in preprocess", 1, 256),
    },
    "seeds": {},  # a list, checked by seeds()
    "model": {},  # the network keys: vitpipe.model_specs.MODEL (and `twin`)
    "train": RECIPE,  # its seeds are the top-level `seeds`
    "pretrain": {**RECIPE, **SEED, **FRACTAL},
    "finetune": RECIPE,
    "variants": {},  # name -> VARIANT, checked by variant_spec
    "evaluate": {
        "batch_size": _int("images per inference batch", 1, 10**6),
        "latency_batches": _int("batches timed for latency", 1, 10**4),
    },
    "profile": {
        "models": Key("list", "model names or specs for the compute table"),
        "image_size": _int("pixels", 1, 10**5),
        "batch_size": _int("images per optimizer step", 1, 10**9),
        "num_classes": _int("classes of the head", 1, 10**7),
        "device": Key("str", "device profile (t4, a100-80, h100-80, ..., local)"),
        "precision": Key("choice", "precision of the memory and time model", choices=precisions.MODELLED),
        "optimizer": Key("choice", "optimizer state in the memory model", choices=("adamw", "sgd")),
        "schedule_steps": _int("steps of the schedule for the ETA", 1, 10**10),
        "attention": Key("choice", "how activation memory is modelled", choices=("sdpa", "eager")),
        "checkpointing": Key("bool", "activation checkpointing in the memory model"),
        "mfu": _num(
            "no longer read: times come from the time model (docs/compute.md); kept so an old params file "
            "still loads, and must be null",
            0,
            1,
            lo_open=True,
            nullable=True,
        ),
    },
}


# ---------------------------------------------------------------------------------------
# Typed views


@dataclass(frozen=True)
class DataParams:
    dataset: str = "digits"
    archive: str | None = None
    url: str | None = None
    md5: str | None = "default"
    image_size: int = 32
    split: dict = field(default_factory=lambda: {"train": 0.7, "val": 0.1, "test": 0.2})
    train_fraction: float = 1.0
    seed: int = 0
    workers: int = 2

    @property
    def raw_dir(self) -> Path:
        return pipeline.raw_dir(self.dataset)

    @property
    def prepared_dir(self) -> Path:
        return pipeline.prepared_dir(self.dataset)


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
    nnodes: int = 1
    parallel: str = "ddp"
    seed: int = 0
    augment: bool = True
    deterministic: bool = False
    rdzv_timeout_s: int = 600
    collective_timeout_s: int = 600
    # fractal pretraining only
    classes: int = 0
    images_per_class: int = 0

    @property
    def accum_steps(self) -> int:
        return self.batch_size // self.micro_batch

    @property
    def world(self) -> int:
        """Processes of the run, over all its machines."""
        return self.nnodes * self.nproc


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 256
    latency_batches: int = 5


# ---------------------------------------------------------------------------------------
# Checking one value


NUMBER = re.compile(r"^\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*$")


def check_value(path: str, value: Any, key: Key) -> Any:
    """The value, coerced to the key's type (numeric strings become numbers), or ParamError."""
    if value is None:
        if key.nullable:
            return None
        raise ParamError(path, value, key.allowed())
    kind = key.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise ParamError(path, value, key.allowed())
        return value
    if kind in ("int", "float", "fraction"):
        number = value
        if isinstance(value, str) and NUMBER.match(value):
            number = float(value)
        if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
            raise ParamError(path, value, key.allowed())
        if kind == "int":
            if float(number) != int(number):
                raise ParamError(path, value, key.allowed())
            number = int(number)
        else:
            number = float(number)
        if (key.lo is not None and (number < key.lo or (key.lo_open and number == key.lo))) or (
            key.hi is not None and (number > key.hi or (key.hi_open and number == key.hi))
        ):
            raise ParamError(path, value, key.allowed())
        return number
    if kind in ("str", "choice"):
        if kind == "choice" and value not in key.choices:
            raise ParamError(path, value, key.allowed())
        if not isinstance(value, str):
            raise ParamError(path, value, key.allowed())
        return value
    if kind == "list":
        if not isinstance(value, list) or not value:
            raise ParamError(path, value, key.allowed())
        return value
    if kind == "split":
        return _split(path, value)
    if kind == "section":
        if not isinstance(value, dict):
            raise ParamError(path, value, "a mapping of keys")
        return value
    raise AssertionError(kind)


def unknown_key(path: str, name, value, known) -> ParamError:
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    hint = f"did you mean `{close[0]}`? " if close else ""
    section = path.rsplit(".", 1)[0] if "." in path else "params.yaml"
    return ParamError(path, value, f"not a known key of {section}: {hint}known keys: {', '.join(known)}")


def check_section(prefix: str, section: Any, keys: dict[str, Key]) -> dict:
    """Every key known and valid; returns the coerced values."""
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise ParamError(prefix, section, "a mapping of keys")
    out = {}
    for name, value in section.items():
        if name not in keys:
            raise unknown_key(f"{prefix}.{name}", name, value, keys)
        out[name] = check_value(f"{prefix}.{name}", value, keys[name])
    return out


def _split(path: str, split) -> dict:
    if not isinstance(split, dict) or set(split) != {"train", "val", "test"}:
        raise ParamError(path, split, "a mapping with exactly the keys train, val, test")
    fractions = {}
    for k, v in split.items():
        fractions[k] = check_value(f"{path}.{k}", v, Key("fraction", "", 0, 1))
    return fractions


# ---------------------------------------------------------------------------------------
# Sections


def read_yaml(path: str | Path = PARAMS_FILE) -> dict:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found: run the stage from the repository root (where dvc.yaml is)")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {' '.join(str(e).split())}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path} cannot be read ({e})") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path} must be a mapping of sections (data:, model:, train: …)")
    for name, value in doc.items():
        if name not in SCHEMA:
            raise unknown_key(str(name), name, "…", SCHEMA)
        if name != "seeds" and value is not None and not isinstance(value, dict):
            raise ParamError(str(name), value, "a mapping of keys")
    return doc


SEEDS_KEY = Key("int", "", 0, SEED_MAX)


def seeds(doc: dict) -> list[int]:
    """The training seeds of train_scratch and finetune@v: one DVC stage (and run) each."""
    value = doc.get("seeds", [0])
    if not isinstance(value, list) or not value:
        raise ParamError("seeds", value, "a non-empty list of training seeds, e.g. [0, 1, 2]")
    out = [check_value(f"seeds[{i}]", v, SEEDS_KEY) for i, v in enumerate(value)]
    if len(set(out)) != len(out):
        raise ParamError("seeds", value, "distinct seeds (each one is its own run)")
    return out


def stage_args(argv: list[str], usage: str) -> tuple[dict, list]:
    """params.yaml and a stage's arguments, as many as its usage line names ("usage: python
    stages/finetune.py <variant> <seed>"); the one named <seed> must be one of `seeds` and
    comes back as an int."""
    names = usage.split()[3:]
    if len(argv) != len(names):
        raise UserError(usage)
    doc = read_yaml()
    return doc, [_seed_arg(doc, arg, usage) if name == "<seed>" else arg for name, arg in zip(names, argv)]


def _seed_arg(doc: dict, arg: str, usage: str) -> int:
    """The seed a training stage was started with (its argv), which must be one of `seeds`."""
    allowed = seeds(doc)
    try:
        seed = int(arg)
    except ValueError:
        raise UserError(f"{usage}: {arg!r} is not a seed; params.yaml seeds: {allowed}") from None
    if seed not in allowed:
        raise ParamError("seeds", allowed, f"a list that holds {seed}, the seed this stage was started with")
    return seed


def data_params(doc: dict) -> DataParams:
    p = DataParams(**check_section("data", doc.get("data"), SCHEMA["data"]))
    split = p.split
    if split["train"] <= 0:  # the test share: vitpipe.data.sources.check_split (the source knows its own)
        raise ParamError("data.split", split, "a train fraction > 0")
    if abs(sum(split.values()) - 1.0) > 1e-6:
        raise ParamError("data.split", split, f"fractions that sum to 1 (these sum to {sum(split.values()):g})")
    if p.md5 is not None and p.md5 != "default":
        if not (len(p.md5) == 32 and all(c in "0123456789abcdef" for c in p.md5.lower())):
            raise ParamError("data.md5", p.md5, "default, null, or a 32-hex-digit md5")
    return p


def train_params(doc: dict, section: str, variant: str | None = None, seed: int | None = None) -> TrainParams:
    """The recipe of `section` (train | pretrain | finetune); with `variant`, overlaid by that
    variant's own `<section>:` keys (e.g. a smaller micro_batch for a bigger model); with
    `seed`, for that training seed (train and finetune take theirs from `seeds`)."""
    keys = SCHEMA[section]
    base = check_section(section, doc.get(section), keys)
    override = {}
    if variant:
        where = f"variants.{variant}.{section}"
        override = check_section(where, ((doc.get("variants") or {}).get(variant) or {}).get(section), keys)
    p = TrainParams(**{**base, **override, **({"seed": seed} if seed is not None else {})})

    def key(k: str) -> str:
        return f"variants.{variant}.{section}.{k}" if k in override else f"{section}.{k}"

    if p.warmup_steps >= p.steps:
        raise ParamError(key("warmup_steps"), p.warmup_steps, f"fewer than {key('steps')}={p.steps}")
    if p.micro_batch > p.batch_size or p.batch_size % p.micro_batch:
        raise ParamError(
            key("micro_batch"),
            p.micro_batch,
            f"a divisor of {key('batch_size')}={p.batch_size}: {_divisors(p.batch_size)}",
        )
    if p.nproc > 1 and p.accum_steps % p.nproc:
        raise ParamError(
            key("nproc"),
            p.nproc,
            f"a count that divides batch_size/micro_batch={p.accum_steps} (each process takes whole micro-batches)",
        )
    if p.nnodes > 1 and p.accum_steps % p.world:
        raise ParamError(
            key("nnodes"),
            p.nnodes,
            f"a count such that nnodes x nproc={p.world} processes divide "
            f"batch_size/micro_batch={p.accum_steps} (each process takes whole micro-batches)",
        )
    if section == "pretrain":
        for k in FRACTAL:
            if getattr(p, k) < 2:
                written = k in base or k in override
                raise ParamError(
                    key(k),
                    getattr(p, k) if written else None,
                    SCHEMA["pretrain"][k].allowed()
                    + ("" if written else " (the key is missing: the fractal source needs it)"),
                )
    return p


def divisors(n: int) -> list[int]:
    """The divisors of n in order, found in O(sqrt n): an error message or a plan must not
    hang on a huge batch. The one divisor search (the planner uses it too)."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _divisors(n: int, show: int = 12) -> str:
    divs = divisors(n)
    return ", ".join(map(str, divs[:show])) + (f", … ({len(divs)} in all)" if len(divs) > show else "")


def evaluate_params(doc: dict) -> EvaluateParams:
    return EvaluateParams(**check_section("evaluate", doc.get("evaluate"), SCHEMA["evaluate"]))


def check_variant_name(name) -> None:
    if not isinstance(name, str) or not VARIANT_NAME.match(name):
        raise ParamError(
            "variants",
            name,
            "names of letters, digits, _ and -, starting with a letter (a variant "
            "name becomes a stage name, a file name and a command argument)",
        )


def variant_names(doc: dict) -> list[str]:
    return list((doc.get("variants") or {}).keys())


# ---------------------------------------------------------------------------------------
# The params reference (docs/params.md is this, generated)


def reference_markdown(model: dict[str, Key], variant: dict[str, Key]) -> str:
    """docs/params.md; the network sections' keys come from the model families (vitpipe.model_specs)."""
    defaults = {
        "data": DataParams(),
        "train": TrainParams(),
        "pretrain": TrainParams(),
        "finetune": TrainParams(),
        "evaluate": EvaluateParams(),
    }
    out = [
        "# params.yaml reference",
        "",
        "Generated from `vitpipe/params.py` (`python -m vitpipe.check_params > docs/params.md`); the same table",
        "checks params.yaml before any stage runs. Defaults are what a missing key means (—: no default,",
        "the key must be set where it is used); `params.yaml` sets most keys explicitly.",
        "",
    ]
    sections = [
        (s, {**model, "twin": TWIN} if s == "model" else SCHEMA[s]) for s in SCHEMA if s not in ("variants", "seeds")
    ]
    sections.insert(5, ("variants.<name>", variant))
    out += [
        "## `seeds`",
        "",
        "A list of distinct training seeds (integers 0 to 4294967295), default `[0]`. Each seed",
        "is its own `train_scratch@<seed>` and `finetune@<variant>-<seed>` stage: its own run, cached and",
        "resumed on its own. Each seed fixes that run's starting weights, data order and augmentation;",
        "pretraining has its own `pretrain.seed`.",
        "",
        "`seeds`, `variants` and `data.dataset` shape the pipeline itself (which stages exist, which paths they",
        "write). A bad value there still stops at the `validate` stage with nothing touched under `dvc repro`;",
        "under `dvc exp run`, DVC's experiment runner first drops the outputs of stages that no longer exist:",
        "commit your results before such an experiment.",
        "",
    ]
    for name, keys in sections:
        out += [f"## `{name}`", "", "| key | allowed | default | what it is |", "| --- | --- | --- | --- |"]
        for k, key in keys.items():
            d = getattr(defaults.get(name), k, dataclasses.MISSING) if name in defaults else dataclasses.MISSING
            try:  # a placeholder the key does not allow (pretrain.classes: 0) is no default
                d = d if d is dataclasses.MISSING else check_value(f"{name}.{k}", d, key)
            except ParamError:
                d = dataclasses.MISSING
            shown = (
                "—"
                if d is dataclasses.MISSING
                else (
                    f"`{yaml.safe_dump(d, default_flow_style=True, sort_keys=False).strip().removesuffix('...').strip()}`"
                )
            )
            out.append(f"| `{k}` | {key.allowed()} | {shown} | {key.help.replace('|', chr(92) + '|')} |")
        out.append("")
    out += [
        "A variant name is letters, digits, `_` and `-`, starting with a letter: it becomes a stage name",
        "(`finetune@<name>`), a file name and a command argument.",
        "",
    ]
    return "\n".join(out)
