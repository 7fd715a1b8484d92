"""The full-size presets are complete, valid params files in params.yaml's schema."""

from pathlib import Path

import pytest
import timm
import yaml

from vitpipe import params

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "presets").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_preset_is_a_valid_params_file(path):
    doc = params.read_yaml(path)
    reference = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert list(doc) == list(reference)  # same sections, same order
    assert set(doc["profile"]) == set(reference["profile"])
    for size in (224, 384):  # the preset's resolution and the documented -S data.image_size=384
        data = params.data_params({**doc, "data": {**doc["data"], "image_size": size}})
        params.model_spec(doc, data.image_size)
        for name in params.variant_names(doc):
            spec = params.variant_spec(doc, name, data.image_size)
            assert spec["source"] == "timm" and timm.list_pretrained(spec["weights"]) == [spec["weights"]]
    for section in ("train", "pretrain", "finetune"):
        params.train_params(doc, section)
    params.evaluate_params(doc)
    ft = params.train_params(doc, "finetune")
    assert (ft.batch_size, ft.optimizer, ft.momentum, ft.grad_clip) == (512, "sgd", 0.9, 1.0)
    assert {"vit_b8", "vit_b16", "vit_b32", "vit_l16"} <= set(params.variant_names(doc))
