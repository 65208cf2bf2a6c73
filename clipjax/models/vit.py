"""Vision Transformer image tower."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from clipjax.models.layers import (
    ACTIVATIONS,
    MLP,
    POOLED,
    TOKENS,
    Attention,
    Conv,
    Dense,
    LayerNorm,
    Stack,
    TransformerBlock,
    attention_mask,
    embed_normal,
    lecun_normal,
    param,
    spec_from,
    transformer_sizes,
)
from clipjax.models.naflex import Patches, resize_positions, square_patches, valid_patches
from clipjax.parallel.activations import constrain
from clipjax.schema import ConfigError, Field

# The variant table: every ViT size in one place (big_vision's names).
VARIANTS: dict[str, dict[str, int]] = {
    "tiny": dict(width=64, depth=2, heads=4, mlp_dim=256, patch_size=4),
    "S/16": dict(width=384, depth=12, heads=6, mlp_dim=1536, patch_size=16),
    "B/16": dict(width=768, depth=12, heads=12, mlp_dim=3072, patch_size=16),
    "B/32": dict(width=768, depth=12, heads=12, mlp_dim=3072, patch_size=32),
    "L/14": dict(width=1024, depth=24, heads=16, mlp_dim=4096, patch_size=14),
    # SigLIP's shape-optimised ViT (Alabdulmohsin et al., 2023).
    "So400m/14": dict(width=1152, depth=27, heads=16, mlp_dim=4304, patch_size=14),
}
SIZES = ("width", "depth", "heads", "mlp_dim", "patch_size")

# `model.image.*` as a ViT reads it. Unset sizes come from the variant.
FIELDS: dict[str, Field] = {
    "variant": Field("tiny", "preset sizes", choices=tuple(VARIANTS)),
    "patch_size": Field(None, "patch side in pixels", type=int, minimum=1),
    "width": Field(None, "token width", type=int, minimum=1),
    "depth": Field(None, "number of blocks", type=int, minimum=1),
    "heads": Field(None, "attention heads", type=int, minimum=1),
    "mlp_dim": Field(None, "hidden width of the MLP", type=int, minimum=1),
    "pool": Field(
        "cls",
        "pooling of the tokens: a class token's output, their mean, a MAP head (SigLIP), or "
        "`attentional_pooler` (open_clip's CoCa): a class token too, then learned queries attend over the "
        "tokens and a final LayerNorm follows; query 0 is the pooled output, the others the tokens a "
        "captioning decoder reads",
        choices=("cls", "mean", "map", "attentional_pooler"),
    ),
    "pooler_queries": Field(256, "pool=attentional_pooler: learned queries (CoCa: 256)", minimum=2),
    "pooler_heads": Field(8, "pool=attentional_pooler: attention heads of the pooler", minimum=1),
    "pooler_width": Field(
        None,
        "pool=attentional_pooler: width of the queries and of what the tower outputs (unset: the tower's "
        "width; open_clip's CoCa: model.embed_dim)",
        type=int,
        minimum=1,
    ),
    "patch_embed": Field("conv", "patch embedding", choices=("conv", "dense")),
    "patch_bias": Field(True, "the patch embedding has a bias (CLIP's has none)"),
    "ln_pre": Field(False, "a LayerNorm on the tokens before the blocks (CLIP's ln_pre)"),
    "activation": Field(
        "gelu_tanh", "the MLPs' non-linearity (CLIP: quick_gelu)", choices=tuple(ACTIVATIONS)
    ),
    "norm_eps": Field(1e-6, "LayerNorm epsilon (CLIP: 1e-5)", minimum=0.0),
    "naflex": Field(
        False,
        "NaFlex (SigLIP 2): each image its own grid of patches at about its aspect ratio, padded to one "
        "sequence length and the padding masked; the position table (data.image_size's grid, the same "
        "parameters as without) resized to each grid (clipjax.models.naflex)",
    ),
    "max_num_patches": Field(
        256, "naflex: the patch budget an image is resized to fit (clipjax.load's encode_image)", minimum=1
    ),
}


@dataclasses.dataclass(frozen=True)
class ViTSpec:
    width: int
    depth: int
    heads: int
    mlp_dim: int
    patch_size: int
    pool: str = "cls"
    patch_embed: str = "conv"
    variant: str | None = None
    patch_bias: bool = True
    ln_pre: bool = False
    activation: str = "gelu_tanh"
    norm_eps: float = 1e-6
    pooler_queries: int = 256
    pooler_heads: int = 8
    pooler_width: int | None = None
    naflex: bool = False
    max_num_patches: int = 256


def resolve(values: dict[str, Any], image_size: int, path: str = "model.image") -> ViTSpec:
    """The variant's sizes overridden by every size that is set; cross-field checks."""
    sizes = transformer_sizes(values, VARIANTS, SIZES, path)
    if image_size % sizes["patch_size"]:
        raise ConfigError(
            f"{path}.patch_size: {sizes['patch_size']} does not divide the image size {image_size}"
        )
    spec = spec_from(ViTSpec, sizes, values)
    if spec.naflex and spec.pool == "attentional_pooler":
        raise ConfigError(f"{path}.naflex: the attentional pooler does not mask padded patches")
    if spec.pool == "attentional_pooler" and (spec.pooler_width or spec.width) % spec.pooler_heads:
        raise ConfigError(
            f"{path}.pooler_heads: {spec.pooler_heads} heads do not divide the pooler's width "
            f"{spec.pooler_width or spec.width}"
        )
    return spec


class MAPHead(nnx.Module):
    """Multihead attention pooling: one learned probe attends over all tokens."""

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_dim: int,
        *,
        dtype: Any,
        attention: str = "xla",
        activation: str = "gelu_tanh",
        norm_eps: float = 1e-6,
        rngs: nnx.Rngs,
    ):
        self.probe = param(rngs, embed_normal, (width,), ("embed",))
        self.attn = Attention(width, heads, dtype=dtype, impl=attention, rngs=rngs)
        self.norm = LayerNorm(width, epsilon=norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = MLP(width, mlp_dim, activation=activation, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        probe = jnp.broadcast_to(self.probe[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        y = self.attn(probe, x, mask=mask)
        y = y + self.mlp(self.norm(y))
        return constrain(y[:, 0], POOLED)


class AttentionalPooler(nnx.Module):
    """open_clip's CoCa pooling: `queries` learned vectors (LayerNorm-ed) attend over the
    LayerNorm-ed tokens of another width; [B, queries, width] out."""

    def __init__(self, width, token_width, heads, queries, *, norm_eps, dtype, attention, rngs):
        norm = dict(epsilon=norm_eps, dtype=dtype, rngs=rngs)
        self.queries = param(rngs, embed_normal, (queries, width), ("pos", "embed"))
        self.query_norm = LayerNorm(width, **norm)
        self.token_norm = LayerNorm(token_width, **norm)
        self.attn = Attention(width, heads, kv_width=token_width, dtype=dtype, impl=attention, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        q = self.query_norm(self.queries[...])
        q = jnp.broadcast_to(q.astype(tokens.dtype), (tokens.shape[0], *q.shape))
        return self.attn(q, self.token_norm(tokens))


class ViT(nnx.Module):
    """Patchify, add learned positions, pre-LN encoder, final LN, pool.

    Input: float images [B, H, W, 3], already normalised (a NaFlex ViT: `Patches`, see
    clipjax.models.naflex). Output [B, width].
    """

    def __init__(
        self,
        spec: ViTSpec,
        *,
        image_size: int,
        dtype: Any = jnp.float32,
        remat: str | bool = "none",
        attention: str = "xla",
        unroll: int = 1,
        rngs: nnx.Rngs,
    ):
        p, w = spec.patch_size, spec.width
        self.spec = spec
        self.image_size = image_size
        self.dtype = jnp.dtype(dtype)
        num_patches = self.num_patches = (image_size // p) ** 2
        if spec.patch_embed == "conv":
            self.patch = Conv(
                3,
                w,
                p,
                stride=p,
                padding="VALID",
                names=("conv_h", "conv_w", "conv_in", "embed"),
                use_bias=spec.patch_bias,
                kernel_init=lecun_normal,
                dtype=dtype,
                rngs=rngs,
            )
        else:
            self.patch = Dense(
                p * p * 3, w, names=("patch", "embed"), use_bias=spec.patch_bias, dtype=dtype, rngs=rngs
            )
        with_cls = spec.pool in ("cls", "attentional_pooler")
        self.cls = param(rngs, embed_normal, (w,), ("embed",)) if with_cls else None
        num_tokens = num_patches + (1 if with_cls else 0)
        self.pos = param(rngs, embed_normal, (num_tokens, w), ("pos", "embed"))
        block = dict(activation=spec.activation, norm_eps=spec.norm_eps, dtype=dtype, attention=attention)
        self.ln_pre = LayerNorm(w, epsilon=spec.norm_eps, dtype=dtype, rngs=rngs) if spec.ln_pre else None
        self.encoder = Stack(
            lambda r: TransformerBlock(w, spec.heads, spec.mlp_dim, **block, rngs=r),
            spec.depth,
            remat=remat,
            unroll=unroll,
            rngs=rngs,
        )
        # With the attentional pooler, the final LayerNorm follows the pooler, at its width.
        pooled = spec.pool == "attentional_pooler"
        out_dim = (spec.pooler_width or w) if pooled else w
        self.pooler = (
            AttentionalPooler(
                out_dim,
                w,
                spec.pooler_heads,
                spec.pooler_queries,
                norm_eps=spec.norm_eps,
                dtype=dtype,
                attention=attention,
                rngs=rngs,
            )  # fmt: skip
            if pooled
            else None
        )
        self.norm = LayerNorm(out_dim, epsilon=spec.norm_eps, dtype=dtype, rngs=rngs)
        self.map_head = (
            MAPHead(w, spec.heads, spec.mlp_dim, **block, rngs=rngs) if spec.pool == "map" else None
        )
        self.out_dim = out_dim
        self.token_dim = out_dim

    def _patchify(self, images: jax.Array) -> jax.Array:
        if self.spec.patch_embed == "conv":
            x = self.patch(images)
            return x.reshape(x.shape[0], -1, x.shape[-1])
        return self._embed_patches(square_patches(images, self.spec.patch_size).patches)

    def _embed_patches(self, patches: jax.Array) -> jax.Array:
        """[B, N, p * p * 3] flattened patches -> [B, N, width]. Flattened (row, column, channel),
        as the HWIO conv kernel is: the conv's kernel reshaped is the same embedding."""
        if self.spec.patch_embed == "dense":
            return self.patch(patches)
        kernel = self.patch.kernel[...].astype(self.dtype)
        x = jnp.dot(patches.astype(self.dtype), kernel.reshape(-1, kernel.shape[-1]))
        return x if self.patch.bias is None else x + self.patch.bias[...].astype(self.dtype)

    def _tokens(self, images: jax.Array | Patches) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """(patch embeddings [B, N, width], their positions, valid [B, N] or None: no padding)."""
        if not self.spec.naflex:
            if isinstance(images, Patches):
                raise ValueError("a NaFlex patch batch for a fixed-resolution ViT (model.image.naflex=False)")
            if images.shape[1:3] != (self.image_size, self.image_size):
                raise ValueError(
                    f"ViT built for {self.image_size}x{self.image_size} images, got "
                    f"{images.shape[1]}x{images.shape[2]}"
                )
            return self._patchify(images.astype(self.dtype)), self.pos[...].astype(self.dtype), None
        if not isinstance(images, Patches):  # square images: one grid for all, no padding
            images = square_patches(images, self.spec.patch_size)
        length = images.patches.shape[1]
        table = self.pos[...]
        pos = constrain(resize_positions(table[-self.num_patches :], images.grid, length), TOKENS)
        if self.cls is not None:
            cls_pos = jnp.broadcast_to(table[0].astype(jnp.float32), (pos.shape[0], 1, pos.shape[-1]))
            pos = jnp.concatenate([cls_pos, pos], axis=1)
        x = self._embed_patches(images.patches.astype(self.dtype))
        return x, pos.astype(self.dtype), valid_patches(images.grid, length)

    def __call__(self, images: jax.Array | Patches) -> jax.Array:
        return self.encode(images)[0]

    def encode(
        self,
        images: jax.Array | Patches,
        patch_mask: jax.Array | None = None,
        mask_token: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """(pooled [B, width], the final-normed tokens [B, tokens, width] a decoder reads).

        `images`: [B, S, S, 3], or for a NaFlex ViT a `Patches` batch (or square images of any
        side the patch divides). `patch_mask` [B, patches] (bool): those patches' embeddings are
        replaced by `mask_token` [width] before anything else reads them (masked prediction), so
        nothing of a masked patch's pixels reaches the output."""
        x, pos, valid = self._tokens(images)
        x = constrain(x, TOKENS)
        if patch_mask is not None:
            x = jnp.where(patch_mask[..., None], mask_token.astype(self.dtype), x)
        if self.cls is not None:
            cls = jnp.broadcast_to(self.cls[...].astype(self.dtype), (x.shape[0], 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
            valid = None if valid is None else jnp.pad(valid, ((0, 0), (1, 0)), constant_values=True)
        x = x + pos
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        # Padded patches are hidden as keys everywhere; their own outputs are never read.
        mask = attention_mask(valid, x.shape[1])
        x = self.encoder(x) if mask is None else self.encoder(x, mask)
        if self.pooler is not None:
            x = constrain(self.norm(self.pooler(x)), TOKENS)
            return constrain(x[:, 0], POOLED), x[:, 1:]
        x = constrain(self.norm(x), TOKENS)
        if self.spec.pool == "cls":
            return constrain(x[:, 0], POOLED), x
        if self.spec.pool == "mean":
            if valid is None:
                pooled = jnp.mean(x.astype(jnp.float32), axis=1)
            else:
                weights = valid.astype(jnp.float32)[..., None]
                pooled = jnp.sum(x.astype(jnp.float32) * weights, axis=1) / jnp.sum(weights, axis=1)
            return constrain(pooled.astype(self.dtype), POOLED), x
        return self.map_head(x, mask), x


# The class `clipjax.models.spec.IMAGE_TOWERS` builds for kind "vit".
Tower = ViT
