"""The studies pipeline's training runs (studies/dvc.yaml): learning rates tuned per budget on
the validation split, more seeds, more pretraining seeds, less data. Each study stage is a small
script in studies/ that calls these functions and writes one JSON record; the report reads
the records. Every run trains in a temporary folder: nothing of the default pipeline changes.

A run's record: its learning rate, seed and steps, its final validation top-1 and training loss,
and its test top-1 with the per-image correctness ("1"/"0" per test image, in store order) that
the report's paired tests and bootstrap need. The test split is never read for a choice.
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from vitpipe import model_specs, params
from vitpipe.errors import UserError

# A study arm: which recipe of params.yaml it starts from, and whether it fine-tunes.
SCRATCH, FINETUNE = "scratch", "finetune"


@dataclass
class Context:
    """The data, networks and recipes a study trains, read once from params.yaml."""

    doc: dict
    data: params.DataParams
    twin: str  # the variant with the scratch network: fine-tuning's like-for-like
    scratch_spec: dict
    twin_spec: dict
    store: object  # PreparedStore
    work: Path

    def split(self, name: str, fraction: float = 1.0):
        s = self.store.split(name)
        return s.fraction(fraction, self.data.seed) if name == "train" else s

    def recipe(self, section: str, seed: int = 0, variant: str | None = None, **overrides) -> params.TrainParams:
        base = params.train_params(
            self.doc, section, variant=variant or (self.twin if section == "finetune" else None), seed=seed
        )
        return replace(base, **overrides)


def twin_name(doc: dict) -> str | None:
    keys = ("arch", "patch", "dim", "depth", "heads", "mlp_ratio", "pool")
    model = doc.get("model") or {}
    return next(
        (n for n, s in (doc.get("variants") or {}).items() if all(s.get(k) == model.get(k) for k in keys)), None
    )


def context(work: Path) -> Context:
    from vitpipe.data.prepared_store import PreparedStore

    doc = params.read_yaml()
    data = params.data_params(doc)
    twin = twin_name(doc)
    if twin is None:
        raise UserError("no variant in params.yaml has the `model:` network: nothing to fine-tune like for like")
    if not data.prepared_dir.exists():
        raise UserError(f"{data.prepared_dir} not found: run `dvc repro preprocess` first")
    return Context(
        doc,
        data,
        twin,
        model_specs.model_spec(doc, data.image_size),
        model_specs.variant_spec(doc, twin, data.image_size),
        PreparedStore(data.prepared_dir),
        work,
    )


def pretrained_weights(name: str) -> dict:
    import torch

    path = Path(f"models/pretrained/{name}.pt")
    if not path.exists():
        raise UserError(f"{path} not found: run `dvc repro pretrain@{name}` first")
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def train(
    ctx: Context, name: str, spec: dict, recipe: params.TrainParams, backbone: dict | None = None, fraction: float = 1.0
) -> dict:
    """One run, evaluated once at its end on the validation split and on the test split."""
    from vitpipe.models import build_model
    from vitpipe.models.weights import load_backbone
    from vitpipe.training import distributed
    from vitpipe.training.loop import RunPaths, TrainingJob, fit

    distributed.seed_everything(recipe.seed)
    model = build_model(spec, ctx.store.num_classes, ctx.data.image_size)
    if backbone is not None:
        load_backbone(model, backbone)
    out = ctx.work / name
    recipe = replace(recipe, resume="fresh", checkpoint_every=recipe.steps, eval_every=recipe.steps)
    started = time.perf_counter()
    m = fit(
        TrainingJob(
            model,
            ctx.split("train", fraction),
            recipe,
            RunPaths(out / "model.pt", out / "metrics.json", out / "plots"),
            val=ctx.split("val"),
            desc=f"study {name}",
            run_config={"spec": spec, "dataset": ctx.data.dataset, "study": name},
            fresh_key="train.resume",
            weights_meta={},
            quiet=True,
            store_dir=ctx.work / "store",
        )
    )
    correct = test_correct(model, ctx.split("test"))
    print(
        f"study {name}: val top-1 {m.get('val_acc', math.nan):.3f}, test top-1 {sum(correct) / len(correct):.3f} "
        f"({time.perf_counter() - started:.0f} s)",
        flush=True,
    )
    return {
        "lr": recipe.lr,
        "seed": recipe.seed,
        "steps": recipe.steps,
        "optimizer": recipe.optimizer,
        "val_acc": m.get("val_acc"),
        "train_loss": m["train_loss"],
        "wall_time_s": m["wall_time_s"],
        "train_images": len(ctx.split("train", fraction)),
        "test_images": len(correct),
        "test_top1": sum(correct) / len(correct),
        "test_correct": "".join("1" if c else "0" for c in correct),
    }


def test_correct(model, split) -> list[bool]:
    import torch

    from vitpipe.evaluation.classification import predict

    logits, labels = predict(model, split, torch.device("cpu"))
    return (logits.argmax(1) == labels).tolist()


def best(runs: list[dict]) -> dict:
    """The run with the highest final validation top-1 (ties: the lower training loss)."""
    return max(runs, key=lambda r: (r["val_acc"] if r["val_acc"] is not None else -1, -r["train_loss"]))


def sweep_then_seeds(run, lrs: list[float], seeds: list[int]) -> dict:
    """`run(lr, seed)` at every lr with the first seed, then the chosen lr with the other seeds."""
    first, *rest = seeds
    sweep = [run(lr, first) for lr in lrs]
    chosen = best(sweep)
    return {
        "lrs": lrs,
        "chosen_lr": chosen["lr"],
        "sweep_seed": first,
        "sweep": sweep,
        "runs": [chosen] + [run(chosen["lr"], s) for s in rest],
        "chosen_by": f"final validation top-1 of seed {first} (ties: lower training loss); the test split "
        "is not read for the choice",
    }


def warmup_for(recipe: params.TrainParams, steps: int) -> int:
    """The recipe's warmup share at another number of steps."""
    return max(1, round(recipe.warmup_steps * steps / recipe.steps))


def pretrain(ctx: Context, seed: int) -> tuple[dict, dict]:
    """The twin's fractal pretraining as stages/pretrain.py runs it, with another `pretrain.seed`
    (other fractal classes, split, starting weights and data order): (state_dict, metrics)."""
    from vitpipe.data.fractal import make_dataset
    from vitpipe.data.prepare import stratified_split
    from vitpipe.data.prepared_store import Split
    from vitpipe.models import build_model
    from vitpipe.training import distributed
    from vitpipe.training.loop import RunPaths, TrainingJob, fit

    recipe = replace(params.train_params(ctx.doc, "pretrain", variant=ctx.twin), seed=seed, resume="fresh")
    distributed.seed_everything(recipe.seed)
    size = ctx.data.image_size
    x, y = make_dataset(recipe.classes, recipe.images_per_class, size, recipe.seed)
    parts = stratified_split(y, {"train": 0.9, "val": 0.1}, recipe.seed)
    mean, std = (x.reshape(-1, 3).mean(0) / 255).tolist(), (x.reshape(-1, 3).std(0) / 255).tolist()
    train_split = Split(x[parts["train"]], y[parts["train"]], mean, std, hflip=True)
    val = Split(x[parts["val"]], y[parts["val"]], mean, std)
    model = build_model(ctx.twin_spec, recipe.classes, size)
    out = ctx.work / f"pretrain-seed{seed}"
    m = fit(
        TrainingJob(
            model,
            train_split,
            recipe,
            RunPaths(out / "model.pt", out / "metrics.json", out / "plots"),
            val=val,
            desc=f"study pretrain seed {seed}",
            fresh_key="pretrain.resume",
            run_config={"spec": ctx.twin_spec, "image_size": size, "study": "pretrain"},
            weights_meta={},
            quiet=True,
            store_dir=ctx.work / "store",
        )
    )
    print(
        f"study pretrain seed {seed}: val top-1 {m.get('val_acc', math.nan):.3f} ({m['wall_time_s']:.0f} s)", flush=True
    )
    return model.state_dict(), m


def equal_compute_steps(ctx: Context, finetune_steps: int) -> dict:
    """Scratch steps whose training FLOPs equal the twin's pretraining plus `finetune_steps` of
    fine-tuning (per-image training FLOPs from the compute model, batch sizes from the recipes)."""
    from vitpipe.costmodel import compute
    from vitpipe.models import model_config

    size, classes = ctx.data.image_size, ctx.store.num_classes
    pre, ft, sc = ctx.recipe("pretrain", variant=ctx.twin), ctx.recipe("finetune"), ctx.recipe("train")

    def per_image(spec, n):
        return compute.flops(model_config(spec, n, size))["train"]

    total = pre.steps * pre.batch_size * per_image(
        ctx.twin_spec, pre.classes
    ) + finetune_steps * ft.batch_size * per_image(ctx.twin_spec, classes)
    return {
        "steps": math.ceil(total / (sc.batch_size * per_image(ctx.scratch_spec, classes))),
        "train_flops": total,
        "pretrain_steps": pre.steps,
        "finetune_steps": finetune_steps,
    }


def workdir():
    return tempfile.TemporaryDirectory(prefix="vitpipe-study-")


STUDIES_PARAMS = Path("studies/params.yaml")


def read_params() -> dict:
    import yaml

    if not STUDIES_PARAMS.exists():
        raise UserError(f"{STUDIES_PARAMS} not found: the studies pipeline reads its knobs there")
    return yaml.safe_load(STUDIES_PARAMS.read_text()) or {}


def section(doc: dict, *keys: str):
    """doc[k1][k2]..., or one clear line naming the missing key of studies/params.yaml."""
    out = doc
    for i, k in enumerate(keys):
        if not isinstance(out, dict) or k not in out:
            raise UserError(
                f"{STUDIES_PARAMS}: `{'.'.join(keys[: i + 1])}` is missing; add it (see the file's comments)"
            )
        out = out[k]
    return out


def write(path: str | Path, record: dict) -> None:
    from vitpipe.atomic import write_json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(path), record)
