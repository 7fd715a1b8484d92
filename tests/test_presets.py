"""The full-size presets are complete, valid params files in params.yaml's schema."""

from pathlib import Path

import pytest
import timm
import yaml

from vitpipe import model_specs, params

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
        model_specs.model_spec(doc, data.image_size)
        for name in params.variant_names(doc):
            spec = model_specs.variant_spec(doc, name, data.image_size)
            assert spec["source"] == "timm" and timm.list_pretrained(spec["weights"]) == [spec["weights"]]
    for section in ("train", "pretrain", "finetune"):
        params.train_params(doc, section)
    params.evaluate_params(doc)
    ft = params.train_params(doc, "finetune")
    assert (ft.batch_size, ft.optimizer, ft.momentum, ft.grad_clip) == (512, "sgd", 0.9, 1.0)
    assert {"vit_b8", "vit_b16", "vit_b32", "vit_l16"} <= set(params.variant_names(doc))
    assert model_specs.twin_name(doc) == "vit_b32"  # the scratch ViT-B/32 and its fine-tuned twin
    model_specs.check_twin(doc, 224)


# ---------------------------------------------------------------------------------------
# Every preset runs on every GPU in the device profiles: natively (no emulated bf16), in
# memory, as the planner (`vitpipe plan --params FILE --device NAME`) says.

from vitpipe.costmodel import devices  # noqa: E402
from vitpipe.hardware import precision  # noqa: E402
from vitpipe.plan import plan_params  # noqa: E402

CARDS = sorted(devices.DEVICES)


def target_card(path: Path) -> str:
    """The card a preset's micro-batches are planned for: its header says so."""
    return "t4" if path.stem.endswith("-t4") else "a100-40"


def apply_overrides(doc: dict, overrides: list[str]) -> dict:
    """What `dvc exp run -S key=value` / `-S ++key=value` does to params.yaml (written here
    apart from vitpipe.plan.apply_sets, so that the two can disagree)."""
    doc = yaml.safe_load(yaml.safe_dump(doc, sort_keys=False))
    for o in overrides:
        key, value = o.removeprefix("++").split("=", 1)
        *path, last = key.split(".")
        node = doc
        for k in path:
            node = node.setdefault(k, {})
        node[last] = yaml.safe_load(value)
    return doc


# what a user may ask the planner for besides the preset: the ViT paper's 384 px, and the
# section-wide micro-batch the docs once gave (which a variant's own micro_batch overrides)
CHANGES = {"as-written": [], "384px": ["data.image_size=384"], "section-micro-batch": ["finetune.micro_batch=32"]}


@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("card", CARDS)
@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_planned_preset_fits_every_card(path, card, change, tmp_path):
    """`vitpipe plan --params PRESET --device CARD [-S ...]`: its overrides, applied as `dvc
    exp run -S` applies them, give a file that fits CARD at every stage as written."""
    dev = devices.get_device(card)
    r = plan_params(path, card, sets=CHANGES[change])
    assert r["overrides"][: len(CHANGES[change])] == CHANGES[change]
    assert r["fits"], r["stages"]
    for s in r["stages"]:
        assert s["micro_batch"] and s["batch"] % s["micro_batch"] == 0
        assert s["required_bytes"] <= dev.memory_bytes, (s["stage"], s["required_bytes"], dev.memory_bytes)
        assert not (s["precision"] == "bf16" and not dev.native_bf16), f"{s['stage']} would run emulated bf16 on {card}"
        if s["precision_requested"] == "auto":
            assert s["precision"] == precision.native(dev)
    # the overrides the notebook passes to `dvc exp run -S` give a valid params file that
    # fits as written: planning it again changes nothing
    doc = apply_overrides(params.read_yaml(path), r["overrides"])
    for section in ("train", "pretrain", "finetune"):
        for name in [None, *params.variant_names(doc)]:
            if doc[section].get("precision") != "auto":
                params.train_params(doc, section, name)
    planned = tmp_path / path.name
    planned.write_text(yaml.safe_dump(doc, sort_keys=False))
    again = plan_params(planned, card)
    assert again["overrides"] == [] and all(s["fits_as_written"] for s in again["stages"])
    assert {s["stage"]: s["micro_batch"] for s in again["stages"]} == {
        s["stage"]: s["micro_batch"] for s in r["stages"]
    }


@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_preset_micro_batches_are_the_planners_for_its_card(path):
    """On the card it is written for, a preset needs no override, and each micro-batch is the
    largest the planner fits there (no memory left unused by a too-small micro-batch)."""
    r = plan_params(path, target_card(path))
    assert r["overrides"] == []
    for s in r["stages"]:
        assert s["fits_as_written"] and s["micro_batch_written"] == s["largest_micro_batch"], s


def test_a_gpu_without_bf16_gets_fp16_not_emulated_bf16(tmp_path):
    """The presets say `precision: auto`: fp16 on a T4 with no override, bf16 on an A100.
    A params file that insists on bf16 gets fp16 on a T4 as an explicit override."""
    for path in PRESETS:
        assert {params.train_params(params.read_yaml(path), s).precision for s in ("train", "finetune")} == {"auto"}
        t4, a100 = plan_params(path, "t4"), plan_params(path, "a100-40")
        assert {s["precision"] for s in t4["stages"]} == {"fp16"} and not [
            o for o in t4["overrides"] if "precision" in o
        ]
        assert {s["precision"] for s in a100["stages"]} == {"bf16"}
    doc = params.read_yaml(ROOT / "presets/reference-cifar100.yaml")
    doc["train"]["precision"] = doc["finetune"]["precision"] = "bf16"
    (tmp_path / "bf16.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    r = plan_params(tmp_path / "bf16.yaml", "t4")
    assert {s["precision"] for s in r["stages"]} == {"fp16"}
    assert "train.precision=fp16" in r["overrides"] and "finetune.precision=fp16" in r["overrides"]
