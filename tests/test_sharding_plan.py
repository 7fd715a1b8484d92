"""The planner's answer where the training state does not fit one device: shard it (FSDP)
over the devices there are, with the overrides to say so (vitpipe.costmodel.sharding)."""

import pytest

from vitpipe.cli import format_plan
from vitpipe.costmodel import compute, sharding
from vitpipe.costmodel.devices import get_device
from vitpipe.models import model_config
from vitpipe.plan import plan_model

GIANT = "vit_giant_patch14_224"  # 1.0 B parameters: 16 GB of fp32 AdamW state, more than a T4's 15 GB


def test_ddp_cannot_fit_a_t4_but_fsdp_over_four_does():
    r = plan_model(GIANT, device="t4", devices=4)
    assert r["micro_batch"] == 0  # replicated: not even one image
    sh = r["sharding"]
    assert (sh["parallel"], sh["nproc"]) == ("fsdp", 4) and sh["micro_batch"] >= 1
    assert 512 % (sh["micro_batch"] * 4) == 0  # whole micro-batches on every device
    t4 = get_device("t4")
    assert sh["per_device_required_bytes"] <= t4.memory_bytes
    # one step more would not fit: the largest micro-batch, not just one that fits
    cfg = model_config({"arch": GIANT}, 1000, 224)
    bigger = [d for d in compute.divisors(128) if d > sh["micro_batch"]]
    if bigger:
        peak = sharding.sharded_memory(cfg, bigger[0], 4)["peak"]
        assert compute.required_bytes(peak, t4) > t4.memory_bytes
    line = format_plan(r)
    assert "DDP does not fit even at micro-batch 1" in line
    assert f"set parallel: fsdp, micro_batch: {sh['micro_batch']}, nproc x nnodes = 4" in line


def test_one_device_is_told_how_many_would_do():
    r = plan_model(GIANT, device="t4")
    assert r["sharding"]["parallel"] is None and r["sharding"]["fewest_devices"] == 2
    assert "FSDP fits over 2 x t4 (--devices 2)" in format_plan(r)


def test_what_fits_replicated_stays_ddp():
    r = plan_model("vit_b16", device="t4", devices=4)
    assert r["sharding"]["parallel"] == "ddp" and r["micro_batch"] > 0


@pytest.mark.parametrize("world", [2, 4, 8])
def test_sharded_state_is_the_replicated_state_over_the_devices(world):
    cfg = model_config({"arch": "vit_l16"}, 1000, 224)
    full, part = compute.memory(cfg, 4), sharding.sharded_memory(cfg, 4, world)
    assert part["state"] == pytest.approx((full["weights"] + full["grads"] + full["optimizer"]) / world, rel=1e-3)
    assert part["activations"] == full["activations"]  # one micro-batch is one micro-batch
    assert part["peak"] < full["peak"]


def test_auto_shards_only_what_does_not_fit_replicated():
    from vitpipe.training.sharding import resolve

    t4 = get_device("t4")
    giant, base = (model_config({"arch": a}, 1000, 224) for a in (GIANT, "vit_b16"))
    assert resolve("auto", 4, "train", lambda: sharding.fits_replicated(giant, 1, t4)) == "fsdp"
    assert resolve("auto", 4, "train", lambda: sharding.fits_replicated(base, 8, t4)) == "ddp"
    assert resolve("fsdp", 1, "train") == "none"  # one process: nothing to shard
