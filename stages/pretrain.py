"""Stage pretrain@<variant>: models/pretrained/<variant>.pt, the weights fine-tuning starts from.

source fractal: pretrained here, offline, on formula-driven images (pretrain: recipe);
source timm / npz / file: imported from the hub cache or a local file and converted."""

from vitpipe import model_specs, params, pipeline, stage

USAGE = "usage: python stages/pretrain.py <variant>"


def main(argv):
    doc, (name,) = params.stage_args(argv, USAGE)
    data = params.data_params(doc)
    spec = model_specs.variant_spec(doc, name, data.image_size)
    recipe = params.train_params(doc, "pretrain", variant=name)
    weights_path = pipeline.pretrained_weights(name)
    metrics_path = pipeline.pretrain_metrics(name)
    plots = pipeline.pretrain_steplog(name)

    if spec["source"] != "fractal":
        import time

        import torch

        from vitpipe.atomic import torch_save, write_json, write_text
        from vitpipe.models.weights import import_weights
        from vitpipe.training.steplog import EVAL_COLUMNS, TRAIN_COLUMNS

        t = time.perf_counter()
        state = import_weights(spec, spec["source"], spec["weights"], data.image_size)
        torch_save(
            weights_path,
            {
                "state_dict": state,
                "spec": spec,
                "image_size": data.image_size,
                "source": spec["source"],
                "weights": spec["weights"],
            },
        )
        for f, cols in ((pipeline.TRAIN_LOG, TRAIN_COLUMNS), (pipeline.EVAL_LOG, EVAL_COLUMNS)):
            write_text(plots / f, "\t".join(cols) + "\n")  # no training happened: empty series
        write_json(
            metrics_path,
            {
                "source": spec["source"],
                "steps": 0,
                "wall_time_s": round(time.perf_counter() - t, 2),
                "params": int(sum(v.numel() for v in state.values() if torch.is_floating_point(v))),
            },
        )
        print(f"pretrain@{name}: imported {spec['source']} weights {spec['weights']} -> {weights_path}")
        return

    from vitpipe.training import distributed

    distributed.relaunch(recipe.nproc, recipe.nnodes, recipe.rdzv_timeout_s)
    distributed.seed_everything(recipe.seed)  # the starting weights follow the seed param
    from vitpipe.data.fractal import make_dataset
    from vitpipe.data.prepare import stratified_split
    from vitpipe.data.prepared_store import Split
    from vitpipe.models import build_model
    from vitpipe.training.loop import RunPaths, TrainingJob, fit

    x, y = make_dataset(recipe.classes, recipe.images_per_class, data.image_size, recipe.seed)
    parts = stratified_split(y, {"train": 0.9, "val": 0.1}, recipe.seed)
    mean = (x.reshape(-1, 3).mean(0) / 255).tolist()
    std = (x.reshape(-1, 3).std(0) / 255).tolist()
    train = Split(x[parts["train"]], y[parts["train"]], mean, std, hflip=True)
    val = Split(x[parts["val"]], y[parts["val"]], mean, std)
    model = build_model(spec, recipe.classes, data.image_size)
    paths = RunPaths(weights=weights_path, metrics=metrics_path, plots=plots)
    fit(
        TrainingJob(
            model,
            train,
            recipe,
            paths,
            val=val,
            desc=f"pretrain@{name}",
            fresh_key="pretrain.resume",
            run_config={"spec": spec, "image_size": data.image_size},
            weights_meta={
                "spec": spec,
                "image_size": data.image_size,
                "source": "fractal",
                "num_classes": recipe.classes,
            },
        )
    )


if __name__ == "__main__":
    stage.run(main)
