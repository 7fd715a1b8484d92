"""precision: auto, and bf16 only where the GPU has it natively. The CUDA branches run on any
machine: the device's capability and name are faked; the `gpu` test checks a real card."""

import pytest
import torch

from vitpipe.errors import ParamError
from vitpipe.hardware import precision

CARDS = {  # name, compute capability
    "t4": ("Tesla T4", (7, 5)),
    "v100": ("Tesla V100-SXM2-16GB", (7, 0)),
    "p100": ("Tesla P100-PCIE-16GB", (6, 0)),
    "a100": ("NVIDIA A100-SXM4-40GB", (8, 0)),
    "l4": ("NVIDIA L4", (8, 9)),
    "h100": ("NVIDIA H100 80GB HBM3", (9, 0)),
}


@pytest.fixture
def card(monkeypatch):
    """card("t4") makes torch report that card for every CUDA device; returns the devices asked about."""
    asked = []

    def use(which):
        name, cap = CARDS[which]
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or cap)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        return asked

    return use


def test_cpu_auto_is_fp32_and_explicit_choices_are_kept():
    for dev in (torch.device("cpu"), "cpu"):
        assert precision.resolve("auto", dev, "train.precision") == "fp32"
        for p in ("fp32", "bf16", "fp16"):
            assert precision.resolve(p, dev, "train.precision") == p
    assert not precision.native_bf16("cpu")


def test_unknown_value_is_a_param_error_naming_the_key():
    with pytest.raises(ParamError, match=r"finetune.precision = 'tf32' is not allowed: one of: fp32, bf16, fp16, auto"):
        precision.resolve("tf32", "cpu", "finetune.precision")


@pytest.mark.parametrize("which", ["a100", "l4", "h100"])
def test_native_bf16_cards(card, which):
    card(which)
    dev = torch.device("cuda", 0)
    assert precision.native_bf16(dev)
    assert precision.resolve("auto", dev, "finetune.precision") == "bf16"
    for p in ("fp32", "bf16", "fp16"):
        assert precision.resolve(p, dev, "finetune.precision") == p


@pytest.mark.parametrize("which", ["t4", "v100", "p100"])
def test_older_cards_refuse_bf16_and_auto_picks_fp16(card, which):
    card(which)
    name, (major, minor) = CARDS[which]
    dev = torch.device("cuda", 0)
    assert not precision.native_bf16(dev)
    assert precision.resolve("auto", dev, "finetune.precision") == "fp16"
    assert precision.resolve("fp16", dev, "finetune.precision") == "fp16"
    assert precision.resolve("fp32", dev, "finetune.precision") == "fp32"
    with pytest.raises(ParamError) as e:
        precision.resolve("bf16", dev, "variants.vit_b16.finetune.precision")
    assert e.value.key == "variants.vit_b16.finetune.precision" and e.value.value == "bf16"
    assert str(e.value) == (
        f"params.yaml: variants.vit_b16.finetune.precision = 'bf16' is not allowed: bf16 needs compute capability "
        f"8.0 or newer and this GPU ({name}, compute capability {major}.{minor}) has no native bf16; "
        f"use fp16 (with its grad scaler) or auto"
    )


def test_the_device_asked_about_is_the_one_given(card):
    asked = card("t4")
    precision.resolve("auto", "cuda:1", "train.precision")
    assert asked and all(torch.device(d) == torch.device("cuda", 1) for d in asked)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_real_card():
    dev = torch.device("cuda", 0)
    native = torch.cuda.get_device_capability(dev) >= (8, 0)
    assert precision.resolve("auto", dev, "train.precision") == ("bf16" if native else "fp16")
    if native:
        assert precision.resolve("bf16", dev, "train.precision") == "bf16"
    else:
        with pytest.raises(ParamError, match=r"has no native bf16; use fp16 \(with its grad scaler\) or auto"):
            precision.resolve("bf16", dev, "train.precision")
    # the chosen precision runs a step under autocast, with the grad scaler for fp16
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision.resolve("auto", dev, "train.precision")]
    w = torch.randn(64, 64, device=dev, requires_grad=True)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    with torch.autocast("cuda", dtype=dtype):
        loss = (torch.randn(8, 64, device=dev) @ w).float().pow(2).mean()
    scaler.scale(loss).backward()
    assert torch.isfinite(w.grad).all()
