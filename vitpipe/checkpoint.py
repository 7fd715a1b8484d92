"""Training checkpoints: atomic save, exact resume, and refusal to resume the wrong run.

A checkpoint holds everything the next step depends on: model, optimizer, grad scaler, the
RNG states of every process (python, numpy, torch CPU and CUDA), the step (which fixes the
data position: see SampleStream), the step log so far and the wall time. The LR schedule
has no state: it is a pure function of the step. A checkpoint also holds a fingerprint of
what shaped the run (params, starting weights, data); resuming one written under anything
else fails with the differences, never silently.
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

FORMAT = 2


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


def save(path: Path, *, model, optimizer, scaler, step: int, elapsed_s: float, config: dict,
         rng: list[dict], log: dict, extra: dict | None = None, finished: bool = False) -> None:
    """`rng`: one rng_state() per process, by rank. `log`: the step-log rows so far, per file."""
    torch_save(path, {
        "format": FORMAT,
        "fingerprint": fingerprint(config),
        "config": json.loads(json.dumps(config, default=str)),
        "step": step,
        "finished": finished,
        "elapsed_s": elapsed_s,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng,
        "log": log,
        "extra": extra or {},
    })


def remove_stale_temps(path: Path) -> None:
    """A save killed mid-write leaves its temp file (atomic.atomic_path names it `.<name>.*`);
    a checkpoint can be gigabytes, so the next run clears them."""
    path = Path(path)
    for tmp in path.parent.glob(f".{path.name}.*"):
        tmp.unlink(missing_ok=True)


def load_for_resume(path: Path, config: dict, fresh_key: str) -> dict | None:
    """The checkpoint to resume from, or None to start fresh.

    None when there is no checkpoint or it belongs to a run that finished (its results are
    already outputs). An unreadable checkpoint or an unfinished one from another run is an
    error that names the fix: restore the params, or set `<fresh_key>: fresh`."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
            raise ValueError(f"not a vitpipe checkpoint of format {FORMAT}")
    except Exception as e:  # truncated, corrupt, foreign, older format: all the same to the user
        raise UserError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:160]}); "
                        f"delete it or set {fresh_key}: fresh to start this stage over") from None
    if ckpt.get("finished"):
        return None
    if ckpt["fingerprint"] != fingerprint(config):
        old, new = ckpt.get("config", {}), json.loads(json.dumps(config, default=str))
        diff = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        raise UserError(f"checkpoint {path} is an unfinished run of something else ({'; '.join(diff) or 'fingerprint differs'}); "
                        f"restore what changed to resume it, or set {fresh_key}: fresh to discard it")
    return ckpt
