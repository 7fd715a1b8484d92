"""What it looks at (vitpipe.evaluation.attention_maps): the hook reads the attention timm computes, rollout
of identity attention is the identity, maps sum to 1, a tiny ViT trained on a one-patch cue
attends to that patch, and Grad-CAM of a tiny CNN trained on the same cue peaks at it."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from vitpipe.errors import UserError
from vitpipe.evaluation import attention_maps as am

SIZE, CELL = 16, 4  # 16 px images, 4 px patches: a 4 x 4 grid
GRID = SIZE // CELL
RED, BLUE = (1.0, 0.1, 0.1), (0.1, 0.1, 1.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: fast and deterministic


def tiny_vit(**kw) -> VisionTransformer:
    torch.manual_seed(0)
    args = dict(img_size=SIZE, patch_size=CELL, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=2)
    return VisionTransformer(**{**args, **kw})


def cue_images(n: int, seed: int):
    """Grey noise with one coloured patch at a random grid cell; its colour is the class
    (red 0, blue 1). Returns images [n, 3, 16, 16] in 0..1, labels, the cue's cell index."""
    gen = torch.Generator().manual_seed(seed)
    x = (0.45 + 0.1 * torch.rand(n, 1, SIZE, SIZE, generator=gen)).repeat(1, 3, 1, 1)
    y = torch.randint(0, 2, (n,), generator=gen)
    cell = torch.randint(0, GRID * GRID, (n,), generator=gen)
    colours = torch.tensor([RED, BLUE])[y]
    for i in range(n):
        r, c = divmod(int(cell[i]), GRID)
        x[i, :, r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL] = colours[i][:, None, None]
    return x, y, cell


def train(model, steps: int, seed: int = 0):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for step in range(steps):
        x, y, _ = cue_images(64, seed * 10_000 + step)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


# ---------------------------------------------------------------------------------------
# Reading the weights


def manual_attention(block, x):
    """softmax(q·kᵀ / sqrt(d)) from the block's own qkv projection: what the hook must read."""
    a = block.attn
    B, N, C = x.shape
    qkv = a.qkv(x).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    return ((q * a.scale) @ k.transpose(-2, -1)).softmax(-1)


def test_hook_reads_the_softmax_timm_computes():
    model = tiny_vit().eval()
    assert all(b.attn.fused_attn for b in model.blocks)  # the default path keeps no weights
    inputs = []
    hooks = [b.attn.register_forward_hook(lambda m, args, out: inputs.append(args[0])) for b in model.blocks]
    x, _, _ = cue_images(3, seed=1)
    with torch.no_grad():
        fused_logits = model(x)
    for h in hooks:
        h.remove()
    weights = am.attention_weights(model, x)
    assert len(weights) == 2 and weights[0].shape == (3, 2, GRID * GRID + 1, GRID * GRID + 1)
    for block, inp, w in zip(model.blocks, inputs, weights):
        assert torch.allclose(w, manual_attention(block, inp), atol=1e-6)
        assert torch.allclose(w.sum(-1), torch.ones(()), atol=1e-6)
    assert all(b.attn.fused_attn for b in model.blocks)  # switched back
    with torch.no_grad():
        assert torch.allclose(model(x), fused_logits, atol=1e-5)


class OneHotPositions(nn.Module):
    """Replaces timm's q_norm / k_norm: token n's query and key become big x e_n, so q·kᵀ is
    big² on the diagonal and 0 elsewhere: softmax is the identity."""

    def forward(self, t):
        out = torch.zeros_like(t)
        n = torch.arange(t.shape[-2])
        out[..., n, n] = 100.0
        return out


def test_identity_attention_rolls_out_to_the_identity():
    model = tiny_vit(embed_dim=64, num_heads=2).eval()  # head_dim 32 >= 17 tokens
    for block in model.blocks:
        block.attn.q_norm, block.attn.k_norm = OneHotPositions(), OneHotPositions()
    x, _, _ = cue_images(2, seed=2)
    weights = am.attention_weights(model, x)
    eye = torch.eye(GRID * GRID + 1).expand(2, -1, -1)
    for w in weights:
        assert torch.allclose(w, eye[:, None].expand_as(w), atol=1e-6)
    assert torch.allclose(am.rollout_matrix(weights), eye, atol=1e-6)


def test_rollout_combination():
    eye = torch.eye(5).expand(1, 3, 5, 5)
    assert torch.equal(am.rollout_matrix([eye, eye, eye]), torch.eye(5)[None])
    torch.manual_seed(0)
    a1, a2 = (torch.rand(1, 3, 5, 5).softmax(-1) for _ in range(2))
    half = [0.5 * a.mean(1) + 0.5 * torch.eye(5) for a in (a1, a2)]  # Abnar & Zuidema's form
    assert torch.allclose(am.rollout_matrix([a1, a2]), half[1] @ half[0], atol=1e-6)
    assert torch.allclose(am.rollout_matrix([a1, a2]).sum(-1), torch.ones(1, 5), atol=1e-6)


@pytest.mark.parametrize("kw", [{}, {"global_pool": "avg", "class_token": False}, {"reg_tokens": 2}])
def test_maps_sum_to_one_over_the_patches(kw):
    model = tiny_vit(**kw)
    x, _, _ = cue_images(4, seed=3)
    maps = am.rollout(model, x)
    assert maps.shape == (4, GRID, GRID)
    assert (maps >= 0).all()
    assert torch.allclose(maps.sum((1, 2)), torch.ones(4), atol=1e-5)
    assert model.training  # left as found


def test_rollout_refuses_a_cnn():
    with pytest.raises(UserError):
        am.rollout(nn.Sequential(nn.Conv2d(3, 4, 3)), torch.zeros(1, 3, 8, 8))


# ---------------------------------------------------------------------------------------
# Trained on a one-patch cue, they look at the cue


def test_trained_vit_attends_to_the_cue_patch():
    x, y, cell = cue_images(48, seed=99)
    untrained = am.rollout(tiny_vit(), x).flatten(1)
    model = train(tiny_vit(), steps=150)
    assert (model(x).argmax(1) == y).float().mean() > 0.95
    maps = am.rollout(model, x).flatten(1)
    at_cue = maps[torch.arange(len(x)), cell]
    average = 1 / (GRID * GRID)
    assert (at_cue > average).all()  # every image: more than the average patch
    assert (maps.argmax(1) == cell).float().mean() > 0.9
    assert at_cue.mean() > 2 * untrained[torch.arange(len(x)), cell].mean()  # learnt, not contrast


def tiny_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 2),
    )


def test_grad_cam_of_a_trained_cnn_peaks_at_the_cue():
    model = train(tiny_cnn(), steps=100)
    x, y, cell = cue_images(48, seed=99)
    assert (model(x).argmax(1) == y).float().mean() > 0.95
    cam = am.grad_cam(model, x, layer=model[4])  # 8 x 8: each cue patch is 2 x 2 cells
    assert cam.shape == (48, 8, 8)
    assert torch.allclose(cam.sum((1, 2)), torch.ones(48), atol=1e-5)
    peak = cam.flatten(1).argmax(1)
    row, col = peak // 8 // 2, peak % 8 // 2
    assert ((row * GRID + col) == cell).float().mean() > 0.9
    # asking for the other class moves the weight off the cue
    other = am.grad_cam(model, x, target=1 - y, layer=model[4]).flatten(1)
    on_cue = cam.flatten(1).reshape(48, 4, 2, 4, 2).sum((2, 4)).flatten(1)[torch.arange(48), cell]
    other_on_cue = other.reshape(48, 4, 2, 4, 2).sum((2, 4)).flatten(1)[torch.arange(48), cell]
    assert other_on_cue.mean() < on_cue.mean()


def test_grad_cam_on_a_resnet_picks_a_stage_with_a_grid():
    import torchvision

    model = torchvision.models.resnet18(num_classes=3)
    for size, stage, side in ((32, "layer2", 4), (128, "layer4", 4)):
        x = torch.randn(2, 3, size, size)
        assert am.cam_layer_name(model, x) == stage
        maps, method = am.explain(model, x)
        assert maps.shape == (2, side, side) and method == f"Grad-CAM, {stage}"
        sums = maps.sum((1, 2))  # 1, or 0 where no channel's weighted activation is positive
        assert all(abs(v - 1) < 1e-5 or v == 0 for v in sums.tolist())
    assert model.training


# ---------------------------------------------------------------------------------------
# The figure


def test_attention_figure(tmp_path):
    x, y, _ = cue_images(4, seed=5)
    images = (x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    cnn = tiny_cnn()
    rows = {"ViT (rollout)": am.rollout(tiny_vit(), x), "CNN (Grad-CAM)": am.grad_cam(cnn, x, layer=cnn[4])}
    path = am.attention_figure(tmp_path / "maps.png", images, rows, [["red", "blue"][i] for i in y])
    data = open(path, "rb").read()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000


def test_pick_images_takes_each_class_in_turn():
    labels = np.array([2, 0, 1, 0, 2, 1, 0])
    assert am.pick_images(labels, per_class=2).tolist() == [1, 3, 2, 5, 0, 4]
    assert am.pick_images(labels, per_class=1, max_classes=2).tolist() == [1, 2]


def test_explain_split_keeps_the_order_and_round_trips(tmp_path):
    from vitpipe.data.prepared_store import Split

    x, y, _ = cue_images(6, seed=6)
    images = (x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    split = Split(images, y.numpy(), mean=[0.5] * 3, std=[0.25] * 3)
    idx = [4, 1, 5]  # Split.batch sorts; the result must not
    model = tiny_vit()
    result = am.explain_split(model, split, idx)
    assert result["method"] == "attention rollout"
    assert np.array_equal(result["images"], images[idx]) and result["labels"].tolist() == y[idx].tolist()
    expected = am.rollout(model, split.batch(np.array(idx))[0][torch.tensor([1, 0, 2])])
    assert np.allclose(result["maps"], expected.numpy(), atol=1e-6)
    am.write_maps(tmp_path / "maps.npz", result)
    back = am.read_maps(tmp_path / "maps.npz")
    assert back["method"] == "attention rollout" and np.array_equal(back["maps"], result["maps"])
    assert np.array_equal(back["indices"], idx)
