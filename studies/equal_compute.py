"""Study stage equal_compute: scratch trained for the steps whose training FLOPs equal the
fine-tuned twin's (its pretraining counted, plus `equal_compute.finetune_steps` of fine-tuning),
with the learning rate scratch won at the largest budget of the budget stages, for each of
`equal_compute.seeds`. Writes studies/results/equal_compute.json."""

from dataclasses import replace
from pathlib import Path

from vitpipe import stage, studies
from vitpipe.errors import UserError

USAGE = "usage: python studies/equal_compute.py <budget-result.json>"


def main(argv):
    if len(argv) != 1:
        raise UserError(USAGE)
    import json

    tuned = json.loads(Path(argv[0]).read_text())
    doc = studies.read_params()
    seeds = [int(s) for s in studies.section(doc, "equal_compute", "seeds")]
    ft_steps = int(studies.section(doc, "equal_compute", "finetune_steps"))
    with studies.workdir() as work:
        ctx = studies.context(Path(work))
        target = studies.equal_compute_steps(ctx, ft_steps)
        runs = []
        for seed in seeds:
            base = ctx.recipe("train", seed=seed)
            recipe = replace(
                base,
                lr=tuned["chosen_lr"],
                steps=target["steps"],
                warmup_steps=studies.warmup_for(base, target["steps"]),
            )
            runs.append(studies.train(ctx, f"equal-compute-seed{seed}", ctx.scratch_spec, recipe))
    studies.write(
        "studies/results/equal_compute.json",
        {
            "stage": "equal_compute",
            "arm": "scratch",
            **target,
            "lr_from": tuned["stage"],
            "chosen_lr": tuned["chosen_lr"],
            "runs": runs,
        },
    )


if __name__ == "__main__":
    stage.run(main)
