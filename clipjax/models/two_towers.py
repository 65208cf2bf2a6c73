"""The CLIP dual encoder: image tower + text tower -> shared unit-norm space; or, with
`config.task = 'image_image'`, SimCLR's image tower + MLP projector (no text tower)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clipjax.models.layers import POOLED, Dense
from clipjax.models import spec as spec_lib
from clipjax.models.spec import IMAGE_TOWERS, DualEncoderSpec, config_model_spec, model_spec
from clipjax.models.decoder import CaptionDecoder
from clipjax.models.image_heads import ImageHeads
from clipjax.models.locca import EXTRA_CONTEXT, LoccaTokens
from clipjax.models.naflex import Patches
from clipjax.models.text import TextTransformer
from clipjax.parallel.activations import constrain

# CLIP's RGB statistics (the original OpenAI preprocessing), in [0, 1] units: the default of
# `model.image_mean` / `model.image_std`, which a model uses (`DualEncoderSpec`).
CLIP_MEAN = np.array(spec_lib.CLIP_MEAN, np.float32)
CLIP_STD = np.array(spec_lib.CLIP_STD, np.float32)


def _positive_arg(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def normalize_images(images: jax.Array, mean=CLIP_MEAN, std=CLIP_STD) -> jax.Array:
    """uint8 [0, 255] or float [0, 1] RGB -> float32 (x - mean) / std, per channel.

    Both input kinds map the same picture to the same tensor, so a float
    augmentation pipeline and the uint8 data path are interchangeable.
    """
    if jnp.issubdtype(images.dtype, jnp.integer):
        x = images.astype(jnp.float32) / 255.0
    else:
        x = images.astype(jnp.float32)
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps))


class NoTextTower(ValueError):
    """Raised (when traced) by `encode_text` of an image-image model: evaluators that need text
    (zero-shot, retrieval) report themselves skipped."""


class Projector(nnx.Module):
    """SimCLR's head: `layers` dense layers with ReLU between them, float32.

    The loss is taken after it and evaluation before it: the head absorbs the invariances the
    augmentations demand, so the tower's features keep more of what a probe can read."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, layers: int, *, rngs: nnx.Rngs):
        widths = [in_dim] + [hidden] * (layers - 1) + [out_dim]
        self.layers = nnx.List(
            [
                Dense(a, b, names=("embed", "proj"), use_bias=True, rngs=rngs)
                for a, b in zip(widths[:-1], widths[1:])
            ]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x = constrain(layer(jax.nn.relu(x) if i else x), POOLED)
        return x


class DualEncoder(nnx.Module):
    """Image and text towers with linear projections to a shared space.

    ``image_features`` / ``text_features`` expose the tower outputs before the
    projection; an image-image (SimCLR) projector head can be added on top of
    ``image_features`` as one more submodule without touching the towers.
    """

    def __init__(
        self, spec: DualEncoderSpec, *, vocab_size: int, max_len: int, image_size: int, rngs: nnx.Rngs
    ):
        vocab_size = _positive_arg(vocab_size, "vocab_size")
        max_len = _positive_arg(max_len, "max_len")
        image_size = _positive_arg(image_size, "image_size")
        self.spec = spec
        # How the towers compute (not what): the keywords an image-tower plug-in's Tower takes too.
        execution = dict(dtype=spec.dtype, remat=spec.remat, attention=spec.attention, unroll=spec.unroll)
        self.image_tower = IMAGE_TOWERS[spec.image_kind].Tower(
            spec.image, image_size=image_size, **execution, rngs=rngs
        )
        self.logit_scale = nnx.Param(jnp.asarray(spec.logit_scale_init, jnp.float32))
        self.logit_bias = (
            nnx.Param(jnp.asarray(spec.logit_bias_init, jnp.float32))
            if spec.logit_bias_init is not None
            else None
        )
        # SigLIP 2's image-side losses: prototype heads and a mask token (clipjax/models/image_heads.py).
        self.image_heads = (
            None
            if spec.image_heads is None
            else ImageHeads(
                spec.image_heads,
                pooled_width=self.image_tower.out_dim,
                token_width=self.image_tower.token_dim,
                rngs=rngs,
            )
        )
        if spec.task == "image_image":
            width = self.image_tower.out_dim
            self.projector = Projector(
                width, spec.projector_hidden or width, spec.embed_dim, spec.projector_layers, rngs=rngs
            )
            self.text_tower = self.image_proj = self.text_proj = self.decoder = None
            return
        self.projector = None
        self.text_tower = TextTransformer(
            spec.text, vocab_size=vocab_size, max_len=max_len, **execution, rngs=rngs
        )
        # Projections run in float32: they are cheap and feed the normalisation
        # and the similarity logits, where bf16 rounding would show.
        if spec.image_projection == "none":
            if self.image_tower.out_dim != spec.embed_dim:
                raise ValueError(
                    f"model.image_projection='none' needs model.embed_dim ({spec.embed_dim}) equal to the "
                    f"image tower's width ({self.image_tower.out_dim})"
                )
            self.image_proj = None
        else:
            self.image_proj = Dense(
                self.image_tower.out_dim, spec.embed_dim, names=("embed", "proj"), use_bias=False, rngs=rngs
            )
        self.text_proj = Dense(
            self.text_tower.out_dim,
            spec.embed_dim,
            names=("embed", "proj"),
            use_bias=spec.text_projection_bias,
            rngs=rngs,
        )
        if spec.decoder is not None and spec.decoder.tasks == "locca":
            # The decoder writes task and coordinate tokens after the text vocabulary's, in
            # sequences up to four tokens longer than a caption (clipjax/models/locca.py).
            vocab_size = LoccaTokens(vocab_size, spec.decoder.box_bins).vocab_size
            max_len += EXTRA_CONTEXT
        self.decoder = (
            None
            if spec.decoder is None
            else CaptionDecoder(
                spec.decoder,
                vocab_size=vocab_size,
                max_len=max_len,
                image_width=self.image_tower.token_dim,
                text_width=self.text_tower.out_dim,
                **execution,
                rngs=rngs,
            )
        )

    def image_features(self, images: jax.Array) -> jax.Array:
        """Tower output before projection, float32 [B, image_tower.out_dim]."""
        return constrain(self.image_tower(self._standardize(images)).astype(jnp.float32), POOLED)

    def _standardize(self, images: jax.Array | Patches) -> jax.Array | Patches:
        # Each chip normalises (and the tower embeds) only its own examples.
        if isinstance(images, Patches):  # NaFlex: channels are the patches' innermost axis
            patches = constrain(images.patches, ("batch",))
            pixels = patches.reshape(*patches.shape[:-1], -1, 3)
            pixels = normalize_images(pixels, self.spec.image_mean, self.spec.image_std)
            return Patches(pixels.reshape(patches.shape), constrain(images.grid, ("batch",)))
        images = constrain(images, ("batch",))
        return normalize_images(images, self.spec.image_mean, self.spec.image_std)

    def text_features(self, tokens: jax.Array) -> jax.Array:
        """Tower output before projection, float32 [B, text_tower.out_dim]."""
        return constrain(self.text_tower(tokens).astype(jnp.float32), POOLED)

    def encode_image(self, images: jax.Array) -> jax.Array:
        """uint8 [B,H,W,3] (or float in [0,1]; a NaFlex model: `Patches` of them) -> unit-norm
        float32 [B, embed].

        An image-image model gives its representation: the tower's features before the
        projector, normalised (what SimCLR evaluates)."""
        return self._embed_image_features(self.image_features(images))

    def _embed_image_features(self, features: jax.Array) -> jax.Array:
        if self.projector is not None or self.image_proj is None:
            return l2_normalize(features)
        return constrain(l2_normalize(self.image_proj(features)), POOLED)

    def encode_text(self, tokens: jax.Array) -> jax.Array:
        """int32 [B, L] token ids (pad 0) -> unit-norm float32 [B, embed]."""
        if self.text_tower is None:
            raise NoTextTower("an image-image model (task='image_image') has no text tower")
        return self._embed_text_features(self.text_features(tokens))

    def _embed_text_features(self, features: jax.Array) -> jax.Array:
        return constrain(l2_normalize(self.text_proj(features)), POOLED)

    def embed_and_caption(
        self, images: jax.Array, tokens: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """One forward pass of a model with a decoder: (image embeddings, text embeddings,
        teacher-forced logits [B, L - 1, vocab], row i predicting tokens[:, i + 1])."""
        img, txt, features = self.embed_and_decode(images, tokens)
        return img, txt, self.decoder.logits(features, self.tied_embedding())

    def embed_and_decode(
        self, images: jax.Array, tokens: jax.Array, decoder_tokens: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`embed_and_caption` up to the decoder's output layer: its features [B, L - 1, width]
        instead of the logits (`decoder.output_layer` gives the weights that make them).
        `decoder_tokens` [B, L']: what a decoder with its own embedding reads instead of the
        caption (LocCa's task sequences); the features are then [B, L' - 1, width]."""
        pooled, image_tokens = self.image_tower.encode(self._standardize(images))
        img = self._embed_image_features(constrain(pooled.astype(jnp.float32), POOLED))
        text_pooled, states = self.text_tower.encode(tokens, self.decoder.spec.input != "text_tower_raw")
        txt = self._embed_text_features(constrain(text_pooled.astype(jnp.float32), POOLED))
        if self.decoder.spec.input == "embed":
            inputs = (tokens if decoder_tokens is None else decoder_tokens)[:, :-1]
        else:
            inputs = states[:, :-1]
        return img, txt, self.decoder.features(inputs, self.decoder.memory(image_tokens))

    def image_memory(self, images: jax.Array) -> jax.Array:
        """What the decoder's cross-attention reads of each image, computed once per caption."""
        return self.decoder.memory(self.image_tower.encode(self._standardize(images))[1])

    def tied_embedding(self) -> jax.Array | None:
        """The text tower's token table where the decoder's output layer is tied to it."""
        d = self.decoder.spec
        return self.text_tower.embed[...] if d.tie_embedding and d.from_text_tower else None

    def project_image(self, images: jax.Array) -> jax.Array:
        """Image-image models: images -> unit-norm projector outputs, the space the loss sees."""
        return l2_normalize(self.projector(self.image_features(images)))

    def __call__(self, images: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.encode_image(images), self.encode_text(tokens)


def build_model(
    config_model: Any, *, vocab_size: int, max_len: int, image_size: int, seed: int
) -> DualEncoder:
    """A DualEncoder from `config.model` (checked and resolved by `model_spec`)."""
    return DualEncoder(
        model_spec(config_model, image_size=_positive_arg(image_size, "image_size")),
        vocab_size=vocab_size,
        max_len=max_len,
        image_size=image_size,
        rngs=nnx.Rngs(params=seed),
    )


def count_params(model: nnx.Module) -> int:
    """Number of parameter scalars; works on abstract (eval_shape) models too."""
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return int(sum(math.prod(x.shape) for x in leaves))


def model_factory(config: Any, *, vocab_size: int):
    """() -> DualEncoder for a whole run config (model section, image size, context, seed).

    A function rather than a model, so callers can build it abstractly (`nnx.eval_shape`) or
    directly into its shardings inside `jax.jit`.
    """
    image_size = _positive_arg(config.data.image_size, "data.image_size")
    spec = config_model_spec(config)
    max_len, seed = config.data.tokenizer.max_len, config.seed
    return lambda: DualEncoder(
        spec, vocab_size=vocab_size, max_len=max_len, image_size=image_size, rngs=nnx.Rngs(params=seed)
    )
