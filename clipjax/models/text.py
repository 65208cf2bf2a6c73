"""Transformer text tower over token ids (pad id 0, right-padded)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from clipjax.models.layers import (
    ACTIVATIONS,
    POOLED,
    TOKENS,
    LayerNorm,
    Stack,
    TransformerBlock,
    attention_mask,
    embed_normal,
    empty_kv_cache,
    param,
    spec_from,
    transformer_sizes,
)
from clipjax.parallel.activations import constrain
from clipjax.schema import ConfigError, Field

PAD_ID = 0

# The variant table of the text tower.
VARIANTS: dict[str, dict[str, int]] = {
    "tiny": dict(width=64, depth=2, heads=4, mlp_dim=256),
    "B": dict(width=512, depth=12, heads=8, mlp_dim=2048),
    "L": dict(width=768, depth=12, heads=12, mlp_dim=3072),
    "So400m": dict(width=1152, depth=27, heads=16, mlp_dim=4304),
}
SIZES = ("width", "depth", "heads", "mlp_dim")

# `model.text.*`. Unset sizes come from the variant.
FIELDS: dict[str, Field] = {
    "variant": Field("tiny", "preset sizes", choices=tuple(VARIANTS)),
    "width": Field(None, "token width", type=int, minimum=1),
    "depth": Field(None, "number of blocks", type=int, minimum=1),
    "heads": Field(None, "attention heads", type=int, minimum=1),
    "mlp_dim": Field(None, "hidden width of the MLP", type=int, minimum=1),
    "pool": Field(
        "mean",
        "pooling: mean, first or last of the real (non-pad) tokens; `argmax`: the token of highest id "
        "(CLIP's end-of-text); `final`: the last position, pads or not (SigLIP's); `cls`: a learned token "
        "appended after the text, its final-normed output (open_clip's CoCa)",
        choices=("mean", "first", "last", "argmax", "final", "cls"),
    ),
    "causal": Field(False, "causal attention mask (CLIP's text tower)"),
    "pad_mask": Field(
        True,
        "hide pad tokens (id 0) from attention; off for published towers that attend to everything "
        "(CLIP, where id 0 is a word, and SigLIP). With pool=cls, as open_clip's CoCa hides them: position "
        "j when token j - 1 is a pad (so the appended token reads the text and the position after it)",
    ),
    "activation": Field(
        "gelu_tanh", "the MLPs' non-linearity (CLIP: quick_gelu)", choices=tuple(ACTIVATIONS)
    ),
    "norm_eps": Field(1e-6, "LayerNorm epsilon (CLIP: 1e-5)", minimum=0.0),
}


@dataclasses.dataclass(frozen=True)
class TextSpec:
    width: int
    depth: int
    heads: int
    mlp_dim: int
    pool: str = "mean"
    causal: bool = False
    variant: str | None = None
    pad_mask: bool = True
    activation: str = "gelu_tanh"
    norm_eps: float = 1e-6


def resolve(values: dict[str, Any], path: str = "model.text") -> TextSpec:
    """The variant's sizes overridden by every size that is set; cross-field checks."""
    sizes = transformer_sizes(values, VARIANTS, SIZES, path)
    if values["causal"] and values["pool"] == "first":
        raise ConfigError(
            f"{path}.pool: 'first' with causal=True would see only the first token (use 'last' or 'mean')"
        )
    if values["pool"] in ("mean", "first", "last") and not values["pad_mask"]:
        raise ConfigError(
            f"{path}.pool: {values['pool']!r} pools the real tokens, which needs {path}.pad_mask=True "
            "(use 'argmax' or 'final' without it)"
        )
    return spec_from(TextSpec, sizes, values)


class TextTransformer(nnx.Module):
    """Token + position embeddings, pre-LN encoder, final LN, pooling.

    Input: int32 tokens [B, L] with L <= max_len, pad id 0 after the text.
    Output: [B, width]. Pad tokens are masked out as attention keys and from
    the pooling, so appending more pads does not change the output.
    """

    def __init__(
        self,
        spec: TextSpec,
        *,
        vocab_size: int,
        max_len: int,
        dtype: Any = jnp.float32,
        remat: str | bool = "none",
        attention: str = "xla",
        unroll: int = 1,
        rngs: nnx.Rngs,
    ):
        w = spec.width
        self.spec = spec
        self.max_len = max_len
        self.dtype = jnp.dtype(dtype)
        self.embed = param(rngs, embed_normal, (vocab_size, w), ("vocab", "embed"))
        # pool=cls: the appended token has a position of its own, after the longest text.
        with_cls = spec.pool == "cls"
        self.pos = param(rngs, embed_normal, (max_len + with_cls, w), ("pos", "embed"))
        self.cls = param(rngs, embed_normal, (w,), ("embed",)) if with_cls else None
        block = dict(activation=spec.activation, norm_eps=spec.norm_eps, dtype=dtype, attention=attention)
        self.encoder = Stack(
            lambda r: TransformerBlock(w, spec.heads, spec.mlp_dim, **block, rngs=r),
            spec.depth,
            remat=remat,
            unroll=unroll,
            rngs=rngs,
        )
        self.norm = LayerNorm(w, epsilon=spec.norm_eps, dtype=dtype, rngs=rngs)
        self.out_dim = w

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.encode(tokens)[0]

    def encode(self, tokens: jax.Array, final_norm: bool = True) -> tuple[jax.Array, jax.Array]:
        """(pooled [B, width], every text position's output [B, L, width]: final-normed, or with
        `final_norm=False` as the last block gives it)."""
        b, length = tokens.shape
        if length > self.max_len:
            raise ValueError(f"text of length {length} exceeds max_len {self.max_len}")
        valid = tokens != PAD_ID
        # The looked-up tokens end up split by example like every activation; how the lookup
        # reaches that (it may send each chip every token id and all-to-all the result rather
        # than gather the table: docs/scaling.md) is the compiler's choice.
        tokens = constrain(tokens, ("batch", "length"))
        x = constrain(jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype), TOKENS)
        if self.cls is not None:
            cls = jnp.broadcast_to(self.cls[...].astype(self.dtype), (b, 1, x.shape[-1]))
            x = jnp.concatenate([x, cls], axis=1)
            # open_clip's CoCa mask: a key is hidden when the token before it is a pad.
            valid = jnp.concatenate([jnp.ones((b, 1), bool), valid], axis=1)
        x = x + self.pos[: x.shape[1]].astype(self.dtype)
        mask = attention_mask(valid if self.spec.pad_mask else None, x.shape[1], self.spec.causal)
        blocks = self.encoder(x, mask)
        if self.cls is not None:
            states = blocks[:, :-1]
            return constrain(self.norm(blocks[:, -1]), POOLED), self.norm(states) if final_norm else states
        x = constrain(self.norm(blocks), TOKENS)
        return constrain(self._pool(x, tokens, valid), POOLED), x if final_norm else blocks

    def init_cache(self, batch: int) -> tuple[jax.Array, jax.Array]:
        """Empty keys and values for `step`: [depth, B, max_len, heads, head_dim] each."""
        spec = self.spec
        return empty_kv_cache(spec.depth, batch, self.max_len, spec.heads, spec.width, self.dtype)

    def step(self, tokens: jax.Array, cache, index, final_norm: bool = True) -> tuple[jax.Array, Any]:
        """A causal tower's outputs at the new positions (tokens [B, T] from `index` on) over the
        cached earlier ones: (states [B, T, width], cache); the same states as `encode` gives
        there (`final_norm` alike), which a decoder continuing from the text tower reads."""
        if not self.spec.causal:
            raise ValueError("step needs a causal text tower (model.text.causal=True)")
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.dtype)
        x = x + jax.lax.dynamic_slice_in_dim(self.pos[...], index, tokens.shape[1], axis=0).astype(self.dtype)
        x, cache = self.encoder.scan_step(lambda block, h, c: block.step(h, c, index), x, cache)
        return self.norm(x) if final_norm else x, cache

    def _pool(self, x: jax.Array, tokens: jax.Array, valid: jax.Array) -> jax.Array:
        length = x.shape[1]
        if self.spec.pool == "first":
            return x[:, 0]
        if self.spec.pool == "final":
            return x[:, -1]
        if self.spec.pool == "argmax":
            # CLIP's end-of-text token has the vocabulary's highest id; the first one wins ties.
            eot = jnp.argmax(tokens, axis=1)
            return jnp.take_along_axis(x, eot[:, None, None], axis=1)[:, 0]
        if self.spec.pool == "last":
            # Position of the last real token, wherever pads sit.
            last = length - 1 - jnp.argmax(valid[:, ::-1], axis=1)
            return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
        weights = valid.astype(jnp.float32)[..., None]
        total = jnp.sum(x.astype(jnp.float32) * weights, axis=1)
        count = jnp.maximum(jnp.sum(weights, axis=1), 1.0)
        return (total / count).astype(self.dtype)
