"""Pretrained weights: original vit_jax .npz, local .pt/.safetensors, the timm hub (cache only)."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed

from vitpipe.errors import UserError
from vitpipe.models import build_model
from vitpipe.models.weights import import_weights, load_backbone

SPEC = {"arch": "vit", "patch": 4, "dim": 32, "depth": 2, "heads": 2, "mlp_ratio": 2.0}


def random_vit(image_size=16, num_classes=7, seed=0, **spec):
    """A small timm ViT with every tensor random (LayerNorms included), so nothing matches by luck."""
    torch.manual_seed(seed)
    model = build_model({**SPEC, **spec}, num_classes, image_size).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def write_vit_jax_npz(model, path: Path, prefix: str = "") -> None:
    """The inverse of timm's _load_weights: a timm ViT in google-research/vision_transformer's
    .npz layout (Flax names; kernels as (in, out); attention as (dim, heads, head_dim))."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    dim = sd["cls_token"].shape[-1]
    heads = model.blocks[0].attn.num_heads
    hd = dim // heads
    w = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),  # (D,C,p,p) -> (p,p,C,D)
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
        # the in21k checkpoints carry a pre-logits layer that fine-tuning never uses
        "pre_logits/kernel": np.zeros((dim, dim), np.float32),
        "pre_logits/bias": np.zeros(dim, np.float32),
    }
    for i in range(len(model.blocks)):
        b, jb = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, name in enumerate(("query", "key", "value")):
            w[jb + f"MultiHeadDotProductAttention_1/{name}/kernel"] = qkv_w[j * dim : (j + 1) * dim].T.reshape(
                dim, heads, hd
            )
            w[jb + f"MultiHeadDotProductAttention_1/{name}/bias"] = qkv_b[j * dim : (j + 1) * dim].reshape(heads, hd)
        w[jb + "MultiHeadDotProductAttention_1/out/kernel"] = (
            sd[b + "attn.proj.weight"].reshape(dim, heads, hd).transpose(1, 2, 0)
        )
        w[jb + "MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
        for ln, tn in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[jb + f"{ln}/scale"], w[jb + f"{ln}/bias"] = sd[b + tn + ".weight"], sd[b + tn + ".bias"]
        for r in range(2):
            w[jb + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            w[jb + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **{prefix + k: np.ascontiguousarray(v, dtype=np.float32) for k, v in w.items()})


@pytest.fixture(scope="module")
def npz_model(tmp_path_factory):
    model = random_vit()
    path = tmp_path_factory.mktemp("npz") / "ViT-T_4.npz"
    write_vit_jax_npz(model, path)
    return model, path


def features(model, x):
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def test_npz_loads_into_build_model_vit_with_same_outputs(npz_model):
    source, path = npz_model
    state = import_weights(SPEC, "npz", str(path), 16)
    assert "head.weight" not in state and "pos_embed" in state
    target = build_model(SPEC, 5, 16).eval()  # another label set: a new head
    report = load_backbone(target, state)
    assert report["pos_embed_resized"] is None and report["loaded"] == len(state)
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(features(target, x), features(source, x), rtol=1e-5, atol=1e-5)
    # the same checkpoint through load_backbone directly (head dropped, whatever its size)
    again = build_model(SPEC, 3, 16).eval()
    load_backbone(again, source.state_dict())
    torch.testing.assert_close(features(again, x), features(source, x))


def test_npz_saved_with_optimizer_state_prefix(tmp_path):
    source = random_vit(seed=2, depth=1)
    write_vit_jax_npz(source, tmp_path / "ckpt.npz", prefix="opt/target/")
    target = build_model({**SPEC, "depth": 1}, 4, 16).eval()
    load_backbone(target, import_weights({**SPEC, "depth": 1}, "npz", str(tmp_path / "ckpt.npz"), 16))
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(features(target, x), features(source, x), rtol=1e-5, atol=1e-5)


def test_npz_pos_embed_resized_to_finetuning_resolution(npz_model):
    source, path = npz_model  # 16 px / patch 4: a 4x4 grid, like 224/16 = 14x14
    state = import_weights(SPEC, "npz", str(path), 24)  # 6x6, like 384/16 = 24x24
    expected = resample_abs_pos_embed(source.pos_embed.detach(), new_size=[6, 6], num_prefix_tokens=1)
    assert state["pos_embed"].shape == (1, 1 + 36, 32)
    torch.testing.assert_close(state["pos_embed"], expected)
    torch.testing.assert_close(state["pos_embed"][:, :1], source.pos_embed[:, :1].detach())  # class token kept
    target = build_model(SPEC, 5, 24).eval()
    report = load_backbone(target, state)
    assert report["pos_embed_resized"] is None  # already at 6x6
    assert target(torch.randn(2, 3, 24, 24)).shape == (2, 5)
    # load_backbone resizes too, when handed the 4x4 original
    other = build_model(SPEC, 5, 24)
    assert load_backbone(other, source.state_dict())["pos_embed_resized"] == [[4, 4], [6, 6]]


@pytest.mark.parametrize(
    "change,names,hint",
    [
        (
            {"patch": 8},
            ["patch_embed.proj.weight (32, 3, 4, 4) vs (32, 3, 8, 8)"],
            "patch 4 in the checkpoint, 8 in the model",
        ),
        (
            {"dim": 48, "heads": 2},
            ["cls_token (1, 1, 32) vs (1, 1, 48)", "blocks.0.attn.qkv.weight (96, 32) vs (144, 48)"],
            "width (dim) 32 in the checkpoint, 48 in the model",
        ),
        ({"depth": 3}, ["missing from the checkpoint", "blocks.2.attn.qkv.weight"], "other patch size, width, depth"),
    ],
)
def test_mismatched_shapes_name_the_tensors(npz_model, change, names, hint):
    _, path = npz_model
    with pytest.raises(UserError) as e:
        import_weights({**SPEC, **change}, "npz", str(path), 16, key="variants.vit_small")
    msg = str(e.value)
    assert "variants.vit_small.weights" in msg and hint in msg
    for name in names:
        assert name in msg


def test_pt_and_safetensors_files(tmp_path):
    source = random_vit(seed=1)
    x = torch.randn(2, 3, 16, 16)
    sd = source.state_dict()
    files = {
        "plain.pt": lambda p: torch.save(sd, p),
        "wrapped.pt": lambda p: torch.save({"state_dict": sd, "step": 3, "spec": dict(SPEC)}, p),
        "ddp.pth": lambda p: torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, p),
        "w.safetensors": lambda p: save_file({k: v.contiguous() for k, v in sd.items()}, str(p)),
    }
    for name, write in files.items():
        write(tmp_path / name)
        state = import_weights(SPEC, "file", str(tmp_path / name), 16)
        target = build_model(SPEC, 10, 16).eval()
        load_backbone(target, state)
        torch.testing.assert_close(features(target, x), features(source, x), msg=name)


class RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_file_errors(tmp_path):
    with pytest.raises(UserError, match=r"variants\.v1\.weights: .*nope\.pt not found"):
        import_weights(SPEC, "file", str(tmp_path / "nope.pt"), 16, key="variants.v1")
    with pytest.raises(UserError, match=r"variants\.<variant>\.weights: .*ViT-B_16\.npz not found"):
        import_weights(SPEC, "npz", str(tmp_path / "ViT-B_16.npz"), 16)
    marker = tmp_path / "pwned"
    torch.save({"state_dict": RunsCommand(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="weights_only=True"):
        import_weights(SPEC, "file", str(tmp_path / "evil.pt"), 16)
    assert not marker.exists()
    torch.save({"note": "no tensors here"}, tmp_path / "empty.pt")
    with pytest.raises(UserError, match="holds no state dict"):
        import_weights(SPEC, "file", str(tmp_path / "empty.pt"), 16)
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(UserError, match="not an original vit_jax checkpoint"):
        import_weights(SPEC, "npz", str(tmp_path / "other.npz"), 16)


TIMM_SCRIPT = textwrap.dedent("""
    import os, sys, torch, timm
    from safetensors.torch import save_file
    from vitpipe.errors import UserError
    from vitpipe.models.weights import import_weights

    name, spec = "test_vit.r160_in1k", {"arch": "test_vit"}
    try:
        import_weights(spec, "timm", name, 160, key="variants.tv")
        sys.exit("no error without network or cache")
    except UserError as e:
        print("MESSAGE:", e)

    # The Hugging Face cache layout, as a previous online run leaves it: used with no network.
    torch.manual_seed(0)
    src = timm.create_model(name, pretrained=False)
    repo = os.path.join(os.environ["HF_HOME"], "hub", "models--timm--" + name)
    os.makedirs(os.path.join(repo, "snapshots", "0" * 40))
    os.makedirs(os.path.join(repo, "refs"))
    open(os.path.join(repo, "refs", "main"), "w").write("0" * 40)
    save_file(src.state_dict(), os.path.join(repo, "snapshots", "0" * 40, "model.safetensors"))
    state = import_weights(spec, "timm", name, 96)
    want = src.state_dict()
    assert "head.weight" not in state and state["pos_embed"].shape[1] == 1 + 6 * 6, state["pos_embed"].shape
    assert all(torch.equal(state[k], want[k]) for k in state if k != "pos_embed")
    print("CACHE OK")
""")


def test_timm_source_uses_cache_and_explains_offline(tmp_path):
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", TIMM_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    message = next(line for line in out.stdout.splitlines() if line.startswith("MESSAGE:"))
    for needed in (
        "test_vit.r160_in1k",
        "network",
        "cache",
        "variants.tv.source: npz",
        "source: file",
        "variants.tv.source: fractal",
    ):
        assert needed in message
    assert "CACHE OK" in out.stdout


def test_timm_unknown_name_is_a_param_error():
    with pytest.raises(UserError, match=r"variants\.<variant>\.weights"):
        import_weights({"arch": "vit_b16"}, "timm", "vit_nonexistent_patch16_224.in21k", 224)
    with pytest.raises(UserError, match="pretrained tag"):
        import_weights({"arch": "vit_b16"}, "timm", "vit_base_patch16_224.no_such_tag", 224)


@pytest.mark.parametrize("name", ["cut.pt", "cut.npz", "cut.safetensors"])
def test_a_weights_file_cut_short_is_one_line_that_says_download_it_again(tmp_path, name):
    """A download cut short (the first 60 % of a whole file's bytes): one UserError naming the
    key and the file, for each format, never a traceback from zipfile or safetensors."""
    sd = random_vit(seed=2).state_dict()
    whole = tmp_path / f"whole{Path(name).suffix}"
    if name.endswith(".pt"):
        torch.save(sd, whole)
    elif name.endswith(".npz"):
        write_vit_jax_npz(random_vit(seed=2), whole)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(whole))
    data = whole.read_bytes()
    (tmp_path / name).write_bytes(data[: int(len(data) * 0.6)])
    source = "npz" if name.endswith(".npz") else "file"
    with pytest.raises(UserError) as e:
        import_weights(SPEC, source, str(tmp_path / name), 16, key="variants.v1")
    msg = str(e.value)
    assert msg.startswith(f"variants.v1.weights: {tmp_path / name} cannot be read (") and "\n" not in msg, msg
    assert "download it again" in msg
