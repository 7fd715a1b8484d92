"""Stage evaluate_scratch@<seed> / evaluate@<variant>-<seed>: one trained model on the test split.

Writes flat metrics (top-1, top-5, loss, inference img/s, latency), per-class accuracy and
the confusion matrix (JSON), and predictions.csv: one row per test image in the prepared
store's order (actual, predicted), for `dvc plots` confusion charts and for the report's
per-image paired test (McNemar) between two models of the same seed."""

from vitpipe import model_specs, params, pipeline, stage
from vitpipe.errors import UserError

USAGE = "usage: python stages/evaluate.py scratch|<variant> <seed>"


def main(argv):
    doc, (name, seed) = params.stage_args(argv, USAGE)
    data = params.data_params(doc)
    cfg = params.evaluate_params(doc)
    if name != "scratch":
        model_specs.variant_spec(doc, name, data.image_size)  # an unknown variant fails by name

    import torch

    from vitpipe.atomic import write_json, write_text
    from vitpipe.data.prepared_store import PreparedStore
    from vitpipe.evaluation.classification import (
        classification_report,
        inference_speed,
        predict,
    )
    from vitpipe.models import build_model

    weights = pipeline.trained_weights(name, seed)
    if not weights.exists():
        raise UserError(f"{weights} not found: run `dvc repro` for its training stage first")
    saved = torch.load(weights, map_location="cpu", weights_only=True)
    store = PreparedStore(data.prepared_dir)
    model = build_model(saved["spec"], saved["num_classes"], saved["image_size"])
    model.load_state_dict(saved["state_dict"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    test = store.split("test")
    logits, labels = predict(model, test, device, cfg.batch_size)
    report = classification_report(logits, labels, store.classes)
    speed = inference_speed(model, test, device, cfg.batch_size, cfg.latency_batches)

    out = pipeline.eval_dir(name, seed)
    write_json(
        pipeline.eval_metrics(name, seed),
        {
            "top1": round(report["top1"], 5),
            "top5": round(report["top5"], 5),
            "loss": round(report["loss"], 5),
            "test_images": len(labels),
            "params": sum(p.numel() for p in model.parameters()),
            "infer_img_per_s": round(speed["infer_img_per_s"], 1),
            "latency_ms": round(speed["latency_ms"], 3),
        },
    )
    write_json(
        out / "classes.json",
        {
            "per_class_acc": report["per_class"],
            "support": report["support"],
            "classes": store.classes,
            "confusion": report["confusion"],
        },
    )
    # what it looks at: attention rollout (ViT) or Grad-CAM (CNN) on the same test images for every model
    from vitpipe.evaluation import attention_maps

    shown = attention_maps.pick_images(test.y.numpy(), per_class=1)
    attention_maps.write_maps(out / "attention.npz", attention_maps.explain_split(model, test, shown, device))
    pred = logits.argmax(1)
    write_text(
        out / pipeline.PREDICTIONS,
        "actual,predicted\n"
        + "".join(f"{store.classes[a]},{store.classes[p]}\n" for a, p in zip(labels.tolist(), pred.tolist())),
    )
    print(
        f"evaluate {name} seed {seed}: top-1 {report['top1']:.2%}, top-5 {report['top5']:.2%} on {len(labels)} test images, "
        f"{speed['infer_img_per_s']:.0f} img/s"
    )


if __name__ == "__main__":
    stage.run(main)
