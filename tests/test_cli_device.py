"""`vitpipe plan --device auto`: this machine's GPU as its known profile (a faked torch.cuda
stands in for the GPU), the local CPU without one; `--params FILE`: a whole params file."""

import json
import types
from pathlib import Path

import pytest
import torch
import yaml

from vitpipe import cli, plan
from vitpipe.costmodel import devices
from vitpipe.errors import ParamError
from vitpipe.hardware import precision as precision_of
from vitpipe.hardware import probe

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


def fake_gpu(monkeypatch, name, total_memory, capability):
    """torch.cuda as it looks on a machine with this one GPU."""
    props = types.SimpleNamespace(
        name=name, total_memory=total_memory, major=capability[0], minor=capability[1], multi_processor_count=40
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: props)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: name)


# what torch reports on Colab / Kaggle / cloud machines
T4 = ("Tesla T4", 15_828_320_256, (7, 5))
A100_40 = ("NVIDIA A100-SXM4-40GB", 42_505_273_344, (8, 0))
A100_80 = ("NVIDIA A100-SXM4-80GB", 85_100_068_864, (8, 0))
L4 = ("NVIDIA L4", 23_661_248_512, (8, 9))
H100 = ("NVIDIA H100 80GB HBM3", 85_045_870_592, (9, 0))
V100_32 = ("Tesla V100-SXM2-32GB", 34_089_730_048, (7, 0))


@pytest.mark.parametrize(
    "gpu, profile, precision",
    [
        (T4, "t4", "fp16"),
        (A100_40, "a100-40", "bf16"),
        (A100_80, "a100-80", "bf16"),
        (L4, "l4", "bf16"),
        (H100, "h100-80", "bf16"),
        (V100_32, "v100-32", "fp16"),
    ],
)
def test_auto_is_the_gpus_known_profile_with_its_real_memory(monkeypatch, gpu, profile, precision):
    fake_gpu(monkeypatch, *gpu)
    dev = probe.get_device("auto")
    known = devices.DEVICES[profile]
    assert dev.name == profile
    assert dev.label == f"{gpu[0]} (this GPU)"
    assert dev.memory_bytes == gpu[1]  # torch's number, not the profile's
    assert dev.peak_flops == known.peak_flops and dev.bandwidth == known.bandwidth
    assert dev.capability == gpu[2]
    assert precision_of.native(dev) == precision


def test_plan_auto_on_a_faked_t4(monkeypatch, capsys):
    fake_gpu(monkeypatch, *T4)
    assert cli.main(["plan", "vit_b16", "--device", "auto", "--precision", "fp16", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["device"] == "t4" and r["device_label"] == "Tesla T4 (this GPU)"
    assert r["capacity_bytes"] == T4[1]
    assert r["peak_flops"] == devices.DEVICES["t4"].peak("fp16")
    assert r["mfu_source"] == "time model"  # a known card: its datasheet, no run here
    assert cli.main(["plan", "vit_b16", "--device", "auto", "--precision", "fp16"]) == 0
    assert "ViT-B/16" in capsys.readouterr().out


def test_params_plan_auto_on_a_faked_t4(monkeypatch, capsys, tmp_path):
    """The A100 preset on a T4: precision auto is fp16 there, and the micro-batches that do
    not fit become the planner's, as -S overrides; a bf16 file gets fp16 as an override."""
    fake_gpu(monkeypatch, *T4)
    preset = str(ROOT / "presets/reference-pets.yaml")
    assert cli.main(["plan", "--params", preset, "--device", "auto", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["device"] == "t4" and r["memory_bytes"] == T4[1] and r["native_precision"] == "fp16"
    assert r["fits"] and {s["precision"] for s in r["stages"]} == {"fp16"}
    assert r["overrides"] == [
        "++variants.vit_b8.finetune.micro_batch=32",
        "variants.vit_b16.finetune.micro_batch=128",
        "++variants.vit_l16.finetune.micro_batch=32",
        "variants.resnet50.finetune.micro_batch=256",
    ]
    assert cli.main(["plan", "--params", preset, "--device", "auto"]) == 0
    out = capsys.readouterr().out
    assert "Tesla T4 (this GPU)" in out and "auto = fp16 on Tesla T4 (this GPU)" in out
    assert "to run it here: dvc exp run -S '++variants.vit_b8.finetune.micro_batch=32'" in out
    # the T4 preset needs nothing
    assert cli.main(["plan", "--params", str(ROOT / "presets/reference-pets-t4.yaml"), "--device", "auto"]) == 0
    assert "fits as written: dvc exp run" in capsys.readouterr().out
    # explicit bf16 would be emulated on a T4: fp16 instead, said so
    doc = yaml.safe_load(Path(preset).read_text())
    doc["train"]["precision"] = doc["finetune"]["precision"] = "bf16"
    (tmp_path / "bf16.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    assert cli.main(["plan", "--params", str(tmp_path / "bf16.yaml"), "--device", "auto"]) == 0
    out = capsys.readouterr().out
    assert "no bf16 units" in out and "-S 'train.precision=fp16' -S 'finetune.precision=fp16'" in out


def test_params_plan_on_a_faked_a100_keeps_bf16(monkeypatch):
    fake_gpu(monkeypatch, *A100_40)
    r = plan.plan_params(ROOT / "presets/reference-cifar100.yaml", "auto")
    assert r["overrides"] == [] and {s["precision"] for s in r["stages"]} == {"bf16"}


def test_an_unknown_gpu_is_not_matched_to_a_profile():
    assert devices.known_profile("NVIDIA L40S", 48 * GiB) is None  # not an L4
    assert devices.known_profile("NVIDIA GH200 480GB", 96 * GiB) is None
    assert devices.known_profile("Tesla P100-PCIE-16GB", 16 * GiB).name == "p100"
    assert devices.known_profile("NVIDIA GeForce RTX 3090", 24 * GiB).name == "rtx3090"
    assert devices.known_profile("NVIDIA A100 80GB PCIe", 80 * GiB).name == "a100-80"


def test_auto_without_a_gpu_is_the_local_cpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    dev = probe.get_device("auto")
    assert dev.name == "local" and dev.capability is None
    assert precision_of.native(dev) == "fp32"
    assert dev.label.startswith("CPU")
    assert cli.main(["plan", "vit_b16", "--batch", "64", "--device", "auto", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["device"] == "local" and r["mfu_source"] == "time model"
    assert r["capacity_bytes"] == dev.memory_bytes


def test_params_plan_of_the_default_on_cpu(monkeypatch, capsys):
    """The embedded default fits this CPU as written; fractal variants get a pretrain stage."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = plan.plan_params(ROOT / "params.yaml", "auto")
    stages = [s["stage"] for s in r["stages"]]
    assert stages[0] == "train_scratch" and "pretrain@resnet18" in stages and "finetune@resnet18" in stages
    assert r["fits"] and r["overrides"] == [] and r["device"] == "local"
    assert {s["precision"] for s in r["stages"]} == {"fp32"}
    assert r["eta_s"] > 0
    # this machine is measured, not a datasheet: the basis says so
    assert "measured fp32 matmul peak" in r["basis"] and "datasheet" not in r["basis"]


@pytest.mark.parametrize(
    "requested, card, expected",
    [
        ("auto", "t4", "fp16"),
        ("auto", "a100-40", "bf16"),
        ("auto", "l4", "bf16"),
        ("bf16", "t4", "fp16"),
        ("bf16", "v100-16", "fp16"),
        ("bf16", "h100-80", "bf16"),
        ("fp32", "t4", "fp32"),
        ("fp16", "a100-80", "fp16"),
    ],
)
def test_one_resolver_for_training_and_planning(requested, card, expected):
    """The planner asks the resolver training uses: where it refuses bf16 (a card without
    bf16 units) the plan runs fp16 and says why; elsewhere both give the same answer."""
    dev = devices.get_device(card)
    if expected != requested and requested == "bf16":
        with pytest.raises(ParamError, match="no native bf16; use fp16"):
            precision_of.resolve(requested, dev, "train.precision")
    else:
        assert precision_of.resolve(requested, dev, "train.precision") == expected


def test_a_section_override_does_not_reach_variants_with_their_own_key(capsys):
    """The docs' old T4 advice, -S finetune.micro_batch=32, on the A100 preset: B/8 and L/16
    (no micro_batch of their own) take it, B/16 and ResNet-50 keep their own 512, which does
    not fit a T4; the planner names their own keys, so the printed command fits."""
    preset = str(ROOT / "presets/reference-pets.yaml")
    assert cli.main(["plan", "--params", preset, "--device", "t4", "-S", "finetune.micro_batch=32"]) == 0
    out = capsys.readouterr().out
    assert (
        "to run it here: dvc exp run -S 'finetune.micro_batch=32' -S 'variants.vit_b16.finetune.micro_batch=128'"
        " -S 'variants.resnet50.finetune.micro_batch=256'\n"
    ) in out
    r = plan.plan_params(preset, "t4", sets=["finetune.micro_batch=32"])
    written = {s["stage"]: s["micro_batch_written"] for s in r["stages"]}
    assert written["finetune@vit_b8"] == written["finetune@vit_l16"] == 32
    assert written["finetune@vit_b16"] == written["finetune@resnet50"] == 512


def test_plan_sets_change_the_file_like_dvc_exp_run():
    doc = {"data": {"image_size": 224}, "variants": {"a": {"finetune": {"micro_batch": 8}}, "b": {}}}
    out = plan.apply_sets(
        doc, ["data.image_size=384", "++variants.b.finetune.micro_batch=16", "~variants.a", "+seeds=[0, 1]"]
    )
    assert out == {"data": {"image_size": 384}, "variants": {"b": {"finetune": {"micro_batch": 16}}}, "seeds": [0, 1]}
    assert doc["data"]["image_size"] == 224 and "a" in doc["variants"]  # the file's own doc is untouched


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["plan"], "needs a MODEL"),
        (["plan", "vit_b16", "--params", "params.yaml"], "not both"),
        (["plan", "--params", "nope.yaml"], "nope.yaml not found"),
        (
            ["plan", "vit_b16", "-S", "data.image_size=384"],
            "-S data.image_size=384 changes a params file: use it with --params",
        ),
        (["plan", "--params", "presets/reference-pets.yaml", "-S", "data.image_size"], "give KEY=VALUE"),
        (
            ["plan", "--params", "presets/reference-pets.yaml", "-S", "data.image_size.x=1"],
            "data.image_size.x is not inside",
        ),
        (["plan", "--params", "presets/reference-pets.yaml", "-S", "finetune.micro_bach=32"], "did you mean"),
    ],
)
def test_plan_argument_errors_are_one_line(args, fragment, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitpipe: error:") and fragment in err and err.count("\n") == 1


@pytest.mark.parametrize("card, expected", [("t4", "fp16"), ("v100-16", "fp16"), ("a100-40", "bf16"), ("l4", "bf16")])
def test_params_plan_resolves_precision_auto(card, expected):
    """The presets' `precision: auto` runs natively on every card without an override."""
    r = plan.plan_params(ROOT / "presets/reference-pets.yaml", card)
    assert {s["precision_requested"] for s in r["stages"]} == {"auto"}
    assert {s["precision"] for s in r["stages"]} == {expected}
    assert not [o for o in r["overrides"] if "precision" in o]
    assert r["fits"]


def test_several_models_one_table(capsys):
    assert cli.main(["plan", "vit_b16", "resnet50", "convnext_tiny", "--device", "t4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("on Tesla T4") and "train img/s" in out[1]
    assert [line.split()[0] for line in out[2:5]] == ["ViT-B/16", "ResNet-50", "ConvNeXt-Tiny"]


def test_json_gives_train_and_inference_speed_and_the_split_even_when_it_does_not_fit(capsys):
    assert cli.main(["plan", "vit_h14", "--device", "t4", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["fits"] is False and r["train_img_per_s"] > 0 and r["infer_img_per_s"] > r["train_img_per_s"]
    assert sum(r["time_split"].values()) == pytest.approx(1)


def test_three_seeds_take_three_times_one(capsys):
    preset = str(ROOT / "presets/reference-pets-t4.yaml")
    one = plan.plan_params(preset, "t4")
    three = plan.plan_params(preset, "t4", sets=["seeds=[0,1,2]"])
    assert one["seeds"] == 1 and three["seeds"] == 3
    assert three["eta_s"] == pytest.approx(3 * one["eta_s"]) and three["eta_one_seed_s"] == pytest.approx(one["eta_s"])
    assert cli.main(["plan", "--params", preset, "--device", "t4", "-S", "seeds=[0,1,2]"]) == 0
    out = capsys.readouterr().out
    assert "x 3 seeds" in out and "times: the time model" in out


def test_devices_split_the_batch_and_shorten_the_eta(capsys):
    one = plan.plan_model("vit_b16", batch=512, device="a100-80", precision="bf16")
    four = plan.plan_model("vit_b16", batch=512, device="a100-80", precision="bf16", devices=4)
    assert four["batch_per_device"] == 128 and four["allreduce_s"] > 0
    assert one["eta_s"] / 4 < four["eta_s"] < one["eta_s"] / 2
    assert cli.main(["plan", "vit_b16", "--batch", "64", "--devices", "1024"]) == 2
    assert "--devices 1024 is more than --batch 64" in capsys.readouterr().err


def test_a_card_from_a_file(tmp_path, capsys):
    f = tmp_path / "card.yaml"
    f.write_text(
        yaml.safe_dump(
            {
                "name": "my-card",
                "memory_gib": 24,
                "memory_bandwidth_gbs": 900,
                "sm_count": 80,
                "l2_mib": 40,
                "peak_tflops": {"fp32": 30, "tf32": 60, "bf16": 120, "fp16": 120},
            }
        )
    )
    assert cli.main(["plan", "vit_b16", "--device", str(f), "--precision", "bf16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["device"] == "my-card"
    f.write_text("name: x\nmemory_gib: 24\n")
    assert cli.main(["plan", "vit_b16", "--device", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitpipe: error:") and "missing peak_tflops" in err and "missing sm_count" in err


def test_params_json_gives_each_stage_train_and_inference_speed_and_the_split(capsys):
    assert cli.main(["plan", "--params", str(ROOT / "presets/reference-pets-t4.yaml"), "--device", "t4", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert "datasheet (40 SMs, 320 GB/s)" in r["basis"]
    for s in r["stages"]:
        assert 0 < s["train_img_per_s"] == s["img_per_s"] < s["infer_img_per_s"], s["stage"]
        assert sum(s["time_split"].values()) == pytest.approx(1) and s["fits"] is True


def test_plan_help_shows_every_default(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["plan", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for default in (
        "--batch BATCH effective batch per optimizer step (default: 512)",
        "(default: t4)",
        "(default: fp32)",
        "(default: adamw)",
        "(default: sdpa)",
        "(default: 1000)",
        "(default: 10000)",
    ):
        assert default in out, default
