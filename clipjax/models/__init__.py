"""Models: image towers (ViT, ResNet-style), the text Transformer, and the dual encoder,
built from their `config.model` declaration (`spec.py`) and tagged with logical axis names."""

from clipjax.models.spec import IMAGE_TOWERS, DualEncoderSpec, model_section, model_spec
from clipjax.models.two_towers import DualEncoder, build_model, count_params, model_factory

__all__ = [
    "IMAGE_TOWERS",
    "DualEncoder",
    "DualEncoderSpec",
    "build_model",
    "count_params",
    "model_factory",
    "model_section",
    "model_spec",
]
