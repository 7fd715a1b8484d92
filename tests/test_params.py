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
    assert (ROOT / "docs" / "params.md").read_text() == params.reference_markdown()
