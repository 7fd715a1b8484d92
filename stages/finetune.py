"""Stage finetune@<variant>-<seed> (Algorithm 2): the variant's pretrained weights, a new head
for this dataset, fine-tuned with the `finetune:` recipe (SGD 0.9, warmup + cosine, clip 1),
for one of the `seeds`."""

from vitpipe import model_specs, params, pipeline, stage
from vitpipe.errors import UserError

USAGE = "usage: python stages/finetune.py <variant> <seed>"


def main(argv):
    doc, (name, seed) = params.stage_args(argv, USAGE)
    data = params.data_params(doc)
    spec = model_specs.variant_spec(doc, name, data.image_size)
    recipe = params.train_params(doc, "finetune", variant=name, seed=seed)
    from vitpipe.training import distributed

    distributed.relaunch(recipe.nproc, recipe.nnodes, recipe.rdzv_timeout_s)
    distributed.seed_everything(recipe.seed)  # the starting weights follow the seed param

    import torch

    from vitpipe.data.prepared_store import PreparedStore
    from vitpipe.models import build_model
    from vitpipe.models.weights import load_backbone
    from vitpipe.training.loop import RunPaths, TrainingJob, fit

    pretrained_path = pipeline.pretrained_weights(name)
    if not pretrained_path.exists():
        raise UserError(f"{pretrained_path} not found: run `dvc repro pretrain@{name}` first")
    pretrained = torch.load(pretrained_path, map_location="cpu", weights_only=True)
    store = PreparedStore(data.prepared_dir)
    model = build_model(spec, store.num_classes, data.image_size)
    load_backbone(model, pretrained["state_dict"])
    paths = RunPaths(
        weights=pipeline.finetune_weights(name, seed),
        metrics=pipeline.train_metrics(name, seed),
        plots=pipeline.steplog(name, seed),
    )
    train = store.split("train").fraction(data.train_fraction, data.seed)  # data.train_fraction: data efficiency
    fit(
        TrainingJob(
            model,
            train,
            recipe,
            paths,
            val=store.split("val"),
            desc=f"finetune@{name}-{seed}",
            fresh_key="finetune.resume",
            run_config={
                "spec": spec,
                "dataset": data.dataset,
                "image_size": data.image_size,
                "sizes": store.meta["sizes"],
            },
            weights_meta={
                "spec": spec,
                "num_classes": store.num_classes,
                "image_size": data.image_size,
                "classes": store.classes,
                "algorithm": "finetune",
                "variant": name,
                "seed": seed,
            },
        )
    )


if __name__ == "__main__":
    stage.run(main)
