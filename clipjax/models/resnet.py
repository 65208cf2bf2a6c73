"""A small ResNet-style convolutional image tower (GroupNorm, GELU).

Layout: stem 3x3 conv, then stages; a stage is one strided 3x3 conv that
changes the width, followed by ``blocks`` residual blocks (stacked + scanned).
Each conv is followed by GroupNorm and GELU. There is no BatchNorm, so the
tower holds only parameters and its output does not depend on batch mates.

The default variant 'tiny' is the recipe that learned the shapes demo well on
32x32 images: stem 32 (stride 1), stages (64, 128, 128) of stride 2
(32x32 -> 4x4), no residual blocks, flatten the 4x4x128 map, LayerNorm.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from clipjax.models.layers import Attention, Conv, GroupNorm, LayerNorm, Stack, embed_normal, param, zeros
from clipjax.parallel.activations import constrain
from clipjax.schema import ConfigError, Field, positive_ints

# The variant table: every ResNet-style layout in one place.
VARIANTS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        stem_width=32,
        stem_stride=1,
        widths=(64, 128, 128),
        strides=(2, 2, 2),
        blocks_per_stage=0,
        groups=8,
        pool="flatten",
    ),
    # RN50-scale compute with plain (non-bottleneck) blocks: the ResNet-34
    # layout, stem and first stage each halving the resolution (224 -> 7),
    # attention pooling as in CLIP's RN towers. About 25M parameters.
    "RN50": dict(
        stem_width=64,
        stem_stride=2,
        widths=(64, 128, 256, 512),
        strides=(2, 2, 2, 2),
        blocks_per_stage=(3, 4, 6, 3),
        groups=32,
        pool="attention",
    ),
}
LAYOUT = ("stem_width", "stem_stride", "widths", "strides", "blocks_per_stage", "groups", "pool")


def _blocks(value) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return None if value >= 0 else "expected a non-negative integer or a sequence of them"
    if (
        isinstance(value, (tuple, list))
        and value
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        return None
    return "expected a non-negative integer or a sequence of them"


# `model.image.*` as a ResNet reads it. Unset fields come from the variant.
FIELDS: dict[str, Field] = {
    "variant": Field("tiny", "preset layout", choices=tuple(VARIANTS)),
    "stem_width": Field(None, "channels of the stem conv", type=int, minimum=1),
    "stem_stride": Field(None, "stride of the stem conv", type=int, minimum=1),
    "widths": Field(None, "channels of each stage", type=tuple, check=positive_ints),
    "strides": Field(
        None, "stride of each stage (unset with widths set: 2 each)", type=tuple, check=positive_ints
    ),
    "blocks_per_stage": Field(
        None, "residual blocks after each stage's strided conv (int: every stage)", type=object, check=_blocks
    ),
    "groups": Field(None, "GroupNorm groups (at most one per channel)", type=int, minimum=1),
    "pool": Field(
        None,
        "`flatten` keeps position, `mean`, or CLIP-RN `attention`",
        type=str,
        choices=("flatten", "mean", "attention"),
    ),
    "attn_heads": Field(None, "heads of the attention pool (unset: last width / 64)", type=int, minimum=1),
    "conv_bias": Field(False, "biases in the convs (GroupNorm follows each)"),
}


@dataclasses.dataclass(frozen=True)
class ResNetSpec:
    stem_width: int
    widths: tuple[int, ...]
    strides: tuple[int, ...]
    blocks_per_stage: tuple[int, ...]
    stem_stride: int = 1
    groups: int = 8
    pool: str = "flatten"
    attn_heads: int = 1
    conv_bias: bool = False
    variant: str | None = None


def resolve(values: dict[str, Any], image_size: int, path: str = "model.image") -> ResNetSpec:
    """The variant's layout overridden by every field that is set; cross-field checks."""
    del image_size  # any size works: SAME padding, and the poolers size themselves
    layout = {**VARIANTS[values["variant"]], **{k: values[k] for k in LAYOUT if values[k] is not None}}
    widths = tuple(layout["widths"])
    n = len(widths)
    if values["widths"] is not None and values["strides"] is None:
        # Overriding the widths alone must not inherit the preset's stride count.
        layout["strides"] = (2,) * n
    strides = tuple(layout["strides"])
    if len(strides) != n:
        raise ConfigError(f"{path}.strides: {len(strides)} entries for {n} widths")
    blocks = layout["blocks_per_stage"]
    blocks = (blocks,) * n if isinstance(blocks, int) else tuple(blocks)
    if len(blocks) != n:
        raise ConfigError(f"{path}.blocks_per_stage: {len(blocks)} entries for {n} widths")
    groups = layout["groups"]
    for w in (layout["stem_width"],) + widths:
        if w % min(groups, w):
            raise ConfigError(f"{path}.groups: {groups} groups do not divide a width of {w}")
    heads = values["attn_heads"] or max(1, widths[-1] // 64)
    if layout["pool"] == "attention" and widths[-1] % heads:
        raise ConfigError(f"{path}.widths[-1]: {widths[-1]} is not divisible by {path}.attn_heads={heads}")
    return ResNetSpec(
        stem_width=layout["stem_width"],
        widths=widths,
        strides=strides,
        blocks_per_stage=blocks,
        stem_stride=layout["stem_stride"],
        groups=groups,
        pool=layout["pool"],
        attn_heads=heads,
        conv_bias=values["conv_bias"],
        variant=values["variant"],
    )


# A conv tower's activations are [batch, height, width, channels]: split by example, as the
# transformers' tokens are (clipjax/parallel/activations.py); channels follow the MLP's rule.
FEATURE_MAP = ("batch", None, None, "act_mlp")


class ConvNormAct(nnx.Module):
    """3x3 conv -> GroupNorm -> GELU."""

    def __init__(
        self, cin: int, cout: int, *, stride: int, groups: int, use_bias: bool, dtype: Any, rngs: nnx.Rngs
    ):
        self.conv = Conv(cin, cout, 3, stride=stride, use_bias=use_bias, dtype=dtype, rngs=rngs)
        self.norm = GroupNorm(cout, groups, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return constrain(jax.nn.gelu(self.norm(self.conv(x))), FEATURE_MAP)


class ResidualBlock(nnx.Module):
    """gelu(x + GN(conv(gelu(GN(conv(x)))))), width-preserving.

    The second norm's scale starts at zero so each block starts as the identity;
    deep stacks then train like shallow ones early on.
    """

    def __init__(self, width: int, *, groups: int, use_bias: bool, dtype: Any, rngs: nnx.Rngs):
        self.conv1 = Conv(width, width, 3, use_bias=use_bias, dtype=dtype, rngs=rngs)
        self.norm1 = GroupNorm(width, groups, dtype=dtype, rngs=rngs)
        self.conv2 = Conv(width, width, 3, use_bias=use_bias, dtype=dtype, rngs=rngs)
        self.norm2 = GroupNorm(width, groups, scale_init=zeros, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = constrain(x, FEATURE_MAP)
        y = constrain(jax.nn.gelu(self.norm1(self.conv1(x))), FEATURE_MAP)
        return constrain(jax.nn.gelu(x + self.norm2(self.conv2(y))), FEATURE_MAP)


class Stage(nnx.Module):
    """Strided conv to the new width, then a scanned stack of residual blocks."""

    def __init__(
        self,
        cin: int,
        cout: int,
        *,
        stride: int,
        blocks: int,
        groups: int,
        use_bias: bool,
        dtype: Any,
        remat: str | bool,
        unroll: int,
        rngs: nnx.Rngs,
    ):
        self.down = ConvNormAct(
            cin, cout, stride=stride, groups=groups, use_bias=use_bias, dtype=dtype, rngs=rngs
        )
        self.residual = Stack(
            lambda r: ResidualBlock(cout, groups=groups, use_bias=use_bias, dtype=dtype, rngs=r),
            blocks,
            remat=remat,
            unroll=unroll,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.residual(self.down(x))


class AttentionPool(nnx.Module):
    """CLIP-RN style pooling: the mean token attends over all positions."""

    def __init__(
        self,
        width: int,
        num_positions: int,
        heads: int,
        *,
        dtype: Any,
        attention: str = "xla",
        rngs: nnx.Rngs,
    ):
        self.pos = param(rngs, embed_normal, (num_positions + 1, width), ("pos", "embed"))
        self.attn = Attention(width, heads, dtype=dtype, impl=attention, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = x.reshape(b, h * w, c)
        mean = jnp.mean(tokens.astype(jnp.float32), axis=1, keepdims=True).astype(tokens.dtype)
        seq = jnp.concatenate([mean, tokens], axis=1)
        seq = seq + self.pos[...].astype(seq.dtype)
        return self.attn(seq[:, :1], seq)[:, 0]


def _out_size(size: int, stride: int) -> int:
    return -(-size // stride)  # SAME padding: ceil(size / stride)


class ResNet(nnx.Module):
    """Input: float images [B, H, W, 3], normalised. Output: [B, out_dim]."""

    def __init__(
        self,
        spec: ResNetSpec,
        *,
        image_size: int,
        dtype: Any = jnp.float32,
        remat: str | bool = "none",
        attention: str = "xla",
        unroll: int = 1,
        rngs: nnx.Rngs,
    ):
        g = spec.groups
        self.spec = spec
        self.image_size = image_size
        self.dtype = jnp.dtype(dtype)
        self.stem = ConvNormAct(
            3,
            spec.stem_width,
            stride=spec.stem_stride,
            groups=min(g, spec.stem_width),
            use_bias=spec.conv_bias,
            dtype=dtype,
            rngs=rngs,
        )
        size = _out_size(image_size, spec.stem_stride)
        stages = []
        cin = spec.stem_width
        for cout, stride, blocks in zip(spec.widths, spec.strides, spec.blocks_per_stage):
            stages.append(
                Stage(
                    cin,
                    cout,
                    stride=stride,
                    blocks=blocks,
                    groups=min(g, cout),
                    use_bias=spec.conv_bias,
                    dtype=dtype,
                    remat=remat,
                    unroll=unroll,
                    rngs=rngs,
                )
            )
            cin = cout
            size = _out_size(size, stride)
        self.stages = nnx.List(stages)
        self.final_size = size
        self.token_dim = cin
        if spec.pool == "flatten":
            self.out_dim = size * size * cin
            self.norm = LayerNorm(self.out_dim, dtype=dtype, rngs=rngs)
            self.attn_pool = None
        elif spec.pool == "mean":
            self.out_dim = cin
            self.norm = LayerNorm(cin, dtype=dtype, rngs=rngs)
            self.attn_pool = None
        else:
            self.out_dim = cin
            self.norm = None
            self.attn_pool = AttentionPool(
                cin, size * size, spec.attn_heads, dtype=dtype, attention=attention, rngs=rngs
            )

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.encode(images)[0]

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(pooled [B, out_dim], the last stage's map as tokens [B, h * w, channels] a decoder reads)."""
        if images.shape[1:3] != (self.image_size, self.image_size):
            # The flatten / attention poolers have position-dependent weights.
            raise ValueError(
                f"ResNet built for {self.image_size}x{self.image_size} images, got "
                f"{images.shape[1]}x{images.shape[2]}"
            )
        x = self.stem(images.astype(self.dtype))
        for stage in self.stages:
            x = stage(x)
        if self.spec.pool == "flatten":
            pooled = self.norm(x.reshape(x.shape[0], math.prod(x.shape[1:])))
        elif self.spec.pool == "mean":
            pooled = self.norm(jnp.mean(x.astype(jnp.float32), axis=(1, 2)))
        else:
            pooled = self.attn_pool(x)
        tokens = x.reshape(x.shape[0], -1, x.shape[-1])
        return constrain(pooled, ("batch", "act_embed")), constrain(tokens, ("batch", "length", "act_mlp"))


# The class `clipjax.models.spec.IMAGE_TOWERS` builds for kind "resnet".
Tower = ResNet
