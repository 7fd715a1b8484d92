"""The model registry: a spec (a dict from params.yaml) -> a network, or -> the facts
about that network the compute model needs (`model_config`), without building it.

A model family is one file (`vit.py`, `resnet.py`, `convnext.py`): a `Family` subclass
registered with `@register_family`, as timm registers its models with `@register_model`.
It owns everything that depends on the family: which `arch` names it claims, which spec
keys it accepts and how they are checked, the builder, the config read off a spec or a
timm model, a short human name, and its cost model (exact parameters per component,
forward FLOPs as FlopCounterMode counts them, the bytes autograd saves). Nothing outside
the family files switches on the family: callers go through the functions below, and
`costmodel.compute` through `family_of_config`.

Keys a spec may carry that are not about the network (source, weights, ...) are ignored.
"""

from __future__ import annotations

import functools

from vitpipe import precisions
from vitpipe.errors import ParamError, UserError

HALF_PRECISIONS = precisions.HALF  # autocast runs matmuls in these; their elements are 2 bytes
element_bytes = precisions.element_bytes


class Family:
    """One model family. Subclasses set the attributes and override the methods; the cost
    methods take the family's own config (`config_type`)."""

    name = ""
    config_type: type = object
    label = ""  # the family in prose: ViT, ResNet, ConvNeXt
    allowed = ""  # how its own arch names read in an error message
    spec_keys: frozenset = frozenset()  # network keys besides `arch` a spec may set
    # those keys as params.py checks and documents them: {key: {kind, help, lo, hi, choices, ...}}
    # (the fields of params.Key; plain dicts, as models sit below params)
    spec_schema: dict = {}
    attention = False  # token attention: the `attention` setting (sdpa/eager) matters
    checkpointing = False  # activation checkpointing is modelled (and supported)
    channels_last = False  # trains faster channels-last on CUDA (convolutions)

    # --- names, specs, networks -----------------------------------------------------------
    def matches(self, arch: str) -> bool:
        """Cheap: does this family claim `arch` by its name (or its timm module)?"""
        raise NotImplementedError

    def claims_class(self, cls: type) -> bool:
        """For a timm name no family claims by name: is its model class one of ours?"""
        return False

    def owns(self, model) -> bool:
        """Is this built network one of ours?"""
        raise NotImplementedError

    def validate(self, spec: dict, image_size: int, key_prefix: str, image_size_key: str) -> None:
        """Raise ParamError naming the key if `spec` can not be built at `image_size`."""

    def build(self, spec: dict, num_classes: int, image_size: int):
        raise NotImplementedError

    def config(self, spec: dict, num_classes: int, image_size: int):
        raise NotImplementedError

    def describe(self, spec: dict, image_size: int) -> str:
        return str(spec.get("arch"))

    def cam_layer_names(self, model) -> list[str]:
        """Grad-CAM's candidate layers (stages with a spatial grid), deepest first."""
        return []

    # --- how the family is sharded (FSDP2: one unit each, the rest is the root unit) ---------
    def shard_units(self, model) -> list:
        """The modules of a built network that become one FSDP unit each, in forward order
        (training.sharding); [] shards only the root, which saves nothing."""
        return []

    def shard_unit_params(self, cfg) -> list[int]:
        """The parameters of each of `shard_units`, read off the config (the cost model's
        sharded memory, costmodel.sharding); what is not in a unit is in the root."""
        return []

    # --- the cost model (per image unless said otherwise) ---------------------------------
    def param_counts(self, cfg) -> dict:
        """Exact parameter counts per component (without `total`)."""
        raise NotImplementedError

    def flops(self, cfg) -> dict:
        """Forward FLOPs as FlopCounterMode counts them: {"forward", "first" (the layer that
        reads the image: no input gradient), "recompute" (what checkpointing runs again)}."""
        raise NotImplementedError

    def saved(self, cfg, precision: str, attention: str, checkpointing: bool, device_type: str) -> dict:
        """Bytes autograd keeps for backward, by storage (each counted once)."""
        raise NotImplementedError

    def weight_layers(self, cfg) -> list[dict]:
        """Every linear / conv layer in forward order: {part: embed | blocks | head, kind:
        patch | conv | linear, k (kernel side; 1 for linear), cin (per group), cout}."""
        raise NotImplementedError

    def autocast_weight_params(self, cfg, checkpointing: bool) -> int:
        """Weights whose half copy autocast keeps for backward (linear/conv layers outside
        checkpointed blocks: inside them the copies are made again in the recompute)."""
        raise NotImplementedError

    def recompute_weight_params(self, cfg) -> int:
        """With checkpointing: the largest checkpointed segment's casted weights, alive while
        that segment is recomputed."""
        return 0

    def buffer_bytes(self, cfg) -> int:
        return 0

    def step_saved_bytes(self, cfg) -> int:
        """Saved bytes per step that do not grow with the batch (beyond the loss scalar)."""
        return 0

    def transient_bytes(self, cfg, precision: str, attention: str, checkpointing: bool) -> int:
        """What backward allocates on top of the saved activations before freeing them."""
        raise NotImplementedError

    def step_ops(self, cfg, element_bytes: int) -> dict:
        """What one training step executes per image, for the time model: {ops, tensors,
        cast_params} in the vocabulary of `vitpipe.models.step_ops` (gemm, attention, dwconv, mem)."""
        raise NotImplementedError

    def refuse_checkpointing(self) -> UserError:
        return UserError(
            f"activation checkpointing is not modelled for {self.name} models "
            f"(only for: {', '.join(f.name for f in FAMILIES if f.checkpointing)})"
        )


FAMILIES: list[Family] = []


def register_family(cls):
    """Class decorator: register one instance of a `Family` subclass (in import order, which
    is the order names are matched in)."""
    FAMILIES.append(cls())
    return cls


def allowed_arch() -> str:
    return (
        "one of: " + ", ".join(f.allowed for f in FAMILIES) + f", or a timm {'/'.join(f.label for f in FAMILIES)} name"
    )


@functools.lru_cache(maxsize=256)
def timm_model_class(name: str) -> type | None:
    """The class of timm model `name` (built once on the meta device: no memory), or None."""
    import timm
    import torch

    if not timm.is_model(name):
        return None
    try:
        with torch.device("meta"):
            return type(timm.create_model(name, pretrained=False))
    except Exception:  # a name timm lists but can not build bare: no family of ours
        return None


def timm_module(name: str) -> str:
    """The module that defines timm model `name` ('' if timm has no such model)."""
    import timm

    if not timm.is_model(name):
        return ""
    return timm.models.model_entrypoint(name).__module__


def family_of(arch) -> Family | None:
    """The family that claims `arch`: by name first; a timm name none claims is built on the
    meta device (once) and its class offered to each family."""
    if not isinstance(arch, str):
        return None
    for f in FAMILIES:
        if f.matches(arch):
            return f
    cls = timm_model_class(arch)
    if cls is not None:
        for f in FAMILIES:
            if f.claims_class(cls):
                return f
    return None


def family_of_config(cfg) -> Family:
    for f in FAMILIES:
        if isinstance(cfg, f.config_type):
            return f
    raise UserError(f"no model family knows a {type(cfg).__name__}")


def family_of_model(model) -> Family | None:
    for f in FAMILIES:
        if f.owns(model):
            return f
    return None


def arch_kind(arch) -> str:
    """The family's name ('vit', 'resnet', 'convnext'), or '' if no family claims `arch`."""
    f = family_of(arch)
    return f.name if f else ""


def _family(spec: dict, key: str = "arch") -> Family:
    f = family_of(spec.get("arch"))
    if f is None:
        raise ParamError(key, spec.get("arch"), allowed_arch())
    return f


def validate_spec(spec: dict, image_size: int, key_prefix: str, image_size_key: str = "data.image_size") -> None:
    """Raise ParamError naming the key if `spec` can not be built at `image_size`. Cheap:
    looks names up, builds nothing (a timm name outside the known modules once, on meta)."""
    if not isinstance(spec, dict):
        raise ParamError(key_prefix, spec, "a mapping with an `arch` key")
    f = _family(spec, f"{key_prefix}.arch")
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size <= 0:
        raise ParamError(image_size_key, image_size, "a positive integer")
    f.validate(spec, image_size, key_prefix, image_size_key)


def spec_keys(arch) -> frozenset:
    """The network keys besides `arch` a spec of this arch may set."""
    f = family_of(arch)
    return f.spec_keys if f else frozenset()


def build_model(spec: dict, num_classes: int, image_size: int):
    """The network a spec names, randomly initialised (weights come from the loader)."""
    return _family(spec).build(spec, num_classes, image_size)


def model_config(spec: dict, num_classes: int, image_size: int):
    """Sizes of the network `build_model` would build (the family's config dataclass),
    read from the spec or, for a timm name, off the model built on the meta device."""
    return _family(spec).config(spec, num_classes, image_size)


def describe(spec: dict, image_size: int) -> str:
    """A short human name: 'ViT-B/16 @224px', 'ResNet-18', 'ConvNeXt-T @224px'."""
    f = family_of(spec.get("arch"))
    return f.describe(spec, image_size) if f else str(spec.get("arch"))


def prefers_channels_last(model) -> bool:
    """Whether `model` trains faster in channels-last memory format on CUDA (a CNN)."""
    f = family_of_model(model)
    return bool(f and f.channels_last)


def shard_units(model) -> list:
    """The FSDP units of `model` its family names ([] for a network no family owns)."""
    f = family_of_model(model)
    return f.shard_units(model) if f else []


def cam_layer_names(model) -> list[str]:
    """The stages Grad-CAM may read on `model`, deepest first ([] if its family has none)."""
    f = family_of_model(model)
    return f.cam_layer_names(model) if f else []


def reset_head(model, num_classes: int) -> None:
    """Give `model` a fresh classifier for `num_classes` (fine-tuning on a new label set)."""
    import torch.nn as nn

    if hasattr(model, "reset_classifier"):  # timm
        model.reset_classifier(num_classes)
    elif isinstance(getattr(model, "fc", None), nn.Linear):  # torchvision ResNet
        fc = model.fc
        model.fc = nn.Linear(fc.in_features, num_classes, device=fc.weight.device, dtype=fc.weight.dtype)
    else:
        raise UserError(f"do not know the classifier of {type(model).__name__}")


def head_param_names(model) -> set[str]:
    """Names of the classifier's parameters (dropped when loading weights for other classes)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "fc")
    for name, module in model.named_modules():
        if module is head:
            return {f"{name}.{p}" if name else p for p, _ in module.named_parameters()}
    return set()


def layer_weights(x: dict) -> int:
    """Weights (no bias) of one `Family.weight_layers` entry."""
    return x["k"] ** 2 * x["cin"] * x["cout"]


def not_plain(name: str, family: str, why: str) -> UserError:
    return UserError(f"{name} is not a plain {family} the compute model knows ({why}); use another spec or timm name")


def short_list(xs, n=12) -> str:
    return ", ".join(map(str, xs[:n])) + (", ..." if len(xs) > n else "")
