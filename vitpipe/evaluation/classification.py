"""Evaluation: accuracy during training, and the full test-split report of a trained model
(top-1/top-5, per-class accuracy, confusion matrix, inference throughput and latency)."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from vitpipe.data.prepared_store import Split


@torch.no_grad()
def predict(model: torch.nn.Module, split: Split, device: torch.device, batch_size: int = 256, amp_dtype=None):
    """Logits (float32, CPU) and labels for a whole split, in store order."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for s in range(0, len(split), batch_size):
        x, y = split.batch(np.arange(s, min(s + batch_size, len(split))))
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = model(x.to(device))
        logits.append(out.float().cpu())
        labels.append(y)
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def accuracy(model, split: Split, device, amp_dtype=None) -> dict:
    logits, labels = predict(model, split, device, amp_dtype=amp_dtype)
    return {"top1": (logits.argmax(1) == labels).float().mean().item(), "loss": F.cross_entropy(logits, labels).item()}


def classification_report(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict:
    n = len(classes)
    pred = logits.argmax(1)
    k = min(5, n)
    top5 = (logits.topk(k, dim=1).indices == labels[:, None]).any(1).float().mean().item()
    confusion = torch.zeros(n, n, dtype=torch.int64)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    support = confusion.sum(1)
    per_class = (confusion.diag().float() / support.clamp(min=1).float()).tolist()
    return {
        "top1": (pred == labels).float().mean().item(),
        "top5": top5,
        "loss": F.cross_entropy(logits, labels).item(),
        "per_class": {c: round(a, 5) for c, a in zip(classes, per_class)},
        "support": dict(zip(classes, support.tolist())),
        "confusion": confusion.tolist(),
    }


@torch.no_grad()
def inference_speed(model, split: Split, device: torch.device, batch_size: int, batches: int) -> dict:
    """Images/s at `batch_size` and per-image latency at batch 1 (median of repeats)."""
    model.eval()
    n = min(batch_size, len(split))
    x, _ = split.batch(np.arange(n))
    x = x.to(device)
    model(x)  # warm-up (allocator, kernels)
    _sync(device)
    t = time.perf_counter()
    for _ in range(batches):
        model(x)
    _sync(device)
    throughput = batches * n / (time.perf_counter() - t)
    one = x[:1]
    model(one)
    times = []
    for _ in range(max(5, batches)):
        _sync(device)
        t = time.perf_counter()
        model(one)
        _sync(device)
        times.append(time.perf_counter() - t)
    return {"infer_img_per_s": throughput, "latency_ms": 1000 * float(np.median(times)), "infer_batch": n}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
