"""Networks: a registry of model families (`registry`), one file per family (`vit`,
`resnet`, `convnext`: its builder and its cost model), and `weights`, which imports
pretrained weights. Importing the package registers the families; names are matched in
this order."""

from vitpipe.models import vit  # noqa: F401,I001  (registers; the order is the matching order)
from vitpipe.models import resnet  # noqa: F401
from vitpipe.models import convnext  # noqa: F401
from vitpipe.models.convnext import ConvNeXtConfig  # noqa: F401
from vitpipe.models.registry import (
    FAMILIES,
    Family,
    allowed_arch,
    arch_kind,
    build_model,  # noqa: F401
    cam_layer_names,
    describe,
    family_of,
    family_of_config,
    family_of_model,
    head_param_names,
    model_config,
    prefers_channels_last,
    register_family,
    reset_head,
    shard_units,
    spec_keys,
    validate_spec,
)
from vitpipe.models.resnet import ResNetConfig  # noqa: F401
from vitpipe.models.vit import VIT_SIZE_NAMES, VIT_SIZES, ViTConfig, vit_sizes  # noqa: F401
