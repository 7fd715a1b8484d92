"""Study stage crossed: every extra pretraining run (studies/params.yaml `pretrain_seeds`)
fine-tuned with every training seed at the learning rate the budget stage `crossed.budget` chose,
beside that stage's own runs (the default pipeline's pretraining): pretraining seeds crossed with
fine-tuning seeds. Writes studies/results/crossed.json."""

from dataclasses import replace
from pathlib import Path

from vitpipe import stage, studies
from vitpipe.errors import UserError

USAGE = "usage: python studies/crossed.py <budget-result.json>"


def main(argv):
    if len(argv) != 1:
        raise UserError(USAGE)
    import json

    import torch

    tuned = json.loads(Path(argv[0]).read_text())
    doc = studies.read_params()
    seeds = [int(s) for s in studies.section(doc, "seeds")]
    pretrain_seeds = [int(s) for s in studies.section(doc, "pretrain_seeds")]
    groups = [{"pretrain_seed": tuned["pretrain_seed"], "from": tuned["stage"], "runs": tuned["runs"]}]
    with studies.workdir() as work:
        ctx = studies.context(Path(work))
        for p in pretrain_seeds:
            path = Path(f"studies/models/pretrain-seed-{p}.pt")
            if not path.exists():
                raise UserError(f"{path} not found: run `dvc repro studies/dvc.yaml:pretrain_seed@{p}` first")
            backbone = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
            runs = []
            for seed in seeds:
                base = ctx.recipe("finetune", seed=seed)
                recipe = replace(
                    base,
                    lr=tuned["chosen_lr"],
                    steps=tuned["steps"],
                    warmup_steps=studies.warmup_for(base, tuned["steps"]),
                )
                runs.append(studies.train(ctx, f"crossed-p{p}-seed{seed}", ctx.twin_spec, recipe, backbone))
            groups.append({"pretrain_seed": p, "from": "crossed", "runs": runs})
    studies.write(
        "studies/results/crossed.json",
        {
            "stage": "crossed",
            "steps": tuned["steps"],
            "chosen_lr": tuned["chosen_lr"],
            "lr_from": tuned["stage"],
            "groups": groups,
        },
    )


if __name__ == "__main__":
    stage.run(main)
