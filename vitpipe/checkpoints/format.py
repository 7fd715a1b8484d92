"""Training checkpoints: atomic save, exact resume, and refusal to resume the wrong run.

A checkpoint holds everything the next step depends on: model, optimizer, grad scaler, the
RNG states of every process (python, numpy, torch CPU and CUDA), the step (which fixes the
data position: see SampleStream), the step log so far and the wall time. The LR schedule
has no state: it is a pure function of the step. A checkpoint also holds a fingerprint of
what shaped the run (params, starting weights, data), the key under which the checkpoint
store (vitpipe.checkpoints.store) files it, and a digest of its whole content, checked on load.

A sharded run (`parallel: fsdp`) writes its model and optimizer state as
torch.distributed.checkpoint (DCP) shards, one file per process, into a checkpoint folder;
this format then holds the rest (`model=None`): the same keys, model and optimizer None, and
the number of processes that wrote it (`world`), so a resume at another count can say so.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import torch

from vitpipe.atomic import torch_save
from vitpipe.errors import UserError

FORMAT = 3  # 3: carries a content digest


def fingerprint(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tensors_digest(tensors) -> str:
    """sha256 of tensors' bytes, in order: 'same starting weights / same data?' for the fingerprint."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def rng_state(device: torch.device | None = None) -> dict:
    np_state = np.random.get_state()
    state = {
        "python": _to_lists(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)  # this process's GPU only
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, tuple) else x


def save(
    path: Path,
    *,
    model,
    optimizer,
    scaler,
    step: int,
    elapsed_s: float,
    config: dict,
    rng: list[dict],
    log: dict,
    extra: dict | None = None,
    finished: bool = False,
) -> None:
    """`rng`: one rng_state() per process, by rank (their number is the world that wrote it).
    `log`: the step-log rows so far, per file. `model`/`optimizer` None: a sharded checkpoint's
    rest, its states in the DCP shards beside it."""
    payload = {
        "format": FORMAT,
        "fingerprint": fingerprint(config),
        "config": json.loads(json.dumps(config, default=str)),
        "step": step,
        "finished": finished,
        "elapsed_s": elapsed_s,
        "world": len(rng),
        "model": model.state_dict() if model is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng,
        "log": log,
        "extra": extra or {},
    }
    payload["digest"] = content_digest(payload)
    torch_save(path, payload)


def content_digest(payload) -> str:
    """sha256 over everything in a checkpoint but its own digest: every tensor's bytes and
    every other value, in a fixed order. A checkpoint whose tensors were overwritten (even
    with finite numbers) no longer matches the digest it carries."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(x.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=str):
                if k == "digest" and x is payload:
                    continue
                h.update(repr(k).encode())
                walk(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                walk(v)
            h.update(b"]")
        else:
            h.update(repr(x).encode())

    walk(payload)
    return h.hexdigest()


def read(path: Path, fix: str) -> dict:
    """A checkpoint, verified: readable, of this format, and matching the digest it carries.
    Anything else (truncated, random bytes, foreign, tampered) is one UserError naming the
    file and `fix`."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
            raise ValueError(f"not a vitpipe checkpoint of format {FORMAT}")
    except Exception as e:  # truncated, corrupt, foreign, older format: all the same to the user
        raise UserError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:160]}); {fix}"
        ) from None
    if ckpt.get("digest") != content_digest(ckpt):
        raise UserError(
            f"checkpoint {path} is damaged: its content does not match the digest it carries "
            f"(changed after it was written); {fix}"
        )
    return ckpt
