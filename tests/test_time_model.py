"""The time model (vitpipe.costmodel.steptime) against the one table it was fitted to: timm's
RTX 3090 AMP training throughputs (vitpipe/costmodel/calibration/rtx3090_train_amp.csv),
and the device table's format."""

import csv
import statistics

import pytest

from vitpipe.costmodel import devices, steptime
from vitpipe.errors import UserError
from vitpipe.models import model_config

CALIBRATION = steptime.CALIBRATION


def calibration_rows():
    return list(csv.DictReader(line for line in CALIBRATION.open() if not line.startswith("#")))


def test_rtx3090_training_table_is_predicted():
    rows = calibration_rows()
    assert len(rows) >= 30 and {r["vitpipe_arch"].split("_")[0] for r in rows} == {
        "vit",
        "resnet18",
        "resnet34",
        "resnet50",
        "resnet101",
        "resnet152",
        "convnext",
    }
    errors = steptime.calibration_errors()
    assert len(errors) == len(rows)
    absolute = [abs(e["error"]) for e in errors]
    assert statistics.median(absolute) <= 0.10
    assert sum(a <= 0.25 for a in absolute) >= 0.9 * len(absolute)
    assert max(absolute) <= 0.40, max(errors, key=lambda e: abs(e["error"]))


def test_gemm_efficiency_follows_shape():
    sms = 82
    big = steptime.gemm_efficiency(8192, 8192, 8192, sms)
    assert 0.95 * steptime.GEMM_EFFICIENCY < big <= steptime.GEMM_EFFICIENCY
    # one more tile than the SMs hold: a second, nearly empty wave
    assert steptime.gemm_efficiency(128 * 83, 128, 4096, sms) < 0.6 * steptime.GEMM_EFFICIENCY
    # a short reduction spends a large share in the tile's prologue and epilogue
    assert steptime.gemm_efficiency(8192, 8192, 64, sms) < 0.6 * big


def test_eager_attention_is_slower_than_fused_and_inference_faster_than_training():
    cfg = model_config({"arch": "vit_b16"}, 1000, 384)
    dev = devices.get_device("a100-80")
    eager = steptime.step_time(cfg, 64, dev, "bf16", "eager")
    fused = steptime.step_time(cfg, 64, dev, "bf16", "sdpa")
    infer = steptime.step_time(cfg, 64, dev, "bf16", "sdpa", train=False)
    assert eager["seconds"] > 1.1 * fused["seconds"]
    assert 2.5 * infer["seconds"] < fused["seconds"] < 4 * infer["seconds"]
    assert fused["seconds"] == pytest.approx(fused["compute_s"] + fused["memory_s"] + fused["overhead_s"])


def test_a_faster_card_is_faster():
    cfg = model_config({"arch": "vit_b16"}, 1000, 224)
    t = {
        d: steptime.step_time(cfg, 128, devices.get_device(d), "fp16")["img_per_s"]
        for d in ("t4", "v100-16", "a100-80", "h100-80")
    }
    assert t["t4"] < t["v100-16"] < t["a100-80"] < t["h100-80"]


def test_every_listed_card_has_its_datasheet():
    for name in ("t4", "p100", "v100-16", "l4", "a10g", "a100-40", "a100-80", "h100-80", "h200", "rtx3090"):
        d = devices.get_device(name)
        assert d.bandwidth > 1e11 and d.sm_count >= 40 and d.l2_bytes >= 4 * 2**20 and d.memory_bytes > 14 * 2**30
    assert devices.get_device("rtx3090").peak("fp16") == 71e12  # fp32 accumulation: half rate
    assert devices.get_device("t4").peak("bf16") == devices.get_device("t4").peak("fp32")  # no bf16 units


def test_a_users_card_from_a_file(tmp_path):
    f = tmp_path / "my-card.yaml"
    f.write_text(
        "name: my-card\nmemory_gib: 24\npeak_tflops: {fp32: 30, tf32: 60, bf16: 120, fp16: 120}\n"
        "memory_bandwidth_gbs: 900\nsm_count: 80\nl2_mib: 40\n"
    )
    d = devices.get_device(str(f))
    assert d.name == "my-card" and d.memory_bytes == 24 * 2**30 and d.peak("bf16") == 120e12
    assert d.bandwidth == 900e9 and d.sm_count == 80


def test_a_bad_card_file_names_every_problem(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("name: bad\nmemory_gib: -1\npeak_tflops: {fp16: 100}\nsm_count: 80\nl2_mib: 40\ncolour: red\n")
    with pytest.raises(UserError) as e:
        devices.get_device(str(f))
    lines = str(e.value).splitlines()
    assert any("missing memory_bandwidth_gbs" in x for x in lines)
    assert any("memory_gib" in x and "-1" in x for x in lines)
    assert any("peak_tflops" in x and "fp32" in x for x in lines)
    assert any("unknown key 'colour'" in x for x in lines)
