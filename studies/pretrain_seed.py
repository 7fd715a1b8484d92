"""Study stage pretrain_seed@<seed>: the twin's fractal pretraining again with `pretrain.seed`
= <seed> (other fractal classes, starting weights and data order). Writes
studies/models/pretrain-seed-<seed>.pt and studies/results/pretrain/seed-<seed>.json."""

from pathlib import Path

from vitpipe import stage, studies
from vitpipe.errors import UserError

USAGE = "usage: python studies/pretrain_seed.py <seed>"


def main(argv):
    if len(argv) != 1 or not argv[0].isdigit():
        raise UserError(USAGE)
    from vitpipe.atomic import torch_save

    seed = int(argv[0])
    with studies.workdir() as work:
        ctx = studies.context(Path(work))
        state, m = studies.pretrain(ctx, seed)
    out = Path(f"studies/models/pretrain-seed-{seed}.pt")
    out.parent.mkdir(parents=True, exist_ok=True)
    torch_save(out, {"state_dict": state})
    studies.write(
        f"studies/results/pretrain/seed-{seed}.json",
        {
            "stage": f"pretrain_seed@{seed}",
            "pretrain_seed": seed,
            "steps": m.get("steps"),
            "val_acc": m.get("val_acc"),
            "wall_time_s": m["wall_time_s"],
        },
    )


if __name__ == "__main__":
    stage.run(main)
