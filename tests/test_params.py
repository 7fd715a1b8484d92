"""Bad params fail before any compute: one line naming key, value and what is allowed;
exit code 2; nothing already written is touched."""

import copy
import sys

import pytest
from conftest import MICRO, ROOT, run, write_params

from vitpipe import model_specs, params
from vitpipe.errors import ParamError


def doc_with(path: str, value):
    doc = copy.deepcopy(MICRO)
    *parents, last = path.split(".")
    node = doc
    for p in parents:
        node = node[p]
    node[last] = value
    return doc


CASES = [
    # (stage argv, key to change, value, key named in the error, a phrase of what is allowed)
    (["train_scratch.py", "0"], "model.patch", 5, "model.patch", "divisible"),
    (["train_scratch.py", "0"], "model.arch", "vit_huge_thing", "model.arch", "resnet18"),
    (["finetune.py", "nope", "0"], "finetune.lr", 0.01, "variants", "vit_micro"),
    (["train_scratch.py", "0"], "train.lr", -0.1, "train.lr", "> 0"),
    (["train_scratch.py", "0"], "train.lr", 0, "train.lr", "> 0"),
    (["preprocess.py"], "data.split", {"train": 0.7, "val": 0.2, "test": 0.2}, "data.split", "sum to 1"),
    (["finetune.py", "vit_micro", "0"], "finetune.micro_batch", 5, "finetune.micro_batch", "divisor"),
    (["train_scratch.py", "0"], "train.precision", "fp8", "train.precision", "bf16"),
    (["train_scratch.py", "0"], "train.optimizer", "lamb", "train.optimizer", "adamw"),
    (["download.py"], "data.dataset", "imagenet", "data.dataset", "cifar100"),
    (["pretrain.py", "vit_micro"], "variants.vit_micro.source", "hub", "variants.vit_micro.source", "fractal"),
    (["pretrain.py", "vit_micro"], "variants.vit_micro.heads", 3, "variants.vit_micro.heads", ""),
    (["train_scratch.py", "0"], "train.stepz", 3, "train.stepz", "known key"),
    (["train_scratch.py", "0"], "train.steps", "many", "train.steps", "integer"),
]


@pytest.mark.slow  # a stage process per case
@pytest.mark.parametrize("argv,key,value,named,allowed", CASES)
def test_stage_rejects_bad_param(tmp_path, argv, key, value, named, allowed):
    write_params(tmp_path / "params.yaml", doc_with(key, value))
    sentinel = tmp_path / "metrics" / "train_scratch.json"
    sentinel.parent.mkdir()
    sentinel.write_text('{"keep": 1}\n')
    p = run([sys.executable, str(ROOT / "stages" / argv[0]), *argv[1:]], tmp_path, check=False)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert named in lines[0] and allowed in lines[0]
    assert sentinel.read_text() == '{"keep": 1}\n'
    assert sorted(x.name for x in tmp_path.iterdir()) == ["metrics", "params.yaml"]


def test_valid_micro_params_load():
    d = params.data_params(MICRO)
    assert d.image_size == 16 and d.prepared_dir.as_posix() == "data/prepared/digits"
    t = params.train_params(MICRO, "finetune")
    assert t.accum_steps == 2 and t.optimizer == "sgd"
    assert model_specs.variant_spec(MICRO, "resnet18", 16)["source"] == "fractal"


def test_warmup_must_be_shorter_than_schedule():
    with pytest.raises(ParamError, match="train.warmup_steps"):
        params.train_params(doc_with("train.warmup_steps", 6), "train")


def test_missing_params_file(tmp_path):
    p = run([sys.executable, str(ROOT / "stages" / "download.py")], tmp_path, check=False)
    assert p.returncode == 2 and "params.yaml not found" in p.stderr


def test_params_reference_is_generated_from_the_schema():
    """docs/params.md is what `python -m vitpipe.params` prints: the docs cannot drift."""
    assert (ROOT / "docs" / "params.md").read_text() == params.reference_markdown(
        model_specs.MODEL, model_specs.VARIANT
    )


# ---------------------------------------------------------------------------------------
# The scratch network and its fine-tuned twin (`model.twin`): the headline compares them


def default_params() -> dict:
    return params.read_yaml(ROOT / "params.yaml")


def test_the_default_twin_is_the_scratch_network_fine_tuned():
    from vitpipe import check_params

    doc = default_params()
    check_params.check_all(doc)
    assert model_specs.twin_name(doc) == "vit_tiny"
    assert model_specs.same_network(model_specs.model_spec(doc, 32), model_specs.variant_spec(doc, "vit_tiny", 32))


def test_changing_one_side_of_the_twin_stops_validate_saying_how_to_change_both():
    """`dvc exp run -S model.patch=8` alone would leave the headline 'not tested': validate
    stops on one line that gives the command changing both; with both changed it passes."""
    from vitpipe import check_params

    doc = default_params()
    doc["model"]["patch"] = 8
    with pytest.raises(ParamError) as e:
        check_params.check_all(doc)
    assert str(e.value) == (
        "params.yaml: model.patch = 8 is not allowed: variants.vit_tiny.patch is 4 and vit_tiny is this network "
        "fine-tuned (model.twin): change both (dvc exp run -S model.patch=8 -S variants.vit_tiny.patch=8), or set "
        "model.twin to null to compare unlike networks"
    )
    doc["variants"]["vit_tiny"]["patch"] = 8
    check_params.check_all(doc)
    assert model_specs.twin_name(doc) == "vit_tiny"


def test_a_twin_must_be_a_variant_and_null_means_none():
    from vitpipe import check_params

    doc = default_params()
    doc["model"]["twin"] = "vit_tinny"
    with pytest.raises(
        ParamError,
        match=r"model.twin = 'vit_tinny' is not allowed: a variant of params.yaml "
        r"\(vit_tiny, resnet18\) or null",
    ):
        check_params.check_all(doc)
    doc["model"]["twin"], doc["model"]["patch"] = None, 8  # unlike networks, on purpose
    check_params.check_all(doc)
    assert model_specs.twin_name(doc) is None
    del doc["model"]["twin"]  # no key: the variant with the same network
    doc["model"]["patch"] = 4
    assert model_specs.twin_name(doc) == "vit_tiny"
    assert "twin" not in model_specs.model_spec(doc, 32)  # not a network key: builders never see it
