"""Stage preprocess: data/raw/<dataset>/ -> data/prepared/<dataset>/ (uint8 arrays per split,
meta.json with classes and mean/std, samples.png)."""

from vitpipe import params, pipeline, stage
from vitpipe.atomic import write_json
from vitpipe.data import sources
from vitpipe.data.prepare import prepare, sanity_metrics


def main(argv):
    cfg = params.data_params(params.read_yaml())
    sources.check_split(cfg)
    meta = prepare(cfg)
    write_json(
        pipeline.PREPROCESS_METRICS,
        {
            "dataset": cfg.dataset,
            "image_size": cfg.image_size,
            "num_classes": meta["num_classes"],
            **{f"{k}_images": v for k, v in meta["sizes"].items()},
            "skipped_images": meta["skipped_total"],
            **sanity_metrics(meta),
        },
    )
    print(
        f"preprocess: {cfg.dataset} at {cfg.image_size}px -> {cfg.prepared_dir}: "
        f"{meta['sizes']} ({meta['num_classes']} classes, {meta['skipped_total']} images skipped)"
    )


if __name__ == "__main__":
    stage.run(main)
