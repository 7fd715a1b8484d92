"""Pretrained weights from outside: the timm hub, an original vit_jax `.npz`, or a local file.

`import_weights` turns any of them into a state dict for the network a variant's spec builds
(the pretrain stage saves it); `load_backbone` puts a state dict into a model with a new head
(the finetune stage). Both drop the classifier, resize the position embedding to the model's
patch grid when the resolution differs (224 -> 384 as in the ViT paper's fine-tuning), and
refuse, naming every tensor, a checkpoint of another shape (other patch size, width, depth).
"""

from __future__ import annotations

import json
import math
import zipfile
from pathlib import Path

import numpy as np
import torch

from vitpipe.errors import ParamError, UserError

SOURCES = ("timm", "npz", "file")
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")  # {"state_dict": {...}} and friends
STRIP_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def import_weights(
    spec: dict, source: str, weights: str, image_size: int, key: str = "variants.<variant>"
) -> dict[str, torch.Tensor]:
    """The backbone of a pretrained checkpoint, checked against (and resized for) the network
    `spec` builds at `image_size`. The classifier is left out: fine-tuning makes a new one."""
    if source not in SOURCES:
        raise ParamError(f"{key}.source", source, "one of: " + ", ".join(SOURCES) + " (or fractal)")
    try:
        state = {"timm": from_timm, "npz": from_npz, "file": from_file}[source](weights, key)
    except (OSError, EOFError, zipfile.BadZipFile) as e:  # read lazily (a zip's members, an mmap): a cut-off file
        raise cut_short(key, weights, e) from None
    from vitpipe.models import build_model

    with torch.device("meta"):  # shapes only: no memory, no random init
        model = build_model(spec, 1, image_size)
    backbone, _ = adapt_state_dict(model, state, what=f"{key}.weights = {weights}")
    return backbone


def cut_short(key: str, path, e: BaseException) -> UserError:
    why = " ".join(str(e).split())[:160] or type(e).__name__
    return UserError(
        f"{key}.weights: {path} cannot be read ({type(e).__name__}: {why}); a download cut "
        "short leaves such a file: download it again (or copy it whole), then run the stage again"
    )


def is_cut_short(p: Path) -> bool:
    """Whether a weights file ends before its own format says it does: a zip (torch's format,
    numpy's .npz) without its closing directory, or a safetensors file shorter than its header's
    tensors. Told apart from a file that is whole but not weights (or refused by weights_only)."""
    with open(p, "rb") as f:
        head = f.read(8)
        if head[:4] == b"PK\x03\x04":
            return not zipfile.is_zipfile(p)
        if p.suffix == ".safetensors" and len(head) == 8:
            size = int.from_bytes(head, "little")
            try:
                header = json.loads(f.read(size))
                end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
            except (ValueError, KeyError, TypeError, IndexError):  # a header cut short is unreadable JSON
                return p.stat().st_size < 8 + size
            return p.stat().st_size < 8 + size + end
    return False


def load_backbone(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict:
    """Load every tensor but the classifier into `model`; return what was done."""
    backbone, report = adapt_state_dict(model, state_dict)
    model.load_state_dict(backbone, strict=False)  # only the head is absent, adapt_state_dict checked
    return report


# ---------------------------------------------------------------- matching a checkpoint to a model


def adapt_state_dict(
    model: torch.nn.Module, state: dict[str, torch.Tensor], what: str = "the pretrained weights"
) -> tuple[dict[str, torch.Tensor], dict]:
    """(checkpoint without the head and with pos_embed resized for `model`, report), or a
    UserError listing every missing, unexpected or mis-shaped tensor."""
    from vitpipe.models import head_param_names

    own = model.state_dict()
    head = head_param_names(model)
    state = {k: v for k, v in state.items() if k not in head}
    report = {"loaded": 0, "loaded_params": 0, "head_skipped": sorted(head), "pos_embed_resized": None}

    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        state["pos_embed"], report["pos_embed_resized"] = resize_pos_embed(model, state["pos_embed"])

    missing = [k for k in own if k not in state and k not in head]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        raise UserError(_mismatch_message(what, own, state, missing, unexpected, mismatched))
    report["loaded"] = len(state)
    report["loaded_params"] = int(sum(v.numel() for v in state.values()))
    return state, report


def resize_pos_embed(model, pos_embed: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Interpolate the patch part of a (1, prefix + h*w, dim) position embedding to the model's
    grid, keeping the class-token part. Left as is when it can't be (the mismatch is reported)."""
    from timm.layers import resample_abs_pos_embed

    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    target = model.state_dict()["pos_embed"]
    if grid is None or pos_embed.ndim != 3 or pos_embed.shape[-1] != target.shape[-1]:
        return pos_embed, None  # other width: a real mismatch, not a resolution change
    prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    old = pos_embed.shape[1] - prefix
    side = math.isqrt(max(old, 0))
    if side * side != old:
        return pos_embed, None
    resized = resample_abs_pos_embed(pos_embed, new_size=list(grid), old_size=[side, side], num_prefix_tokens=prefix)
    return resized, [[side, side], list(grid)]


def _mismatch_message(what, own, state, missing, unexpected, mismatched, limit=12) -> str:
    lines = [f"{what} do not fit the network of this variant:"]

    def listing(title, names, fmt):
        if names:
            lines.append(
                f"  {title} ({len(names)}): "
                + "; ".join(fmt(n) for n in names[:limit])
                + (f"; … {len(names) - limit} more" if len(names) > limit else "")
            )

    listing(
        "shape differs, checkpoint vs model",
        mismatched,
        lambda n: f"{n} {tuple(state[n].shape)} vs {tuple(own[n].shape)}",
    )
    listing("missing from the checkpoint", missing, lambda n: f"{n} {tuple(own[n].shape)}")
    listing("not in the model", unexpected, lambda n: f"{n} {tuple(state[n].shape)}")
    hint = "the checkpoint is another architecture"
    pe = "patch_embed.proj.weight"
    if pe in mismatched and state[pe].ndim == 4 and own[pe].ndim == 4:
        (d1, _, p1, _), (d2, _, p2, _) = state[pe].shape, own[pe].shape
        if p1 != p2:
            hint += f": patch {p1} in the checkpoint, {p2} in the model"
        if d1 != d2:
            hint += f"{':' if p1 == p2 else ','} width (dim) {d1} in the checkpoint, {d2} in the model"
    else:
        hint += " (other patch size, width, depth or heads?)"
    lines.append(
        f"  hint: {hint}; make the variant's arch match the checkpoint "
        "(e.g. arch: vit_b16 for ViT-B_16.npz or vit_base_patch16_224.augreg_in21k)"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------- source: timm hub


def from_timm(name: str, key: str = "variants.<variant>") -> dict[str, torch.Tensor]:
    """timm.create_model(name, pretrained=True), from the local Hugging Face cache when the file
    is there (no network touched), else downloaded. Offline without a cache: one clear error."""
    import timm
    from timm.models import get_pretrained_cfg

    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        raise ParamError(
            f"{key}.weights", name, "a timm model name with a pretrained tag, e.g. vit_base_patch16_224.augreg_in21k"
        )
    cfg = get_pretrained_cfg(name) if timm.list_pretrained(name if tag else f"{arch}*") else None
    if cfg is None:
        raise ParamError(
            f"{key}.weights",
            name,
            f"a pretrained tag timm knows for {arch}: " + ", ".join(timm.list_pretrained(f"{arch}.*")[:8]),
        )
    cached = _hub_cached_file(cfg)
    why_not = None if cached else _hub_unreachable()
    if why_not is None:
        try:
            overlay = {"file": cached} if cached else None
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
            return {k: v.detach() for k, v in model.state_dict().items()}
        except Exception as e:  # noqa: BLE001 — hub, cache and network errors come in many types
            why_not = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    original = f" ({cfg.url})" if (cfg.url or "").endswith(".npz") else ""
    raise UserError(
        f"could not get the timm weights {name} ({why_not}). They need the network (Hugging Face hub) "
        f"or a copy in the local hub cache (HF_HOME). Offline: download the original vit_jax checkpoint"
        f"{original} and set `{key}.source: npz` with `{key}.weights: <path>`, or a .pt/.safetensors "
        f"state dict with `source: file`; or pretrain here without any download with `{key}.source: fractal`"
    )


HUB_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")


def _hub_cached_file(cfg) -> str | None:
    """Path of the weights in the local Hugging Face cache, if a previous run left them there."""
    from huggingface_hub import try_to_load_from_cache

    if not cfg.hf_hub_id:
        return None
    repo, _, revision = cfg.hf_hub_id.partition("@")
    names = ([cfg.hf_hub_filename] if cfg.hf_hub_filename else []) + list(HUB_FILES)
    for filename in names:
        path = try_to_load_from_cache(repo, filename, revision=revision or None)
        if isinstance(path, str):
            return path
    return None


def _hub_unreachable(timeout_s: float = 5.0) -> str | None:
    """Why the hub can't be reached, or None. One quick probe instead of the hub client's
    minute of retries when there is no network."""
    import os
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set and the file is not in the local cache"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return None  # the server answered: reachable
    except (urllib.error.URLError, OSError, ValueError) as e:
        return f"{endpoint} unreachable: {getattr(e, 'reason', e)}"
    return None


# ---------------------------------------------------------------- source: original vit_jax .npz

NPZ_PREFIXES = ("", "opt/target/")  # vit_jax's saved params; "opt/target/" when saved with the optimizer


def _npz_prefix(w) -> str | None:
    for prefix in NPZ_PREFIXES:
        if f"{prefix}embedding/kernel" in w.files:
            return prefix
    return None


def _existing(path: str | None, key: str, kinds: str) -> Path:
    if not path:
        raise ParamError(f"{key}.weights", path, f"the path of a {kinds} file")
    p = Path(path)
    if not p.is_file():
        raise UserError(
            f"{key}.weights: {p} not found (give the path of the {kinds} file, relative to the repository root)"
        )
    return p


def from_npz(path: str, key: str = "variants.<variant>") -> dict[str, torch.Tensor]:
    """An original google-research/vision_transformer checkpoint (`ViT-B_16.npz`, the augreg
    files), converted by timm's own JAX loader into a ViT of the checkpoint's shape."""
    from timm.models.vision_transformer import VisionTransformer

    p = _existing(path, key, "vit_jax .npz")
    try:
        w = np.load(p, allow_pickle=False)  # never unpickle a downloaded file
    except (OSError, ValueError) as e:
        raise UserError(f"{key}.weights: {p} is not a .npz checkpoint: {e}") from None
    if not isinstance(w, np.lib.npyio.NpzFile):
        raise UserError(f"{key}.weights: {p} is a single .npy array, not a vit_jax .npz checkpoint")
    with w:
        prefix = _npz_prefix(w)
        if prefix is None:
            raise UserError(f"{key}.weights: {p} is not an original vit_jax checkpoint (no embedding/kernel)")
        if f"{prefix}conv_root/kernel" in w.files:
            raise UserError(
                f"{key}.weights: {p} is a ResNet+ViT hybrid (R50+ViT); only plain ViT checkpoints are supported"
            )
        try:
            shape = _npz_architecture(w, prefix)
        except KeyError as e:
            raise UserError(f"{key}.weights: {p} lacks {e.args[0]}: not an original ViT checkpoint") from None
    model = VisionTransformer(**shape)
    try:
        with torch.no_grad():
            model.load_pretrained(str(p), prefix=prefix)  # timm's _load_weights: the JAX -> PyTorch mapping
    except (KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"{key}.weights: {p} could not be converted by timm's vit_jax loader: {e}") from None
    return {k: v.detach() for k, v in model.state_dict().items()}


def _npz_architecture(w, prefix: str) -> dict:
    """VisionTransformer kwargs that reproduce a vit_jax checkpoint's own shapes."""
    patch_h, patch_w, in_chans, dim = w[f"{prefix}embedding/kernel"].shape
    tokens = w[f"{prefix}Transformer/posembed_input/pos_embedding"].shape[1]
    has_cls = f"{prefix}cls" in w.files
    depth = 0
    while f"{prefix}Transformer/encoderblock_{depth}/LayerNorm_0/scale" in w.files:
        depth += 1
    if depth == 0:
        raise KeyError(f"{prefix}Transformer/encoderblock_0/LayerNorm_0/scale")
    block = f"{prefix}Transformer/encoderblock_0/"
    heads = w[f"{block}MultiHeadDotProductAttention_1/query/kernel"].shape[1]  # (dim, heads, head_dim)
    mlp = w[f"{block}MlpBlock_3/Dense_0/kernel"].shape[1]
    grid = math.isqrt(tokens - int(has_cls))
    if grid * grid != tokens - int(has_cls):
        raise KeyError(f"{prefix}Transformer/posembed_input/pos_embedding of a square patch grid")
    num_classes = w[f"{prefix}head/bias"].shape[0] if f"{prefix}head/bias" in w.files else 0
    return dict(
        img_size=grid * patch_h,
        patch_size=patch_h,
        in_chans=in_chans,
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_ratio=mlp / dim,
        num_classes=num_classes,
        class_token=has_cls,
        global_pool="token" if has_cls else "avg",
        fc_norm=False,
    )


# ---------------------------------------------------------------- source: local file


def from_file(path: str, key: str = "variants.<variant>") -> dict[str, torch.Tensor]:
    """A local state dict: `.safetensors`, or a torch `.pt`/`.pth` loaded with weights_only=True
    (tensors and plain containers only: no code runs), possibly wrapped as {"state_dict": …}."""
    p = _existing(path, key, ".pt/.pth/.safetensors")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except (SafetensorError, OSError) as e:
            if is_cut_short(p):
                raise cut_short(key, p, e) from None
            raise UserError(f"{key}.weights: {p} is not a readable safetensors file: {e}") from None
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — UnpicklingError for refused objects, RuntimeError for bad zips
        if isinstance(e, EOFError) or is_cut_short(p):  # not refused: it ends early
            raise cut_short(key, p, e) from None
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"{key}.weights: {p} is not a plain state dict that loads with weights_only=True "
            f"(refused, so no code in it ran): {first}"
        ) from None
    while isinstance(obj, dict) and not _is_state_dict(obj):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not (isinstance(obj, dict) and _is_state_dict(obj)):
        raise UserError(
            f"{key}.weights: {p} holds no state dict (a mapping of names to tensors, possibly "
            f"under one of {', '.join(WRAPPER_KEYS)})"
        )
    return _strip_prefixes(obj)


def _is_state_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in STRIP_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state
