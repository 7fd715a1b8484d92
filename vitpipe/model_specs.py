"""The networks of params.yaml (`model:` and each `variants.<name>`), read and checked
against the model registry: what the training and evaluation stages build. Stages that
never build a network (download, preprocess) do not import it."""

from __future__ import annotations

from typing import Any

from vitpipe import params
from vitpipe.errors import ParamError
from vitpipe.models import arch_kind, validate_spec


def _spec(prefix: str, spec: Any, keys: dict[str, params.Key], image_size: int) -> dict:
    if not isinstance(spec, dict):
        raise ParamError(prefix, spec, "a mapping with at least `arch`")
    checked = params.check_section(prefix, spec, keys)
    if "arch" not in checked:
        raise ParamError(f"{prefix}.arch", None, "the network: " + keys["arch"].help)
    kind = arch_kind(checked["arch"])
    if kind in ("resnet", "timm_resnet"):
        extra = sorted(params.VIT_ONLY & set(checked))
        if extra:
            raise ParamError(f"{prefix}.{extra[0]}", checked[extra[0]],
                             f"no such key for arch {checked['arch']} (a ResNet); only ViTs take {', '.join(sorted(params.VIT_ONLY))}")
    validate_spec(checked, image_size, prefix)
    return checked


def model_spec(doc: dict, image_size: int) -> dict:
    spec = doc.get("model")
    if spec is None:
        raise ParamError("model", spec, "a mapping with at least `arch`")
    return _spec("model", spec, params.MODEL, image_size)


def variant_spec(doc: dict, name: str, image_size: int) -> dict:
    variants = doc.get("variants") or {}
    if name not in variants:
        raise ParamError("variants", name, "a variant defined in params.yaml: " + ", ".join(map(str, variants)))
    params.check_variant_name(name)
    spec = _spec(f"variants.{name}", variants[name], params.VARIANT, image_size)
    spec.setdefault("source", "fractal")
    spec.setdefault("weights", None)
    if spec["source"] != "fractal" and not spec["weights"]:
        raise ParamError(f"variants.{name}.weights", None,
                         f"a timm model name or a file path (source={spec['source']} needs weights)")
    return spec
