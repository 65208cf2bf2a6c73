"""The CLIP dual encoder: image tower + text tower -> shared unit-norm space."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clipjax.models import _config as C
from clipjax.models.layers import Dense
from clipjax.models.resnet import RESNET_FIELDS, ResNet, ResNetSpec, resnet_spec
from clipjax.models.text import TextSpec, TextTransformer, text_spec
from clipjax.models.vit import VIT_FIELDS, ViT, ViTSpec, vit_spec

# CLIP's RGB statistics (the original OpenAI preprocessing), in [0, 1] units.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

IMAGE_KINDS = ("vit", "resnet")
DTYPES = ("float32", "bfloat16")
MODEL_DEFAULTS: dict[str, Any] = dict(
    embed_dim=512, dtype="float32", remat=False, logit_scale_init=math.log(1 / 0.07), logit_bias_init=None
)


@dataclasses.dataclass(frozen=True)
class DualEncoderSpec:
    """Resolved, validated model hyper-parameters (see ``model_spec``)."""

    image: ViTSpec | ResNetSpec
    text: TextSpec
    embed_dim: int
    dtype: str
    remat: bool
    logit_scale_init: float
    logit_bias_init: float | None


def _number(value: Any, key: str, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise C.ConfigError(f"{key}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise C.ConfigError(f"{key}: expected a finite number, got {value!r}")
    return float(value)


def _positive_arg(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def model_spec(model_config: Any, *, image_size: int, path: str = "model") -> DualEncoderSpec:
    """Reads and validates ``config.model``; raises ValueError naming the key."""
    items = C.section_items(model_config)
    values = {**MODEL_DEFAULTS, **{k: v for k, v in items.items() if not C.is_unset(k, v)}}
    image_items = C.section_items(items.get("image"))
    kind = image_items.get("kind")
    if C.is_unset("kind", kind):
        kind = "vit"
    if kind not in IMAGE_KINDS:
        raise C.ConfigError(f"{path}.image.kind: unknown tower {kind!r} (expected 'vit' or 'resnet')")
    if kind == "vit":
        image = vit_spec(image_items, image_size, path=f"{path}.image", tolerated=RESNET_FIELDS)
    else:
        image = resnet_spec(image_items, image_size, path=f"{path}.image", tolerated=VIT_FIELDS)
    return DualEncoderSpec(
        image=image,
        text=text_spec(items.get("text"), path=f"{path}.text"),
        embed_dim=C.positive_int(values, path, "embed_dim"),
        dtype=C.choice(values, path, "dtype", DTYPES),
        remat=C.boolean(values, path, "remat"),
        logit_scale_init=_number(values["logit_scale_init"], f"{path}.logit_scale_init"),
        logit_bias_init=_number(items.get("logit_bias_init"), f"{path}.logit_bias_init", allow_none=True),
    )


def normalize_images(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] or float [0, 1] RGB -> float32 standardised by CLIP stats.

    Both input kinds map the same picture to the same tensor, so a float
    augmentation pipeline and the uint8 data path are interchangeable.
    """
    if jnp.issubdtype(images.dtype, jnp.integer):
        x = images.astype(jnp.float32) / 255.0
    else:
        x = images.astype(jnp.float32)
    return (x - CLIP_MEAN) / CLIP_STD


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps))


def build_image_tower(
    spec: ViTSpec | ResNetSpec, *, image_size: int, dtype: Any, remat: bool, rngs: nnx.Rngs
) -> nnx.Module:
    if isinstance(spec, ViTSpec):
        return ViT(spec, image_size=image_size, dtype=dtype, remat=remat, rngs=rngs)
    return ResNet(spec, image_size=image_size, dtype=dtype, remat=remat, rngs=rngs)


class DualEncoder(nnx.Module):
    """Image and text towers with linear projections to a shared space.

    ``image_features`` / ``text_features`` expose the tower outputs before the
    projection; an image-image (SimCLR) projector head can be added on top of
    ``image_features`` as one more submodule without touching the towers.
    """

    def __init__(self, model_config: Any, *, vocab_size: int, max_len: int, image_size: int, rngs: nnx.Rngs):
        vocab_size = _positive_arg(vocab_size, "vocab_size")
        max_len = _positive_arg(max_len, "max_len")
        image_size = _positive_arg(image_size, "image_size")
        spec = model_spec(model_config, image_size=image_size)
        self.spec = spec
        self.image_tower = build_image_tower(
            spec.image, image_size=image_size, dtype=spec.dtype, remat=spec.remat, rngs=rngs
        )
        self.text_tower = TextTransformer(
            spec.text, vocab_size=vocab_size, max_len=max_len, dtype=spec.dtype, remat=spec.remat, rngs=rngs
        )
        # Projections run in float32: they are cheap and feed the normalisation
        # and the similarity logits, where bf16 rounding would show.
        self.image_proj = Dense(
            self.image_tower.out_dim, spec.embed_dim, names=("embed", "proj"), use_bias=False, rngs=rngs
        )
        self.text_proj = Dense(
            self.text_tower.out_dim, spec.embed_dim, names=("embed", "proj"), use_bias=False, rngs=rngs
        )
        self.logit_scale = nnx.Param(jnp.asarray(spec.logit_scale_init, jnp.float32))
        self.logit_bias = (
            nnx.Param(jnp.asarray(spec.logit_bias_init, jnp.float32))
            if spec.logit_bias_init is not None
            else None
        )

    def image_features(self, images: jax.Array) -> jax.Array:
        """Tower output before projection, float32 [B, image_tower.out_dim]."""
        return self.image_tower(normalize_images(images)).astype(jnp.float32)

    def text_features(self, tokens: jax.Array) -> jax.Array:
        """Tower output before projection, float32 [B, text_tower.out_dim]."""
        return self.text_tower(tokens).astype(jnp.float32)

    def encode_image(self, images: jax.Array) -> jax.Array:
        """uint8 [B,H,W,3] (or float in [0,1]) -> unit-norm float32 [B, embed]."""
        return l2_normalize(self.image_proj(self.image_features(images)))

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """int32 [B, L] token ids (pad 0) -> unit-norm float32 [B, embed]."""
        return l2_normalize(self.text_proj(self.text_features(tokens)))

    def __call__(self, images: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.encode_image(images), self.encode_text(tokens)


def build_model(
    config_model: Any, *, vocab_size: int, max_len: int, image_size: int, seed: int
) -> DualEncoder:
    return DualEncoder(
        config_model,
        vocab_size=vocab_size,
        max_len=max_len,
        image_size=image_size,
        rngs=nnx.Rngs(params=seed),
    )


def count_params(model: nnx.Module) -> int:
    """Number of parameter scalars; works on abstract (eval_shape) models too."""
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return int(sum(math.prod(x.shape) for x in leaves))
