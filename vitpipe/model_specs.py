"""The networks of params.yaml (`model:` and each `variants.<name>`), read and checked
against the model registry: what the training and evaluation stages build. Stages that
never build a network (download, preprocess) do not import it."""

from __future__ import annotations

import os
from typing import Any

from vitpipe import params
from vitpipe.errors import ParamError
from vitpipe.models import FAMILIES, family_of, spec_keys, validate_spec

MODEL = {
    "arch": params.Key(
        "str",
        "vit | vit_b16-style short name | resnet18..152 | convnext_atto..large | "
        "a timm ViT/ResNet/ConvNeXt name; the size keys below are for vit",
    ),
    # the network keys each family declares (Family.spec_schema, in its own file)
    **{k: params.Key(**v) for family in FAMILIES for k, v in family.spec_schema.items()},
}
VARIANT = {**MODEL, **params.VARIANT_KEYS}


def _spec(prefix: str, spec: Any, keys: dict[str, params.Key], image_size: int) -> dict:
    if not isinstance(spec, dict):
        raise ParamError(prefix, spec, "a mapping with at least `arch`")
    checked = params.check_section(prefix, spec, keys)
    if "arch" not in checked:
        raise ParamError(f"{prefix}.arch", None, "the network: " + keys["arch"].help)
    family = family_of(checked["arch"])
    if family is not None:  # an unknown arch is named by validate_spec below
        network_keys = set(MODEL) - {"arch"}
        extra = sorted((network_keys & set(checked)) - family.spec_keys)
        if extra:
            takes = (
                f"it takes {', '.join(sorted(family.spec_keys))}"
                if family.spec_keys
                else "its size is set by the name alone"
            )
            raise ParamError(
                f"{prefix}.{extra[0]}",
                checked[extra[0]],
                f"no such key for arch {checked['arch']} (a {family.label}); {takes}",
            )
    validate_spec(checked, image_size, prefix)
    return checked


def model_spec(doc: dict, image_size: int) -> dict:
    """The scratch network (`model:` less `twin`, which names its fine-tuned variant)."""
    spec = doc.get("model")
    if spec is None:
        raise ParamError("model", spec, "a mapping with at least `arch`")
    if isinstance(spec, dict):
        spec = {k: v for k, v in spec.items() if k != "twin"}
    return _spec("model", spec, MODEL, image_size)


def same_network(a: dict, b: dict) -> bool:
    """The same architecture: arch and the size keys its family declares."""
    keys = ("arch", *sorted(spec_keys(a.get("arch")) | spec_keys(b.get("arch"))))
    return all(a.get(k) == b.get(k) for k in keys)


def twin_name(doc: dict) -> str | None:
    """The variant fine-tuned from the scratch network, the headline's like-for-like:
    `model.twin` (null: none); a params file without the key: the first variant with the
    same network."""
    model = doc.get("model") or {}
    if "twin" in model:
        return model["twin"]
    return next((n for n, s in (doc.get("variants") or {}).items() if same_network(s or {}, model)), None)


def check_twin(doc: dict, image_size: int) -> None:
    """`model.twin` names a variant with the scratch network, or validate stops here, in one
    line that says how to change both (`-S model.patch=8` alone would leave the headline's
    comparison untested)."""
    twin = (doc.get("model") or {}).get("twin")
    if twin is None:
        return
    variants = doc.get("variants") or {}
    if twin not in variants:
        raise ParamError("model.twin", twin, f"a variant of params.yaml ({', '.join(map(str, variants))}) or null")
    scratch, tuned = model_spec(doc, image_size), variant_spec(doc, twin, image_size)
    keys = ("arch", *sorted(spec_keys(scratch["arch"]) | spec_keys(tuned["arch"])))
    for k in keys:
        if scratch.get(k) != tuned.get(k):
            v = scratch.get(k)
            both = f"-S ~variants.{twin}.{k}" if v is None else f"-S model.{k}={v} -S variants.{twin}.{k}={v}"
            raise ParamError(
                f"model.{k}",
                v,
                f"variants.{twin}.{k} is {tuned.get(k)!r} and {twin} is this network "
                f"fine-tuned (model.twin): change both (dvc exp run {both}), or set model.twin to "
                "null to compare unlike networks",
            )


def variant_spec(doc: dict, name: str, image_size: int) -> dict:
    variants = doc.get("variants") or {}
    if name not in variants:
        raise ParamError("variants", name, "a variant defined in params.yaml: " + ", ".join(map(str, variants)))
    params.check_variant_name(name)
    spec = _spec(f"variants.{name}", variants[name], VARIANT, image_size)
    spec.setdefault("source", "fractal")
    spec.setdefault("weights", None)
    if spec["source"] != "fractal" and not spec["weights"]:
        raise ParamError(
            f"variants.{name}.weights",
            None,
            f"a timm model name or a file path (source={spec['source']} needs weights)",
        )
    if spec["source"] in LOCAL_SOURCES:
        check_local_weights(f"variants.{name}.weights", spec["weights"])
    return spec


LOCAL_SOURCES = ("npz", "file")
WEIGHTS_DIR = "weights"  # every pretrain@<variant> stage depends on it (dvc.yaml)


def check_local_weights(key: str, path: str) -> None:
    """A local weights file must lie under weights/: DVC knows a stage's inputs only as paths
    in dvc.yaml, and the pretrain stages declare that folder, so a changed file re-runs them
    (and the run-cache never hands back a model imported from the old file). A link to a
    file elsewhere is fine: the path is judged as written, the content is what DVC hashes."""
    inside = os.path.abspath(path).startswith(os.path.abspath(WEIGHTS_DIR) + os.sep)
    if not inside:
        raise ParamError(
            key,
            path,
            f"a file under {WEIGHTS_DIR}/ (e.g. {WEIGHTS_DIR}/{os.path.basename(path)}): "
            f"copy or link it there, so that DVC re-runs the pretrain stage when it changes",
        )
