"""Model layer: image towers (ViT, ResNet), text tower, and the dual encoder."""

from clipjax.models._config import ConfigError
from clipjax.models.partitioning import LOGICAL_AXES, logical_partition_specs
from clipjax.models.resnet import ResNet, ResNetSpec, resnet_spec
from clipjax.models.text import TextSpec, TextTransformer, text_spec
from clipjax.models.two_towers import (
    CLIP_MEAN,
    CLIP_STD,
    DualEncoder,
    DualEncoderSpec,
    build_model,
    count_params,
    l2_normalize,
    model_spec,
    normalize_images,
)
from clipjax.models.vit import ViT, ViTSpec, vit_spec

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ConfigError",
    "DualEncoder",
    "DualEncoderSpec",
    "LOGICAL_AXES",
    "ResNet",
    "ResNetSpec",
    "TextSpec",
    "TextTransformer",
    "ViT",
    "ViTSpec",
    "build_model",
    "count_params",
    "l2_normalize",
    "logical_partition_specs",
    "model_spec",
    "normalize_images",
    "resnet_spec",
    "text_spec",
    "vit_spec",
]
