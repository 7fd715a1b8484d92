"""The model registry: every spec builds what it names, and the compute model's parameter
count equals the real model's (built on the meta device, so ViT-H at 384 px is free)."""

import time

import pytest
import torch

from vitpipe.costmodel.compute import param_counts
from vitpipe.errors import ParamError, UserError
from vitpipe.models import (VIT_SIZES, build_model, describe, head_param_names, model_config,
                            reset_head, validate_spec)


def real_params(spec, num_classes, image_size):
    with torch.device("meta"):
        model = build_model(spec, num_classes, image_size)
    return sum(p.numel() for p in model.parameters())


def vit_sweep():
    """All sizes x patch 8/14/16/32 x 32/224/384 px where the patch divides the image;
    class counts rotate so every size meets several."""
    classes = [10, 100, 1000, 37]
    i = 0
    for size in VIT_SIZES:
        for patch in (8, 14, 16, 32):
            for image_size in (32, 224, 384):
                if image_size % patch == 0:
                    i += 1
                    yield f"vit_{size}{patch}", image_size, classes[i % len(classes)]


@pytest.mark.parametrize("arch,image_size,num_classes", list(vit_sweep()))
def test_vit_params_exact(arch, image_size, num_classes):
    spec = {"arch": arch}
    validate_spec(spec, image_size, "model")
    cfg = model_config(spec, num_classes, image_size)
    assert param_counts(cfg)["total"] == real_params(spec, num_classes, image_size)


@pytest.mark.parametrize("spec,image_size,num_classes", [
    ({"arch": "vit", "patch": 4, "dim": 96, "depth": 4, "heads": 3, "mlp_ratio": 2.0}, 32, 10),
    ({"arch": "vit", "patch": 4, "dim": 96, "depth": 4, "heads": 3, "mlp_ratio": 2.0, "pool": "avg"}, 32, 10),
    ({"arch": "vit", "patch": 2, "dim": 64, "depth": 1, "heads": 1, "mlp_ratio": 1.5}, 8, 2),
    ({"arch": "vit_b16", "depth": 6, "mlp_ratio": 2.0}, 224, 100),
    ({"arch": "vit_small_patch32_384"}, 384, 10),
    ({"arch": "vit_medium_patch16_gap_256"}, 256, 7),     # layer scale, no class token, avg
    ({"arch": "vit_base_patch16_clip_224"}, 224, 5),       # pre-norm
    ({"arch": "vit_base_patch16_reg4_gap_256"}, 256, 5),   # register tokens, no_embed_class
])
def test_vit_variants_params_exact(spec, image_size, num_classes):
    cfg = model_config(spec, num_classes, image_size)
    assert param_counts(cfg)["total"] == real_params(spec, num_classes, image_size)


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
                                  "resnet50d", "resnet26t", "resnet18d", "resnext50_32x4d",
                                  "wide_resnet50_2", "resnet50s"])
@pytest.mark.parametrize("image_size,num_classes", [(224, 1000), (32, 10)])
def test_resnet_params_exact(arch, image_size, num_classes):
    spec = {"arch": arch}
    cfg = model_config(spec, num_classes, image_size)
    assert param_counts(cfg)["total"] == real_params(spec, num_classes, image_size)


def test_resnet18_is_torchvisions_not_the_references():
    # the reference's Table 1 gives 33.3M "calculated" / 31.7M total for ResNet-18
    assert param_counts(model_config({"arch": "resnet18"}, 1000, 224))["total"] == real_params(
        {"arch": "resnet18"}, 1000, 224)
    assert abs(param_counts(model_config({"arch": "resnet18"}, 1000, 224))["total"] - 31.7e6) > 20e6


def test_components_sum_and_head_size():
    p = param_counts(model_config({"arch": "vit_b16"}, 100, 224))
    assert sum(v for k, v in p.items() if k != "total") == p["total"]
    assert p["head"] == 769 * 100
    assert p["pos_embed"] == 197 * 768


def test_build_forward_shapes_and_reset_head():
    vit = build_model({"arch": "vit", "patch": 4, "dim": 32, "depth": 1, "heads": 2, "mlp_ratio": 2.0,
                       "source": "fractal", "weights": None}, 10, 16)
    res = build_model({"arch": "resnet18"}, 10, 32)
    x = torch.randn(2, 3, 16, 16)
    assert vit(x).shape == (2, 10)
    reset_head(vit, 3)
    assert vit(x).shape == (2, 3)
    assert res(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    reset_head(res, 4)
    assert res(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    assert head_param_names(vit) == {"head.weight", "head.bias"}
    assert head_param_names(res) == {"fc.weight", "fc.bias"}
    with torch.device("meta"):
        timm_res = build_model({"arch": "resnet26"}, 5, 64)
    assert head_param_names(timm_res) == {"fc.weight", "fc.bias"}


def test_avg_pool_vit_has_no_class_token():
    m = build_model({"arch": "vit", "patch": 4, "dim": 32, "depth": 1, "heads": 2, "mlp_ratio": 2.0,
                     "pool": "avg"}, 10, 16)
    assert m.cls_token is None and m.global_pool == "avg"


def test_describe():
    assert describe({"arch": "vit", "patch": 4, "dim": 96, "depth": 4, "heads": 3, "mlp_ratio": 2.0}, 32) \
        == "ViT dim96 depth4 heads3 /4 @32px"
    assert describe({"arch": "vit_b16"}, 224) == "ViT-B/16 @224px"
    assert describe({"arch": "resnet18"}, 32) == "ResNet-18"


@pytest.mark.parametrize("spec,key,fragment", [
    ({"arch": "convnext_tiny"}, "m.arch", "timm ViT/ResNet"),
    ({"arch": "nope"}, "m.arch", "resnet18/34/50/101/152"),
    ({"arch": 3}, "m.arch", "vit_b16-style"),
    ({"arch": "vit", "patch": 3, "dim": 96, "depth": 4, "heads": 3, "mlp_ratio": 2.0}, "m.patch",
     "data.image_size=32 must be divisible by the patch (3); allowed patches: 1, 2, 4, 8, 16, 32"),
    ({"arch": "vit", "patch": 4, "dim": 96, "depth": 4, "heads": 5, "mlp_ratio": 2.0}, "m.heads", "divisor of dim=96"),
    ({"arch": "vit", "patch": 4, "dim": 96, "depth": 0, "heads": 3, "mlp_ratio": 2.0}, "m.depth", "positive integer"),
    ({"arch": "vit", "patch": 4, "dim": 96.0, "depth": 1, "heads": 3, "mlp_ratio": 2.0}, "m.dim", "positive integer"),
    ({"arch": "vit", "patch": 4, "dim": 96, "depth": 1, "heads": 3, "mlp_ratio": -1}, "m.mlp_ratio", "positive"),
    ({"arch": "vit", "patch": 4, "dim": 96, "depth": 1, "heads": 3}, "m.mlp_ratio", "needs"),
    ({"arch": "vit", "patch": 4, "dim": 96, "depth": 1, "heads": 3, "mlp_ratio": 2, "pool": "max"}, "m.pool", "avg"),
    ({"arch": "vit_b32", "patch": 12}, "m.patch", "allowed patches: 1, 2, 4, 8, 16, 32"),
])
def test_validate_spec_errors(spec, key, fragment):
    with pytest.raises(ParamError) as e:
        validate_spec(spec, 32, "m")
    assert e.value.key == key
    assert fragment in str(e.value)


@pytest.mark.parametrize("spec,key", [({"arch": "vit_b16"}, "m.patch"),
                                      ({"arch": "vit_small_patch16_224"}, "m.arch")])
def test_validate_spec_names_the_image_size_key(spec, key):
    with pytest.raises(ParamError) as e:
        validate_spec(spec, 40, "m", image_size_key="profile.image_size")
    assert e.value.key == key
    assert "profile.image_size=40 must be divisible by the patch (16); allowed patches: 1, 2, 4, 5, 8" in str(e.value)


def test_validate_spec_is_cheap():
    specs = [{"arch": a} for a in ("vit_b16", "resnet50", "vit_small_patch32_384", "resnet50d")]
    t = time.perf_counter()
    for _ in range(50):
        for s in specs:
            validate_spec(s, 224, "m")
    assert time.perf_counter() - t < 1.0


def test_not_plain_timm_vit_is_refused_clearly():
    with pytest.raises(UserError, match="not a plain ViT"):
        model_config({"arch": "vit_base_patch16_siglip_224"}, 10, 224)   # attention pooling
