"""Facts written once: the precision table (vitpipe/precisions.py) that params, training, the
planner and the compute model read, and a data source's own facts (class count, official
test split) that params and the planner read from the source."""

import pytest
import torch

from vitpipe import check_params, params, precisions
from vitpipe.costmodel import compute, devices
from vitpipe.data import sources
from vitpipe.errors import ParamError
from vitpipe.hardware import precision as hw_precision
from vitpipe.models import registry
from vitpipe.training.recipe import autocast_dtype


def test_every_reader_takes_the_precisions_from_the_table():
    assert params.PRECISIONS == hw_precision.CHOICES == ("fp32", "bf16", "fp16", "auto")
    assert params.SCHEMA["profile"]["precision"].choices == precisions.MODELLED == ("fp32", "tf32", "bf16", "fp16")
    assert compute.PRECISIONS == {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2}
    assert registry.HALF_PRECISIONS == ("bf16", "fp16")
    t4 = devices.get_device("t4")
    assert all(t4.peak(p.peak) > 0 for p in precisions.TABLE)  # every row's peak key is a profile's


@pytest.mark.parametrize("row", precisions.TABLE, ids=lambda r: r.name)
def test_a_row_is_what_torch_runs(row):
    dtype = autocast_dtype(row.name) if row.trains else row.torch_dtype()
    assert dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}.get(row.name)
    assert row.bytes == (dtype or torch.float32).itemsize
    assert row.grad_scaler == (row.name == "fp16")  # only fp16's small gradients underflow


def test_a_source_carries_its_facts():
    assert set(sources.SOURCES) == set(params.DATASETS)
    assert {n: f.classes for n, f in sources.SOURCES.items()} == {
        "digits": 10,
        "cifar10": 10,
        "cifar100": 100,
        "pets": 37,
        "imagefolder": None,
    }
    assert [n for n, f in sources.SOURCES.items() if f.official_test] == ["cifar10", "cifar100", "pets"]


def test_an_image_folder_counts_its_classes_from_its_prepared_meta(tmp_path):
    assert sources.class_count("imagefolder", tmp_path) is None
    (tmp_path / "meta.json").write_text('{"classes": ["a", "b", "c"]}')
    assert sources.class_count("imagefolder", tmp_path) == 3
    assert sources.class_count("pets", tmp_path) == 37


@pytest.mark.parametrize("dataset, ok", [("digits", False), ("imagefolder", False), ("cifar100", True), ("pets", True)])
def test_no_test_share_is_refused_only_where_the_source_has_no_test_split(dataset, ok):
    doc = params.read_yaml()
    doc["data"] = {**doc["data"], "dataset": dataset, "split": {"train": 0.9, "val": 0.1, "test": 0.0}}
    cfg = params.data_params(doc)
    if ok:
        sources.check_split(cfg)
        return
    with pytest.raises(ParamError, match="has no official test split"):
        sources.check_split(cfg)
    with pytest.raises(ParamError, match="data.split"):
        check_params.check_all(doc)
