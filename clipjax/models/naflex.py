"""NaFlex inputs (SigLIP 2's variable resolution): each image as its own grid of patches.

An image keeps (about) its aspect ratio: it is resized so that both sides are multiples of the
patch size and its patch count is at most a budget (clipjax.data.naflex: `naflex_patches` for
clipjax.load, `region_patches` for training), cut into `rows x cols` patches flattened row by
row, and padded with empty patches to the budget N, so that a batch has one static shape:
`Patches(patches [B, N, p * p * 3], grid [B, 2])`, the valid patches first (index < rows *
cols). The ViT masks the padding as attention keys and in pooling, and resizes its learned
position table (the grid of a fixed-resolution model at `data.image_size`, so both share one
parameter layout) to each image's grid.

The resize is bilinear with antialiasing, as `torch.nn.functional.interpolate(mode="bilinear",
align_corners=False, antialias=True)` computes it (and transformers' Siglip2Model): output i of
an axis resized from `base` to `size` samples the input around (i + 0.5) * base / size - 0.5
with a triangle filter stretched by the scale when it shrinks (support max(base / size, 1)),
weights normalised to sum to one. `jax.image.resize` needs the output shape when tracing; here
every image of a batch has its own grid, so the weights are built from the traced grid.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Patches(NamedTuple):
    """A NaFlex image batch: `patches` [B, N, p * p * 3] (each flattened row, column, channel:
    uint8 pixels or [0, 1] floats into the model, standardised inside it) and `grid` int [B, 2]
    (patch rows, patch columns); the first rows * cols patches of an image are its own."""

    patches: jax.Array
    grid: jax.Array


def valid_patches(grid: jax.Array, length: int) -> jax.Array:
    """bool [B, length]: which of the sequence's patches belong to the image."""
    return jnp.arange(length)[None, :] < (grid[:, 0] * grid[:, 1])[:, None]


def _axis_weights(index: jax.Array, size: jax.Array, base: int) -> jax.Array:
    """[..., base] weights of output `index` of an axis of `size` outputs over `base` inputs."""
    scale = base / size.astype(jnp.float32)
    support = jnp.maximum(scale, 1.0)
    center = (index.astype(jnp.float32) + 0.5) * scale - 0.5
    distance = jnp.abs(jnp.arange(base, dtype=jnp.float32) - center[..., None])
    weights = jnp.maximum(0.0, 1.0 - distance / support[..., None])
    return weights / jnp.sum(weights, axis=-1, keepdims=True)


def resize_positions(table: jax.Array, grid: jax.Array, length: int) -> jax.Array:
    """A [base * base, width] position table (row-major grid) resized to each image's grid and
    laid out as its patches are: float32 [B, length, width]. Padding positions get the first
    grid cell's embedding (finite; the padding is masked anyway)."""
    base = int(round(table.shape[0] ** 0.5))
    grid = jnp.maximum(grid.astype(jnp.int32), 1)  # an empty (all padding) example stays finite
    rows, cols = grid[:, :1], grid[:, 1:]
    n = jnp.arange(length)[None, :]
    inside = n < rows * cols
    row, col = jnp.where(inside, n // cols, 0), jnp.where(inside, n % cols, 0)
    weights = _axis_weights(row, rows, base)[..., :, None] * _axis_weights(col, cols, base)[..., None, :]
    weights = weights.reshape(*weights.shape[:2], base * base)
    # Full float32 precision: on TPUs a default-precision matmul rounds the table to bfloat16.
    return jnp.einsum("bnk,kd->bnd", weights, table.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def square_patches(images: jax.Array, patch_size: int) -> Patches:
    """Images [B, H, W, C] (sides multiples of the patch) as a NaFlex batch without padding."""
    b, h, w, c = images.shape
    p = patch_size
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    grid = jnp.broadcast_to(jnp.asarray([h // p, w // p], jnp.int32), (b, 2))
    return Patches(x.reshape(b, (h // p) * (w // p), p * p * c), grid)
