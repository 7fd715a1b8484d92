"""Study stage data_sweep@<share>: the ViT of `model:` and a CNN (`data_sweep.cnn`, a variant's network),
both from scratch with the `train:` recipe, on <share> of the training split; each network's
learning rate tuned on the validation split at that share (first seed), then the other seeds.
The validation and test splits stay whole. Writes studies/results/data_sweep/share-<share>.json."""

from dataclasses import replace
from pathlib import Path

from vitpipe import model_specs, stage, studies
from vitpipe.errors import UserError

USAGE = "usage: python studies/data_sweep.py <share>"


def main(argv):
    try:
        (fraction,) = [float(a) for a in argv]
    except ValueError:
        raise UserError(USAGE) from None
    if not 0 < fraction <= 1:
        raise UserError(f"{USAGE}: the share must be in (0, 1], got {fraction:g}")
    doc = studies.read_params()
    cfg = studies.section(doc, "data_sweep")
    steps, seeds = int(cfg["steps"]), [int(s) for s in cfg["seeds"]]
    point = {"stage": f"data_sweep@{argv[0]}", "fraction": fraction, "steps": steps, "cnn": cfg["cnn"]}
    with studies.workdir() as work:
        ctx = studies.context(Path(work))
        networks = {"vit": ctx.scratch_spec, "cnn": model_specs.variant_spec(ctx.doc, cfg["cnn"], ctx.data.image_size)}
        for kind, spec in networks.items():

            def run(lr, seed, spec=spec, kind=kind):
                base = ctx.recipe("train", seed=seed)
                recipe = replace(base, lr=float(lr), steps=steps, warmup_steps=studies.warmup_for(base, steps))
                return studies.train(
                    ctx, f"data-{fraction:g}-{kind}-lr{lr:g}-seed{seed}", spec, recipe, fraction=fraction
                )

            point[kind] = studies.sweep_then_seeds(run, [float(x) for x in cfg["lrs"]], seeds)
    studies.write(f"studies/results/data_sweep/share-{argv[0]}.json", point)  # the name dvc.yaml gives it


if __name__ == "__main__":
    stage.run(main)
