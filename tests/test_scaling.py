"""How the cost scales (vitpipe.report.scaling): the tables are the compute model's numbers,
the attention/rest split sums to the compute model's totals and matches FlopCounterMode,
the 50% crossover is found by bisection, the scaling-law paragraph is read from the table,
and the figures are written."""

import re

import pandas as pd
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vitpipe.costmodel import compute
from vitpipe.costmodel.devices import DEVICES, get_device
from vitpipe.models import build_model, model_config
from vitpipe.report import scaling as sc

SETTING = sc.REFERENCE_SETTING
TINY_VIT = {"arch": "vit", "patch": 4, "dim": 32, "depth": 2, "heads": 2, "mlp_ratio": 2.0}


@pytest.fixture(scope="module")
def tables():
    return sc.scaling_tables()


def cell(tables, arch, size):
    c = tables["cost"]
    return c[(c.arch == arch) & (c.image_size == size)].iloc[0]


# ---------------------------------------------------------------------------------------
# The table is the compute model


@pytest.mark.parametrize(
    "arch,size",
    [("vit_b16", 224), ("vit_ti8", 64), ("vit_l32", 512), ("vit_s16", 384), ("resnet50", 128), ("resnet18", 32)],
)
def test_table_equals_the_compute_model(tables, arch, size):
    row = cell(tables, arch, size)
    cfg = model_config({"arch": arch}, SETTING["num_classes"], size)
    f = compute.flops(cfg)
    est = compute.estimate(
        cfg, SETTING["batch"], SETTING["device"], SETTING["precision"], SETTING["optimizer"], SETTING["attention"]
    )
    assert row.params == compute.param_counts(cfg)["total"] == est["params"]
    assert (row.forward_flops, row.train_flops) == (f["forward"], f["train"])
    assert row.activation_bytes == est["activation_bytes"]
    assert row.activation_bytes_eager == compute.activation_bytes(cfg, SETTING["precision"], "eager")
    assert (row.peak_bytes, row.required_bytes) == (est["peak_bytes"], est["required_bytes"])
    assert bool(row.fits) == est["fits"]


@pytest.mark.parametrize(
    "arch,size,device",
    [("vit_b16", 224, "t4"), ("resnet50", 512, "a100-80"), ("vit_l8", 512, "t4"), ("vit_ti32", 32, "h200")],
)
def test_largest_batch_is_the_edge_of_the_plan(tables, arch, size, device):
    d = tables["devices"]
    best = d[(d.arch == arch) & (d.image_size == size) & (d.device == device)].max_batch.iloc[0]
    cfg = model_config({"arch": arch}, SETTING["num_classes"], size)
    dev = get_device(device)
    fits = (
        [
            compute.plan(cfg, b, dev, SETTING["precision"], SETTING["optimizer"], SETTING["attention"])["fits"]
            for b in (best, best + 1)
        ]
        if best
        else [False, False]
    )
    assert fits == ([True, False] if best else [False, False])
    if not best:  # not even one image: the plan finds no micro-batch either
        assert compute.plan(cfg, 1, dev)["micro_batch"] == 0


def test_the_reference_t4_reading(tables):
    # the compute model's own documented reading (docs/compute.md): ViT-B/32 at 224 px, batch 512, fp32
    # does not fit the T4 at once, ViT-B/16 does not either
    row = cell(tables, "vit_b32", 224)
    assert not row.fits and row.required_bytes / row.capacity_bytes == pytest.approx(1.19, abs=0.01)
    assert set(tables["devices"].device) == set(DEVICES)


# ---------------------------------------------------------------------------------------
# The attention / rest split (compute.attention_split)


@pytest.mark.parametrize(
    "spec,size",
    [
        ({"arch": "vit_b16"}, 224),
        ({"arch": "vit_ti8"}, 32),
        ({**TINY_VIT, "pool": "avg"}, 16),
        ({"arch": "vit_medium_patch16_gap_256"}, 64),
    ],
)
@pytest.mark.parametrize("precision,attention", [("fp32", "sdpa"), ("fp32", "eager"), ("bf16", "eager")])
def test_attention_split_sums_to_the_totals(spec, size, precision, attention):
    cfg = model_config(spec, 10, size)
    s = compute.attention_split(cfg, precision, attention)
    assert s["attention_flops"] + s["rest_flops"] == compute.flops(cfg)["forward"]
    assert s["attention_bytes"] + s["rest_bytes"] == compute.activation_bytes(cfg, precision, attention)
    assert 0 < s["flops_share"] < 1 and 0 < s["bytes_share"] < 1


def test_attention_flops_are_what_flop_counter_counts_as_the_token_mixing():
    # eager attention runs q·kᵀ and softmax·v as the only batched matmuls (aten.bmm)
    with torch.device("meta"):
        model = build_model(TINY_VIT, 10, 16)
        for block in model.blocks:
            block.attn.fused_attn = False
        with FlopCounterMode(display=False) as counter:
            model(torch.randn(3, 3, 16, 16))
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    split = compute.attention_split(model_config(TINY_VIT, 10, 16))
    assert counts["aten.bmm"] / 3 == split["attention_flops"]


def test_a_square_grid_at_tokens_is_the_model_itself():
    cfg = model_config({"arch": "vit_b16"}, 100, 224)
    assert compute.attention_split(sc.at_tokens(cfg, cfg.tokens)) == compute.attention_split(cfg)
    assert compute.flops(sc.at_tokens(cfg, cfg.tokens)) == compute.flops(cfg)


# ---------------------------------------------------------------------------------------
# The 50% crossover is found by the code


@pytest.mark.parametrize("arch", ["vit_ti16", "vit_b16", "vit_l32"])
@pytest.mark.parametrize("of,attention", [("flops", "sdpa"), ("bytes", "eager")])
def test_crossover_is_where_the_share_passes_half(tables, arch, of, attention):
    cfg = model_config({"arch": arch}, 100, 224)
    t = sc.crossover_tokens(cfg, of, "fp32", attention)
    assert sc.attention_share(cfg, t - 1, of, "fp32", attention) < 0.5
    assert sc.attention_share(cfg, t, of, "fp32", attention) >= 0.5
    row = tables["crossover"].set_index("arch").loc[arch]
    key = "flops" if of == "flops" else "bytes_eager"
    assert row[f"{key}_tokens"] == t
    assert row[f"{key}_px"] == pytest.approx(cfg.patch * (t - 1) ** 0.5)


def test_crossover_moves_with_the_width():
    # attention ∝ t²·d against the rest ∝ t·d²: twice the width, about twice the tokens
    narrow = model_config({**TINY_VIT, "dim": 64, "heads": 2}, 10, 16)
    wide = model_config({**TINY_VIT, "dim": 128, "heads": 4}, 10, 16)
    t1, t2 = (sc.crossover_tokens(c, "flops") for c in (narrow, wide))
    assert t2 / t1 == pytest.approx(2, rel=0.05)


def test_fused_attention_memory_never_crosses(tables):
    cfg = model_config({"arch": "vit_b16"}, 100, 224)
    assert sc.crossover_tokens(cfg, "bytes", "fp32", "sdpa") is None
    assert sc.attention_share(cfg, sc.MAX_TOKENS, "bytes", "fp32", "sdpa") < 0.5
    assert "never" in sc.share_verdict(tables)


# ---------------------------------------------------------------------------------------
# The scaling law is read from the table


def test_doubling_factors_are_ratios_of_the_table(tables):
    d = tables["doubling"].set_index(["network", "from_px", "to_px"])
    a, b = cell(tables, "vit_b16", 64), cell(tables, "vit_b16", 128)
    assert d.loc[("ViT-B/16", 64, 128), "forward_flops"] == pytest.approx(b.forward_flops / a.forward_flops)
    a, b = cell(tables, "resnet50", 224), cell(tables, "resnet50", 512)
    per_doubling = (b.forward_flops / a.forward_flops) ** (1 / 1.1926450779423958)  # log2(512 / 224)
    assert d.loc[("ResNet-50", 224, 512), "forward_flops"] == pytest.approx(per_doubling)


def test_scaling_law_quotes_the_table(tables):
    law = sc.scaling_law(tables)
    d = tables["doubling"].set_index(["network", "from_px", "to_px"])
    for q in ("forward_flops", "activation_bytes_eager", "peak_bytes"):
        assert f"×{d.loc[('ViT-B/16', 224, 512), q]:.2f}" in law
    assert "ResNet-50" in law and "quadruple" in law


def test_scaling_law_changes_with_the_numbers(tables):
    before = sc.scaling_law(tables)
    cost = tables["cost"].copy()
    b16_512 = (cost.network == "ViT-B/16") & (cost.image_size == 512)
    cost.loc[b16_512, "forward_flops"] *= 3  # as if attention were far dearer
    changed = {**tables, "cost": cost, "doubling": sc.doubling_table(cost)}
    after = sc.scaling_law(changed)
    assert after != before
    new = changed["doubling"].set_index(["network", "from_px", "to_px"]).loc[("ViT-B/16", 224, 512), "forward_flops"]
    assert f"the FLOPs grow {sc._x(new)}" in after


def test_growth_words_follow_the_factor():
    assert sc._grows(1.0).startswith("stay the same")
    assert sc._grows(4.05).startswith("quadruple")
    assert sc._grows(3.5) == "grow ×3.50"


# ---------------------------------------------------------------------------------------
# Figures and the section


def test_figures_and_section(tables, tmp_path):
    figures = sc.scaling_figures(tmp_path / "figures", tables, relative_to=tmp_path)
    assert set(figures) == {"flops", "memory", "attention_share", "max_batch"}
    for rel in figures.values():
        data = (tmp_path / rel).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000
    lines = sc.scaling_section(tables, figures)
    text = "\n".join(lines)
    # figures first, each followed by its number; one scaling-law paragraph; then the tables
    image_at = [i for i, line in enumerate(lines) if line.startswith("![")]
    assert len(image_at) == 4 and all(re.search(r"\d", lines[i + 2]) for i in image_at)
    assert text.count("**The scaling law.**") == 1
    law_at = next(i for i, line in enumerate(lines) if line.startswith("**The scaling law"))
    assert image_at[-1] < law_at
    assert "| ViT-B/16" in text and "| ResNet-50" in text


def test_setting_from_the_profile(tables):
    # analysis.profile_setting's keys: a smaller batch on another card changes the fit, nothing else
    other = sc.scaling_tables({"batch": 64, "device": "a100-80", "image_size": 224, "steps": 10})
    assert other["setting"].iloc[0].batch == 64
    row = other["cost"].query("arch == 'vit_b16' and image_size == 224").iloc[0]
    assert row.fits and row.forward_flops == cell(tables, "vit_b16", 224).forward_flops
    assert isinstance(other["cost"], pd.DataFrame)
