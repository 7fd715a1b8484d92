"""Every model family sharded under FSDP2 on 2 CPU processes (gloo), with channels-last forced
as a CNN gets it on CUDA: a ViT, a ResNet and a ConvNeXt each hold about half the training
state per process and end where DDP ends. And the units the cost model counts are the very
modules training shards (Family.shard_units / shard_unit_params, one family file)."""

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from vitpipe.models import build_model, family_of, model_config, shard_units

SPECS = {
    "vit": {"arch": "vit", "patch": 4, "dim": 32, "depth": 2, "heads": 2, "mlp_ratio": 2.0},
    "resnet": {"arch": "resnet18"},
    "convnext": {"arch": "convnext_atto"},
}
SIZE, CLASSES, LR = 32, 10, 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fit_both(rank: int, world: int, ports: list[int], out: str, spec: dict) -> None:
    """One process of a 2-process job: the same run under DDP, then under FSDP, both with the
    channels-last layout the loop gives a CNN on CUDA (weights too where it may)."""
    from pathlib import Path

    import numpy as np

    from vitpipe.data.prepared_store import Split
    from vitpipe.params import TrainParams
    from vitpipe.training import loop
    from vitpipe.training.distributed import seed_everything

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    loop.channels_last_for = lambda model, device: True  # what a CNN gets on CUDA; FSDP2 refused its weights
    rng = np.random.default_rng(0)
    data = Split(
        rng.integers(0, 256, (64, SIZE, SIZE, 3), dtype=np.uint8), rng.integers(0, CLASSES, 64), [0.5] * 3, [0.25] * 3
    )
    for parallel, port in zip(("ddp", "fsdp"), ports):
        os.environ["MASTER_PORT"] = str(port)
        seed_everything(0)
        model = build_model(spec, CLASSES, SIZE)
        where = Path(out) / parallel
        # SGD: an update in proportion to its gradient (AdamW's first steps move every weight by
        # about +-lr, so the sign of a near-zero gradient decides, and the order of the sums may flip it)
        recipe = TrainParams(
            steps=2,
            batch_size=16,
            micro_batch=4,
            optimizer="sgd",
            lr=LR,
            warmup_steps=1,
            nproc=world,
            grad_clip=1.0,
            parallel=parallel,
            resume="fresh",
            checkpoint_every=10**6,
            eval_every=10**6,
        )
        loop.fit(
            loop.TrainingJob(
                model,
                data,
                recipe,
                loop.RunPaths(where / "model.pt", where / "metrics.json", where / "plots"),
                val=None,
                run_config={"spec": spec, "image_size": SIZE},
                fresh_key="train.resume",
                weights_meta={"spec": spec, "num_classes": CLASSES},
                desc=parallel,
                quiet=True,
                store_dir=Path(out) / "store",
            )
        )


def initial(family: str) -> dict:
    """The starting weights of `fit_both`'s runs."""
    from vitpipe.training.distributed import seed_everything

    seed_everything(0)
    return build_model(SPECS[family], CLASSES, SIZE).state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("family", SPECS)
def test_fsdp_shards_every_family_in_half_and_ends_where_ddp_ends(family, tmp_path):
    mp.spawn(fit_both, args=(2, [free_port(), free_port()], str(tmp_path), SPECS[family]), nprocs=2)
    ddp, fsdp = (json.loads((tmp_path / p / "metrics.json").read_text()) for p in ("ddp", "fsdp"))
    assert (ddp["parallel"], fsdp["parallel"]) == ("ddp", "fsdp")
    ratio = fsdp["state_bytes_per_process"] / ddp["state_bytes_per_process"]
    # dim-0 splits are not always even (a 1-row position embedding lives whole on rank 0)
    assert 0.5 <= ratio < 0.56, (family, ratio)
    a, b = (torch.load(tmp_path / p / "model.pt", weights_only=True)["state_dict"] for p in ("ddp", "fsdp"))
    assert a.keys() == b.keys()
    start = initial(family)
    moved = sum((a[k].float() - start[k].float()).norm() ** 2 for k in a) ** 0.5
    apart = sum((a[k].float() - b[k].float()).norm() ** 2 for k in a) ** 0.5
    # the same sums in another order (reduce-scatter against all-reduce), and on CPU channels-last
    # and contiguous weights run other convolution kernels: float noise, amplified by BatchNorm
    # over micro-batches of 4 random images (ResNet: about 1e-4 of the update)
    print(f"{family}: FSDP's weights {float(apart / moved):.1e} of the update from DDP's; state ratio {ratio:.3f}")
    assert moved > 0.1 and apart < 1e-3 * moved, (family, float(apart), float(moved))


@pytest.mark.parametrize("family", SPECS)
def test_the_cost_models_units_are_the_modules_training_shards(family):
    spec = SPECS[family]
    with torch.device("meta"):
        model = build_model(spec, CLASSES, SIZE)
    units = shard_units(model)
    assert len(units) > 1
    counted = family_of(spec["arch"]).shard_unit_params(model_config(spec, CLASSES, SIZE))
    assert counted == [sum(p.numel() for p in u.parameters()) for u in units]


def test_sharding_makes_channels_last_weights_contiguous():
    """fully_shard refuses channels-last parameters (NotImplementedError: FSDP does not support
    non-contiguous parameters); shard() hands it contiguous ones, the same values."""
    import torch.distributed as dist

    from vitpipe.training import sharding

    model = build_model(SPECS["resnet"], CLASSES, SIZE).to(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not model.conv1.weight.is_contiguous()
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        sharding.shard(model, torch.device("cpu"), 1)
        full = sharding.full_model_state(model)
    finally:
        dist.destroy_process_group()
    assert all(torch.equal(full[k], before[k]) for k in before)
