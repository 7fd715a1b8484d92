"""Networks: a registry that maps a spec's `arch` to its family (vit, resnet, ...), which
builds the network and describes its size and cost. `weights` imports pretrained weights."""

from vitpipe.models.registry import (ALLOWED_ARCH, VIT_SIZE_NAMES, VIT_SIZES, ResNetConfig, ViTConfig,  # noqa: F401
                                     arch_kind, build_model, describe, head_param_names, model_config,
                                     reset_head, validate_spec, vit_sizes)
