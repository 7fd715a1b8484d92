"""Stage train_scratch@<seed> (Algorithm 1): the network of `model:` trained from random init
with the `train:` recipe on the prepared data, for one of the `seeds`."""

from vitpipe import model_specs, params, pipeline, stage

USAGE = "usage: python stages/train_scratch.py <seed>"


def main(argv):
    doc, (seed,) = params.stage_args(argv, USAGE)
    data = params.data_params(doc)
    spec = model_specs.model_spec(doc, data.image_size)
    recipe = params.train_params(doc, "train", seed=seed)
    from vitpipe.training import distributed

    distributed.relaunch(recipe.nproc, recipe.nnodes, recipe.rdzv_timeout_s)
    distributed.seed_everything(recipe.seed)  # the starting weights follow the seed

    from vitpipe.data.prepared_store import PreparedStore
    from vitpipe.models import build_model
    from vitpipe.training.loop import RunPaths, TrainingJob, fit

    store = PreparedStore(data.prepared_dir)
    model = build_model(spec, store.num_classes, data.image_size)
    run = pipeline.SCRATCH
    paths = RunPaths(
        weights=pipeline.scratch_weights(seed),
        metrics=pipeline.train_metrics(run, seed),
        plots=pipeline.steplog(run, seed),
    )
    train = store.split("train").fraction(data.train_fraction, data.seed)  # data.train_fraction: data efficiency
    fit(
        TrainingJob(
            model,
            train,
            recipe,
            paths,
            val=store.split("val"),
            run_config={
                "spec": spec,
                "dataset": data.dataset,
                "image_size": data.image_size,
                "sizes": store.meta["sizes"],
            },
            fresh_key="train.resume",
            desc=f"train_scratch@{seed}",
            weights_meta={
                "spec": spec,
                "num_classes": store.num_classes,
                "image_size": data.image_size,
                "classes": store.classes,
                "algorithm": "scratch",
                "seed": seed,
            },
        )
    )


if __name__ == "__main__":
    stage.run(main)
