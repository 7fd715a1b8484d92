"""Stage train_scratch (Algorithm 1): the network of `model:` trained from random init with
the `train:` recipe on the prepared data."""

from pathlib import Path

from vitpipe import params, stage


def main(argv):
    doc = params.read_yaml()
    data = params.data_params(doc)
    spec = params.model_spec(doc, data.image_size)
    recipe = params.train_params(doc, "train")
    stage.relaunch_distributed(recipe.nproc)
    stage.seed_everything(recipe.seed)  # the starting weights follow the seed param

    from vitpipe.data.prepared_store import PreparedStore
    from vitpipe.models import build_model
    from vitpipe.train import RunPaths, fit

    store = PreparedStore(data.prepared_dir)
    model = build_model(spec, store.num_classes, data.image_size)
    paths = RunPaths(weights=Path("models/scratch/model.pt"),
                     metrics=Path("metrics/train_scratch.json"), plots=Path("plots/train_scratch"))
    fit(model, store.split("train"), recipe, paths, val=store.split("val"),
        run_config={"spec": spec, "dataset": data.dataset, "image_size": data.image_size, "sizes": store.meta["sizes"]},
        fresh_key="train.resume", desc="train_scratch",
        weights_meta={"spec": spec, "num_classes": store.num_classes, "image_size": data.image_size,
                      "classes": store.classes, "algorithm": "scratch"})


if __name__ == "__main__":
    stage.run(main)
