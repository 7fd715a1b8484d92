"""Study stage data_sweep: the ViT of `model:` and a CNN (`data_sweep.cnn`, a variant's network),
both from scratch with the `train:` recipe, on each share of the training split; each network's
learning rate tuned on the validation split at every share (first seed), then the other seeds.
The validation and test splits stay whole. Writes studies/results/data_sweep.json."""

from dataclasses import replace
from pathlib import Path

from vitpipe import model_specs, stage, studies
from vitpipe.errors import UserError

USAGE = "usage: python studies/data_sweep.py"


def main(argv):
    if argv:
        raise UserError(USAGE)
    doc = studies.read_params()
    cfg = studies.section(doc, "data_sweep")
    steps, seeds = int(cfg["steps"]), [int(s) for s in cfg["seeds"]]
    points = []
    with studies.workdir() as work:
        ctx = studies.context(Path(work))
        networks = {"vit": ctx.scratch_spec,
                    "cnn": model_specs.variant_spec(ctx.doc, cfg["cnn"], ctx.data.image_size)}
        for fraction in sorted(float(f) for f in cfg["fractions"]):
            point = {"fraction": fraction}
            for kind, spec in networks.items():
                def run(lr, seed, spec=spec, kind=kind, fraction=fraction):
                    base = ctx.recipe("train", seed=seed)
                    recipe = replace(base, lr=float(lr), steps=steps, warmup_steps=studies.warmup_for(base, steps))
                    return studies.train(ctx, f"data-{fraction:g}-{kind}-lr{lr:g}-seed{seed}", spec, recipe,
                                         fraction=fraction)
                point[kind] = studies.sweep_then_seeds(run, [float(x) for x in cfg["lrs"]], seeds)
            points.append(point)
    studies.write("studies/results/data_sweep.json", {
        "stage": "data_sweep", "steps": steps, "cnn": cfg["cnn"], "points": points})


if __name__ == "__main__":
    stage.run(main)
