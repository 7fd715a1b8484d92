"""Study stages <arm>@<steps> (studies/params.yaml `arms.<arm>`): one arm trained for <steps>,
its learning rate tuned on the validation split at that budget (first seed), then the chosen
rate run with every other seed. Writes studies/results/budget/<arm>-<steps>.json."""

from dataclasses import replace
from pathlib import Path

from vitpipe import stage, studies
from vitpipe.errors import UserError

USAGE = "usage: python studies/budget.py <arm> <steps>"


def main(argv):
    if len(argv) != 2 or not argv[1].isdigit():
        raise UserError(USAGE)
    arm_name, steps = argv[0], int(argv[1])
    name = f"{arm_name}-{steps}"
    doc = studies.read_params()
    arm = studies.section(doc, "arms", arm_name)
    seeds = [int(s) for s in studies.section(doc, "seeds")]
    with studies.workdir() as work:
        ctx = studies.context(Path(work))
        finetune = arm["section"] == "finetune"
        backbone = studies.pretrained_weights(ctx.twin) if finetune else None
        spec = ctx.twin_spec if finetune else ctx.scratch_spec

        def run(lr, seed):
            base = ctx.recipe(arm["section"], seed=seed)
            recipe = replace(
                base,
                lr=float(lr),
                steps=steps,
                warmup_steps=studies.warmup_for(base, steps),
                **(arm.get("recipe") or {}),
            )
            return studies.train(ctx, f"{name}-lr{lr:g}-seed{seed}", spec, recipe, backbone)

        result = studies.sweep_then_seeds(run, [float(x) for x in arm["lrs"]], seeds)
    studies.write(
        f"studies/results/budget/{name}.json",
        {
            "stage": f"{arm_name}@{steps}",
            "arm": arm_name,
            "steps": steps,
            "fine_tuned": finetune,
            "pretrain_seed": ctx.doc.get("pretrain", {}).get("seed", 0) if finetune else None,
            **result,
        },
    )


if __name__ == "__main__":
    stage.run(main)
