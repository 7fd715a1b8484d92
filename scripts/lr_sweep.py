"""Choose both recipes' learning rate the same way: a sweep on the validation split.

    python scripts/lr_sweep.py                       # needs `dvc repro preprocess pretrain@<twin>`
    python scripts/lr_sweep.py --scratch-lrs 1e-3 3e-3 --finetune-lrs 0.03 0.1 --parts sweep
    python scripts/lr_sweep.py --parts second_pretraining --pretrain-seed 1     # ~2 min more

Scratch training (`train:`, its own optimizer) and fine-tuning (`finetune:` of the variant
with the scratch network, from its pretrained weights) each run once per learning rate at
the recipe's steps, seed `--seed`, and are scored by their final validation top-1; the test
split is not read for the choice. The lr with the best final validation top-1 wins (ties: the
lower training loss). The script then trains scratch once more, with the chosen lr, at the
*equal total compute* of the fine-tuned twin (its pretraining counted in training FLOPs),
and records that run's per-image test correctness so the report can compare it, image by
image, with the fine-tuned model of the same seed. `--parts second_pretraining` pretrains the
twin once more with another `pretrain.seed` and fine-tunes it the same way: the variance of
pretraining that the default run's intervals (one pretraining run) leave out.

Everything it measured goes to `params.lr_sweep.json`, beside params.yaml; it never edits
params.yaml: copy the chosen `lr`s there (the file says which). Training runs go to a
temporary folder; nothing of the pipeline's outputs changes.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path.cwd()
RECORD = ROOT / "params.lr_sweep.json"
SCRATCH_LRS = (3e-4, 1e-3, 3e-3, 6e-3)      # AdamW: around the usual 1e-3 for a small ViT
FINETUNE_LRS = (0.01, 0.03, 0.1, 0.3)       # SGD 0.9: around the reference's 0.03-0.1
PARTS = ("sweep", "equal_compute", "second_pretraining")


class Sweep:
    """The data, networks and recipes the sweep trains, read once from params.yaml."""

    def __init__(self, seed: int, work: Path):
        import torch

        from vitpipe import model_specs, params, pipeline
        from vitpipe.data.prepared_store import PreparedStore
        from vitpipe.errors import UserError

        self.doc = params.read_yaml()
        self.data = params.data_params(self.doc)
        self.seed, self.work = seed, work
        self.twin = model_specs.twin_name(self.doc)
        if self.twin is None:
            raise UserError("no variant in params.yaml has the `model:` network: nothing to fine-tune like for like")
        self.scratch_spec = model_specs.model_spec(self.doc, self.data.image_size)
        self.twin_spec = model_specs.variant_spec(self.doc, self.twin, self.data.image_size)
        if not self.data.prepared_dir.exists():
            raise UserError(f"{self.data.prepared_dir} not found: run `dvc repro preprocess` first")
        pretrained = ROOT / pipeline.pretrained_weights(self.twin)
        if not pretrained.exists():
            raise UserError(f"{pretrained.relative_to(ROOT)} not found: run `dvc repro pretrain@{self.twin}` first")
        self.pretrained = torch.load(pretrained, map_location="cpu", weights_only=True)["state_dict"]
        self.store = PreparedStore(self.data.prepared_dir)
        self.train = self.store.split("train").fraction(self.data.train_fraction, self.data.seed)
        self.scratch_recipe = params.train_params(self.doc, "train", seed=seed)
        self.finetune_recipe = params.train_params(self.doc, "finetune", variant=self.twin, seed=seed)
        self.pretrain_recipe = params.train_params(self.doc, "pretrain", variant=self.twin)
        self.pretrain_metrics = params_json(ROOT / pipeline.pretrain_metrics(self.twin))

    def fit(self, name: str, finetune: bool, recipe):
        """Train one run into the work folder; returns (the trained model, its metrics)."""
        from vitpipe.models import build_model
        from vitpipe.models.weights import load_backbone
        from vitpipe.training import distributed
        from vitpipe.training.loop import RunPaths, TrainingJob, fit

        distributed.seed_everything(recipe.seed)
        spec = self.twin_spec if finetune else self.scratch_spec
        model = build_model(spec, self.store.num_classes, self.data.image_size)
        if finetune:
            load_backbone(model, self.pretrained)
        out = self.work / name
        paths = RunPaths(weights=out / "model.pt", metrics=out / "metrics.json", plots=out / "plots")
        recipe = replace(recipe, resume="fresh", checkpoint_every=recipe.steps, eval_every=recipe.steps)
        t = time.perf_counter()
        metrics = fit(TrainingJob(model, self.train, recipe, paths, val=self.store.split("val"), desc=f"lr_sweep {name}",
                                  run_config={"spec": spec, "dataset": self.data.dataset, "lr_sweep": name},
                                  fresh_key="train.resume", weights_meta={}, quiet=True, store_dir=self.work / "store"))
        print(f"lr_sweep {name}: val top-1 {metrics.get('val_acc', math.nan):.3f}, train loss {metrics['train_loss']:.3f} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
        return model, metrics

    def sweep(self, kind: str, lrs) -> dict:
        finetune = kind == "finetune"
        base = self.finetune_recipe if finetune else self.scratch_recipe
        rows = []
        for lr in lrs:
            _, m = self.fit(f"{kind}-lr{lr:g}", finetune, replace(base, lr=float(lr)))
            rows.append({"lr": float(lr), "val_acc": m.get("val_acc"), "train_loss": m["train_loss"],
                         "wall_time_s": m["wall_time_s"]})
        best = max(rows, key=lambda r: (r["val_acc"] if r["val_acc"] is not None else -1, -r["train_loss"]))
        section = f"variants.{self.twin}.finetune" if "lr" in _override(self.doc, self.twin) else "finetune"
        return {"param": f"{section}.lr" if finetune else "train.lr", "optimizer": base.optimizer, "steps": base.steps,
                "batch_size": base.batch_size, "params_yaml_lr": base.lr, "runs": rows, "chosen_lr": best["lr"]}

    def test_correct(self, model) -> list[bool]:
        import torch

        from vitpipe.evaluation.classification import predict

        logits, labels = predict(model, self.store.split("test"), torch.device("cpu"))
        return (logits.argmax(1) == labels).tolist()

    def second_pretraining(self, pretrain_seed: int, lr: float) -> dict:
        """The twin pretrained again with another `pretrain.seed`, fine-tuned at seed `self.seed`
        with the chosen lr: what the default run's one pretraining run leaves out of its intervals."""
        state, pm = _pretrain(self, pretrain_seed)
        first = self.pretrained
        self.pretrained = state
        try:
            model, m = self.fit(f"finetune-pretrain-seed{pretrain_seed}", True, replace(self.finetune_recipe, lr=lr))
        finally:
            self.pretrained = first
        correct = self.test_correct(model)
        return {"pretrain_seed": pretrain_seed, "seed": self.seed, "lr": lr, "pretrain_val_acc": pm.get("val_acc"),
                "pretrain_wall_time_s": pm["wall_time_s"], "val_acc": m.get("val_acc"), "test_images": len(correct),
                "test_top1": sum(correct) / len(correct), "test_correct": "".join("1" if c else "0" for c in correct)}

    def equal_compute(self, lr: float) -> dict:
        """Scratch at the training FLOPs of pretraining + fine-tuning the twin, on the test split."""
        from vitpipe.costmodel import compute
        from vitpipe.models import model_config

        size, classes = self.data.image_size, self.store.num_classes

        def per_image(spec, n):
            return compute.flops(model_config(spec, n, size))["train"]

        pre, ft, sc = self.pretrain_recipe, self.finetune_recipe, self.scratch_recipe
        pretrain_steps = self.pretrain_metrics.get("steps", pre.steps)
        total = (pretrain_steps * pre.batch_size * per_image(self.twin_spec, pre.classes)
                 + ft.steps * ft.batch_size * per_image(self.twin_spec, classes))
        steps = math.ceil(total / (sc.batch_size * per_image(self.scratch_spec, classes)))
        warmup = max(1, round(sc.warmup_steps * steps / sc.steps))     # the recipe's warmup share
        model, m = self.fit("scratch-equal-compute", False, replace(sc, lr=lr, steps=steps, warmup_steps=warmup))
        correct = self.test_correct(model)
        return {"seed": self.seed, "lr": lr, "steps": steps, "warmup_steps": warmup, "batch_size": sc.batch_size,
                "train_flops": total, "pretrain_steps": pretrain_steps, "finetune_steps": ft.steps,
                "wall_time_s": m["wall_time_s"], "val_acc": m.get("val_acc"),
                "test_images": len(correct), "test_top1": sum(correct) / len(correct),
                "test_correct": "".join("1" if c else "0" for c in correct)}


def _pretrain(sweep: Sweep, pretrain_seed: int):
    """The twin's fractal pretraining as stages/pretrain.py runs it, with another `pretrain.seed`
    (other fractal classes, split, starting weights and data order); returns its state_dict."""
    from vitpipe.data.fractal import make_dataset
    from vitpipe.data.prepare import stratified_split
    from vitpipe.data.prepared_store import Split
    from vitpipe.models import build_model
    from vitpipe.training import distributed
    from vitpipe.training.loop import RunPaths, TrainingJob, fit

    recipe = replace(sweep.pretrain_recipe, seed=pretrain_seed, resume="fresh")
    distributed.seed_everything(recipe.seed)
    size = sweep.data.image_size
    x, y = make_dataset(recipe.classes, recipe.images_per_class, size, recipe.seed)
    parts = stratified_split(y, {"train": 0.9, "val": 0.1}, recipe.seed)
    mean, std = (x.reshape(-1, 3).mean(0) / 255).tolist(), (x.reshape(-1, 3).std(0) / 255).tolist()
    train = Split(x[parts["train"]], y[parts["train"]], mean, std, hflip=True)
    val = Split(x[parts["val"]], y[parts["val"]], mean, std)
    model = build_model(sweep.twin_spec, recipe.classes, size)
    out = sweep.work / f"pretrain-seed{pretrain_seed}"
    t = time.perf_counter()
    m = fit(TrainingJob(model, train, recipe, RunPaths(out / "model.pt", out / "metrics.json", out / "plots"), val=val,
                        desc=f"lr_sweep pretrain seed {pretrain_seed}", fresh_key="pretrain.resume",
                        run_config={"spec": sweep.twin_spec, "image_size": size, "lr_sweep": "second_pretraining"},
                        weights_meta={}, quiet=True, store_dir=sweep.work / "store"))
    print(f"lr_sweep pretrain seed {pretrain_seed}: val top-1 {m.get('val_acc', math.nan):.3f} "
          f"({time.perf_counter() - t:.0f} s)", flush=True)
    return model.state_dict(), m


def params_json(path: Path) -> dict:
    import json

    return json.loads(path.read_text()) if path.exists() else {}


def _override(doc: dict, variant: str) -> dict:
    return (((doc.get("variants") or {}).get(variant) or {}).get("finetune") or {})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scratch-lrs", type=float, nargs="+", default=list(SCRATCH_LRS))
    ap.add_argument("--finetune-lrs", type=float, nargs="+", default=list(FINETUNE_LRS))
    ap.add_argument("--seed", type=int, default=0, help="the training seed of every sweep run")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=["sweep", "equal_compute"],
                    help="what to run; the parts not run keep their entries of the existing record")
    ap.add_argument("--pretrain-seed", type=int, default=1,
                    help="second_pretraining: the `pretrain.seed` of the second pretraining run")
    args = ap.parse_args(argv)
    bad = [x for x in args.scratch_lrs + args.finetune_lrs if not 0 < x < 10]
    if bad:
        print(f"vitpipe: error: learning rates {bad} must be in (0, 10)", file=sys.stderr)
        return 2
    from vitpipe.atomic import write_json
    from vitpipe.errors import UserError

    started = time.perf_counter()
    record = params_json(RECORD)
    try:
        with tempfile.TemporaryDirectory(prefix="lr_sweep-") as work:
            s = Sweep(args.seed, Path(work))
            if "sweep" in args.parts:
                args_given = argv if argv is not None else sys.argv[1:]
                record = {"command": " ".join(["python scripts/lr_sweep.py", *args_given]),
                          "chosen_by": "final validation top-1 (ties: lower training loss), seed "
                                       f"{args.seed}; the test split is not read for the choice",
                          "dataset": s.data.dataset, "image_size": s.data.image_size,
                          "val_images": len(s.store.split("val")), "twin": s.twin,
                          "scratch": s.sweep("scratch", args.scratch_lrs),
                          "finetune": s.sweep("finetune", args.finetune_lrs)}
            elif not record.get("scratch"):
                raise UserError(f"{RECORD.name} has no sweep yet: run with `--parts sweep` first")
            if "equal_compute" in args.parts:
                record["equal_compute"] = s.equal_compute(record["scratch"]["chosen_lr"])
            if "second_pretraining" in args.parts:
                record["command_second_pretraining"] = (f"python scripts/lr_sweep.py --parts second_pretraining "
                                                        f"--pretrain-seed {args.pretrain_seed}")
                record["second_pretraining"] = s.second_pretraining(args.pretrain_seed, record["finetune"]["chosen_lr"])
    except UserError as e:
        print(f"vitpipe: error: {e}", file=sys.stderr)
        return 2
    record[f"wall_time_s_{'_'.join(args.parts)}"] = round(time.perf_counter() - started, 1)
    write_json(RECORD, record)
    for kind in ("scratch", "finetune"):
        r = record[kind]
        note = "as in params.yaml" if r["chosen_lr"] == r["params_yaml_lr"] else "set it in params.yaml"
        print(f"lr_sweep: {r['param']} = {r['chosen_lr']:g} ({note})")
    print(f"lr_sweep: -> {RECORD.name} ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
