"""What a model looks at: attention rollout for timm ViTs (Abnar & Zuidema, 2020), Grad-CAM
for CNNs (Selvaraju et al., 2017), and a figure of a few test images with each model's map.

Rollout reads the attention weights timm's blocks compute. With fused attention (SDPA, the
default) timm never materialises them, so for the one forward pass that reads them each
block's `fused_attn` is switched off and a forward hook on `attn.attn_drop` (the dropout
applied to the softmax output; the identity in eval mode) takes the softmax probabilities.
The switch is undone afterwards, whatever happens.

Entry points:
    rollout(model, images)            -> [N, grid_h, grid_w], each map sums to 1
    grad_cam(model, images, target)   -> [N, H', W'], each map sums to 1 (0 where nothing is positive)
    explain(model, images)            -> rollout for a ViT, Grad-CAM otherwise, and the method's name
    explain_split(model, split, idx)  -> maps + uint8 images + labels for a store split, for `write_maps`
    attention_figure(path, images_uint8, rows, class_names) -> path of the PNG
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vitpipe.errors import UserError

MIN_GRID = 4  # Grad-CAM's default layer: the deepest stage with at least 4 x 4 cells


# ---------------------------------------------------------------------------------------
# Attention rollout


def is_vit(model) -> bool:
    """A network of an attention family (timm's VisionTransformer): rollout reads its blocks."""
    from vitpipe.models import family_of_model

    family = family_of_model(model)
    return family is not None and family.attention


@contextlib.contextmanager
def eager_attention(model):
    """Run timm's eager attention path (softmax materialised) inside the block, then restore."""
    attns = [block.attn for block in model.blocks]
    fused = [a.fused_attn for a in attns]
    try:
        for a in attns:
            a.fused_attn = False
        yield
    finally:
        for a, was in zip(attns, fused):
            a.fused_attn = was


@torch.no_grad()
def attention_weights(model, images: torch.Tensor) -> list[torch.Tensor]:
    """The softmax attention of every block, [N, heads, tokens, tokens] each (float32), from
    one forward pass in eval mode."""
    for i, block in enumerate(model.blocks):
        if not (hasattr(block.attn, "fused_attn") and hasattr(block.attn, "attn_drop")):
            raise UserError(f"block {i} of {type(model).__name__} has no timm Attention to read")
    weights = []
    hooks = [
        block.attn.attn_drop.register_forward_hook(lambda m, args, out: weights.append(out.float()))
        for block in model.blocks
    ]
    training = model.training
    model.eval()
    try:
        with eager_attention(model):
            model(images)
    finally:
        for h in hooks:
            h.remove()
        model.train(training)
    if len(weights) != len(model.blocks):
        raise UserError(f"read {len(weights)} attention maps from {len(model.blocks)} blocks")
    return weights


def rollout_matrix(weights: list[torch.Tensor]) -> torch.Tensor:
    """Abnar & Zuidema's rollout, [N, tokens, tokens]: per layer the head-averaged attention
    plus the identity for the residual connection, rows renormalised, multiplied from the
    first layer to the last."""
    result = None
    for w in weights:
        a = w.mean(1)
        a = a + torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a / a.sum(-1, keepdim=True)
        result = a if result is None else a @ result
    return result


def patch_map(matrix: torch.Tensor, prefix_tokens: int, pool: str, grid: tuple[int, int]) -> torch.Tensor:
    """The rollout of what the classifier reads, over the patch tokens, [N, grid_h, grid_w],
    normalised to sum 1: the class token's row (token pooling), or the mean of the patch
    tokens' rows (average pooling)."""
    patches = matrix[:, :, prefix_tokens:]
    if pool == "token":
        row = patches[:, 0]
    elif pool in ("avg", "avgmax", "max"):
        row = patches[:, prefix_tokens:].mean(1)
    else:
        raise UserError(f"rollout does not know global_pool={pool!r} (attention pooling)")
    row = row / row.sum(-1, keepdim=True).clamp_min(1e-12)  # zero only if the class token ignores every patch
    return row.reshape(-1, *grid)


def rollout(model, images: torch.Tensor) -> torch.Tensor:
    """Attention rollout maps of a timm VisionTransformer, [N, grid_h, grid_w], sum 1 each."""
    if not is_vit(model):
        raise UserError(f"rollout needs a timm VisionTransformer, got {type(model).__name__}")
    matrix = rollout_matrix(attention_weights(model, images))
    ph, pw = model.patch_embed.patch_size
    grid = (images.shape[-2] // ph, images.shape[-1] // pw)
    return patch_map(matrix, model.num_prefix_tokens, model.global_pool, grid)


# ---------------------------------------------------------------------------------------
# Grad-CAM


def cam_layer_name(model, images: torch.Tensor, min_grid: int = MIN_GRID) -> str:
    """The stage Grad-CAM reads by default: the deepest of the stages the model's family names
    (a ResNet's layer4..layer1, a ConvNeXt's stages.3..stages.0) whose output has at least
    `min_grid` cells a side (a ResNet's layer4 is 1 x 1 at 32 px), else the largest."""
    from vitpipe.models import cam_layer_names

    stages = cam_layer_names(model)
    if not stages:
        raise UserError(f"{type(model).__name__} has no known CNN stages: pass the layer to grad_cam")
    sizes = {}
    hooks = [
        model.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: sizes.__setitem__(n, out.shape[-2:]))
        for n in stages
    ]
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(images[:1])
    finally:
        for h in hooks:
            h.remove()
        model.train(training)
    for n in stages:
        if min(sizes[n]) >= min_grid:
            return n
    return max(stages, key=lambda n: sizes[n][0] * sizes[n][1])


def grad_cam(model, images: torch.Tensor, target=None, layer=None) -> torch.Tensor:
    """Grad-CAM maps, [N, H', W'] at `layer`'s resolution, each normalised to sum 1: the
    layer's channels weighted by the mean gradient of the target logit, summed, ReLU.
    target: class indices (int or [N]); None = each image's predicted class. layer: a module
    or a stage name; None = `cam_layer_name`."""
    if layer is None or isinstance(layer, str):
        layer = model.get_submodule(layer or cam_layer_name(model, images))
    captured = {}
    hook = layer.register_forward_hook(lambda m, args, out: captured.__setitem__("a", out))
    training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            x = images.detach().requires_grad_(True)  # a graph even if the weights are frozen
            logits = model(x)
            if target is None:
                target = logits.argmax(1)
            target = torch.as_tensor(target, device=logits.device).expand(len(logits))
            score = logits.gather(1, target[:, None]).sum()
            activations = captured["a"]
            (grads,) = torch.autograd.grad(score, activations)
    finally:
        hook.remove()
        model.train(training)
    weights = grads.mean((2, 3), keepdim=True)
    cam = F.relu((weights * activations).sum(1)).detach()
    return cam / cam.sum((1, 2), keepdim=True).clamp_min(1e-12)


def explain(model, images: torch.Tensor) -> tuple[torch.Tensor, str]:
    """The map that fits the model: (rollout, "attention rollout") for a ViT, else
    (Grad-CAM of the default stage, "Grad-CAM, <stage>")."""
    if is_vit(model):
        return rollout(model, images), "attention rollout"
    name = cam_layer_name(model, images)
    return grad_cam(model, images, layer=name), f"Grad-CAM, {name}"


def pick_images(labels, per_class: int = 2, max_classes: int = 10) -> np.ndarray:
    """Indices of the first `per_class` images of each of the first `max_classes` classes
    present, class by class: the same test images for every model."""
    labels = np.asarray(labels)
    chosen = [np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)[:max_classes]]
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=int)


def explain_split(model, split, indices, device="cpu") -> dict:
    """Maps for the images of a prepared-store split (`vitpipe.data.prepared_store.Split`)
    at `indices`, in that order: {indices, labels, images (uint8 N x H x W x 3), maps
    (float32 N x h x w), method}. What the evaluate stage saves with `write_maps`."""
    idx = np.asarray(indices, dtype=np.int64)
    x, y = split.batch(idx)  # rows come back in sorted index order
    rank = torch.as_tensor(np.argsort(np.argsort(idx)))
    x, y = x[rank], y[rank]
    maps, method = explain(model, x.to(device))
    return {
        "indices": idx,
        "labels": y.numpy(),
        "images": np.asarray(split.x[np.sort(idx)])[rank.numpy()],
        "maps": maps.detach().float().cpu().numpy(),
        "method": method,
    }


def write_maps(path, result: dict) -> None:
    """Save `explain_split`'s result as one .npz (atomically: a DVC output)."""
    from vitpipe.atomic import atomic_path

    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **{k: np.asarray(v) for k, v in result.items()})


def read_maps(path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        out = {k: z[k] for k in z.files}
    out["method"] = str(out["method"])
    return out


# ---------------------------------------------------------------------------------------
# The figure


def attention_figure(
    path, images_uint8, rows: dict[str, torch.Tensor], class_names, title: str = "What each model looks at"
) -> str:
    """Test images in columns (titled with their class), one row per model with its map over
    the image. Each map is shown relative to its own maximum, so bright = where that model
    puts the most weight. Writes a PNG at `path`; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vitpipe.atomic import atomic_path

    images = np.asarray(images_uint8)
    n = len(images)
    fig, axes = plt.subplots(1 + len(rows), n, figsize=(1.25 * n + 1.6, 1.3 * (1 + len(rows)) + 0.9), squeeze=False)
    height, width = images.shape[1:3]
    shown = None
    for j in range(n):
        axes[0, j].imshow(images[j], interpolation="nearest")
        axes[0, j].set_title(str(class_names[j]), fontsize=8)
        for i, m in enumerate(rows.values(), start=1):
            heat = np.asarray(m[j].detach().float().cpu())
            heat = heat / heat.max() if heat.max() > 0 else heat
            # the image in grey at its true contrast (not stretched), the map over it
            axes[i, j].imshow(images[j].mean(-1), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            # nearest: one square per patch / feature-map cell, the map's true resolution
            shown = axes[i, j].imshow(
                heat,
                cmap="inferno",
                alpha=0.7,
                vmin=0,
                vmax=1,
                interpolation="nearest",
                extent=(-0.5, width - 0.5, height - 0.5, -0.5),
            )
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("test image", fontsize=8)
    for i, name in enumerate(rows, start=1):
        axes[i, 0].set_ylabel(name, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    if shown is not None:
        bar = fig.colorbar(shown, ax=axes[1:].ravel().tolist(), fraction=0.02, pad=0.02)
        bar.set_label("weight, relative to the map's maximum\n(bright = where the model looks)", fontsize=8)
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png", bbox_inches="tight")
    plt.close(fig)
    return str(path)
