"""A recipe's arithmetic: the learning-rate schedule, the optimizer (and which parameters
decay), autocast's dtype, the model switches a recipe turns on (fused attention,
activation checkpointing), and the kernels it allows (`deterministic`)."""

from __future__ import annotations

import math
import os

import torch

from vitpipe import precisions
from vitpipe.errors import ParamError
from vitpipe.params import TrainParams


def lr_at(step: int, recipe: TrainParams) -> float:
    """Linear warmup to recipe.lr, then cosine decay to 0 at recipe.steps. A pure function of
    the step: resuming the step resumes the schedule, so there is no scheduler state."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return 0.5 * recipe.lr * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, recipe: TrainParams) -> torch.optim.Optimizer:
    # No weight decay on biases, norms, position embeddings and tokens (as in timm / the ViT paper).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "pos_embed" in name or "token" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum)
    return torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.999))


def autocast_dtype(precision: str):
    return precisions.get(precision).torch_dtype()


def prepare_model(model: torch.nn.Module, recipe: TrainParams, section: str) -> str:
    """Fused attention on, activation checkpointing if asked; returns the attention kind."""
    attention = [m for m in model.modules() if hasattr(m, "fused_attn")]  # timm's Attention blocks
    for m in attention:
        m.fused_attn = True  # F.scaled_dot_product_attention: flash / memory-efficient kernels
    if recipe.activation_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ParamError(
                f"{section}.activation_checkpointing",
                True,
                f"false for this model ({type(model).__name__} has no activation checkpointing)",
            )
        model.set_grad_checkpointing(True)
    return "sdpa" if attention else "none"


# cuBLAS is deterministic only with a fixed workspace per stream; read when its handle is made
CUBLAS_WORKSPACE = ":4096:8"
NOT_DETERMINISTIC = "does not have a deterministic implementation"  # what torch raises for such an op


def use_deterministic_kernels(on: bool, device: torch.device) -> None:
    """`deterministic: true`: every op runs a deterministic kernel or torch raises (not warn-only:
    in warn-only mode the memory-efficient attention backward keeps its non-deterministic
    split-keys path), cuDNN neither autotunes nor picks non-deterministic algorithms, cuBLAS
    gets its fixed workspace, and the flash and cuDNN attention kernels (non-deterministic
    backward) are off, leaving SDPA the memory-efficient kernel's deterministic path or the math
    one. Call before the first CUDA matmul of the process. `false`: torch's defaults."""
    if on and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    if device.type == "cuda":
        torch.backends.cuda.enable_flash_sdp(not on)
        torch.backends.cuda.enable_cudnn_sdp(not on)


def nondeterministic_op(e: BaseException) -> str | None:
    """The op torch names when it refuses one without a deterministic kernel ("adaptive_avg_pool2d_backward_cuda
    does not have a deterministic implementation, but you set ..."), else None."""
    before, found, _ = str(e).partition(NOT_DETERMINISTIC)
    return (before.split() or ["an op"])[-1] if found else None
