"""Ring (blockwise) contrastive losses: the global-batch losses in O(b*d + b*chunk) memory per device.

The `gather` form in `contrastive.py` holds b x B logits per device, which outgrows memory long
before the embeddings do. Here each device keeps its local image block `img` [b, d] and text
block `txt` [b, d]; the text blocks travel around a `ppermute` ring, and each device scores its
local images against the visiting block one tile of `chunk` columns at a time:

    logits[i, j] = exp(logit_scale) * <img_i, txt_j>     (b x chunk per tile, never b x B)

Softmax (symmetric InfoNCE). Rows (image -> text) keep a running max and sum of exponentials
(online log-sum-exp) on the device that owns them. Columns (text -> image) keep the same pair,
but it travels with their text tile, so after a full lap it is home and complete: one matmul
per tile serves both directions. The positive logits are the local <img_i, txt_i>, so no tile
needs to know where the diagonal is:

    L = (sum_i lse_row_i + sum_j lse_col_j - 2 sum_i logit_ii) / (2B)

Sigmoid (SigLIP). Every tile is scored as if all its pairs were negatives, softplus(logit), and
the local positives are corrected with softplus(-x) - softplus(x) = -x:

    L = (sum_ij softplus(logit_ij + bias) - sum_i (logit_ii + bias)) / B

The backward pass is a `jax.custom_vjp` around the two shard_maps (forward and backward each run
their own ring) and recomputes the tiles from the saved O(B) statistics. With G = dL/dlogit:

    softmax: G_ij = g * (exp(logit_ij - lse_row_i) + exp(logit_ij - lse_col_j) - 2 [i = j]) / (2B)
    sigmoid: G_ij = g * (sigmoid(logit_ij + bias) - [i = j]) / B
    d img_i = s sum_j G_ij txt_j,   d txt_j = s sum_i G_ij img_i,   s = exp(logit_scale)
    d logit_scale = sum_ij G_ij (logit_ij - bias)   (d logit / d logit_scale is the logit itself)
    d bias = sum_ij G_ij

d img accumulates on the owning device. d txt of a visiting tile is accumulated in a buffer
that travels with the tile, so it reaches the text's owner at the end of the lap. The [i = j]
terms only involve local rows and are added outside the ring.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

def default_chunk(block: int, dim: int) -> int:
    """Largest divisor of the local block size that is at most max(8, dim // 4).

    About five b x chunk tiles are live in the softmax backward pass next to two or three b x d
    blocks, so chunk <= d/4 keeps the tiles within about one more block whatever the batch size,
    while the tile matmuls stay as wide at 1M examples as at 8k.
    """
    limit = max(1, min(block, max(8, dim // 4)))
    return max(c for c in range(1, limit + 1) if block % c == 0)


def _ring_size(mesh: Mesh, axes: tuple[str, ...]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _varying(x, axes):
    # Loop carries must have the same varying-axes type on entry and exit; fresh constants are
    # invariant, while anything computed from the local block is varying.
    return jax.lax.pcast(x, axes, to="varying")


def _ring(tile_fn: Callable, acc, travelling, *, axes, ring_size: int, chunk: int):
    """Visit every column tile of every device's travelling block once.

    `travelling` is a tuple of arrays with the local block size as leading dimension; tile
    `tile_fn(tile, acc) -> (tile, acc)` sees `chunk` rows of each. A tile is passed to the next
    device as soon as it has been used, and the received tile is written where it came from: the
    ring moves tile by tile, so the in-flight copy is one tile, not a second block. After
    ring_size * n steps every block (and whatever was accumulated in it) is back with its owner.

    `tile_fn` should not apply elementwise ops to the tile's arrays directly (scale the logits,
    not the embeddings): XLA fuses the slice into such an op, which then reads the block behind
    the in-place write's back, and XLA answers by copying the whole block on every step.
    """
    n = travelling[0].shape[0] // chunk
    perm = [(j, (j + 1) % ring_size) for j in range(ring_size)]

    def step(t, carry):
        acc, travelling = carry
        start = (t % n) * chunk
        tile = tuple(jax.lax.dynamic_slice_in_dim(a, start, chunk) for a in travelling)
        tile, acc = tile_fn(tile, acc)
        if ring_size > 1:
            tile = tuple(jax.lax.ppermute(x, axes, perm) for x in tile)
        travelling = tuple(
            jax.lax.dynamic_update_slice_in_dim(a, x, start, 0) for a, x in zip(travelling, tile))
        return acc, travelling

    return jax.lax.fori_loop(0, ring_size * n, step, (acc, travelling))


def _positive_logits(img, txt, scale):
    return scale * jnp.sum(img * txt, axis=1)


# ---------------------------------------------------------------- softmax (InfoNCE), per device


def _online_lse(running_max, running_sum, logits, axis):
    """Fold one tile into a running (max, sum of exp(logit - max)) along `axis`."""
    new_max = jnp.maximum(running_max, jnp.max(logits, axis=axis))
    # Summing exponentials and taking one log at the end keeps the rounding relative to the
    # sum; folding in log space would add an error proportional to |lse| at every tile.
    running_sum = (running_sum * jnp.exp(running_max - new_max)
                   + jnp.sum(jnp.exp(logits - jnp.expand_dims(new_max, axis)), axis=axis))
    return new_max, running_sum


def _infonce_forward(img, txt, logit_scale, *, axes, ring_size, chunk, global_batch):
    scale = jnp.exp(logit_scale)

    def tile_fn(tile, rows):
        x, col_max, col_sum = tile
        logits = scale * (img @ x.T)
        rows = _online_lse(*rows, logits, axis=1)
        col_max, col_sum = _online_lse(col_max, col_sum, logits, axis=0)
        return (x, col_max, col_sum), rows

    b = img.shape[0]
    no_max = _varying(jnp.full((b,), -jnp.inf, img.dtype), axes)
    no_sum = _varying(jnp.zeros((b,), img.dtype), axes)
    (row_max, row_sum), (_, col_max, col_sum) = _ring(
        tile_fn, (no_max, no_sum), (txt, no_max, no_sum), axes=axes, ring_size=ring_size, chunk=chunk)
    lse_row = row_max + jnp.log(row_sum)
    lse_col = col_max + jnp.log(col_sum)
    # Subtract the positive row by row: lse and the positive logit are both near exp(logit_scale),
    # and the loss is their small difference.
    pos = _positive_logits(img, txt, scale)
    local = jnp.sum((lse_row - pos) + (lse_col - pos))
    return jax.lax.psum(local, axes) / (2 * global_batch), lse_row, lse_col


def _infonce_backward(img, txt, logit_scale, lse_row, lse_col, g, *, axes, ring_size, chunk,
                      global_batch):
    scale = jnp.exp(logit_scale)
    coef = g / (2 * global_batch)
    pos = _positive_logits(img, txt, scale)

    def tile_fn(tile, acc):
        x, lse_x, pos_x, dx = tile
        dimg, dscale = acc
        logits = scale * (img @ x.T)
        grad_row = coef * jnp.exp(logits - lse_row[:, None])
        grad_col = coef * jnp.exp(logits - lse_x[None, :])
        grad = grad_row + grad_col
        dimg = dimg + scale * (grad @ x)
        dx = dx + scale * (grad.T @ img)
        # Each softmax sums to one, so sum_j P_ij (logit_ij - logit_ii) equals the row's share
        # of sum_ij G_ij logit_ij with the -[i = j] term folded in. Centring on the positive
        # avoids cancelling two large sums, and makes the result insensitive to rounding in lse.
        dscale = dscale + jnp.sum(grad_row * (logits - pos[:, None]) + grad_col * (logits - pos_x[None, :]))
        return (x, lse_x, pos_x, dx), (dimg, dscale)

    # The -2 [i = j] part of G, which only touches local rows, seeds the embedding accumulators.
    positive = -2 * coef * scale
    acc = (positive * txt, _varying(jnp.zeros((), img.dtype), axes))
    (dimg, dscale), (*_, dtxt) = _ring(
        tile_fn, acc, (txt, lse_col, pos, positive * img), axes=axes, ring_size=ring_size, chunk=chunk)
    return dimg, dtxt, jax.lax.psum(dscale, axes)


# ---------------------------------------------------------------- sigmoid (SigLIP), per device


def _sigmoid_forward(img, txt, logit_scale, logit_bias, *, axes, ring_size, chunk, global_batch):
    scale = jnp.exp(logit_scale)

    def tile_fn(tile, total):
        (x,) = tile
        return tile, total + jnp.sum(jax.nn.softplus(scale * (img @ x.T) + logit_bias))

    total, _ = _ring(tile_fn, _varying(jnp.zeros((), img.dtype), axes), (txt,),
                     axes=axes, ring_size=ring_size, chunk=chunk)
    total = total - jnp.sum(_positive_logits(img, txt, scale) + logit_bias)
    return jax.lax.psum(total, axes) / global_batch


def _sigmoid_backward(img, txt, logit_scale, logit_bias, g, *, axes, ring_size, chunk,
                      global_batch):
    scale = jnp.exp(logit_scale)
    coef = g / global_batch

    def tile_fn(tile, acc):
        x, dx = tile
        dimg, dscale, dbias = acc
        logits = scale * (img @ x.T)
        grad = coef * jax.nn.sigmoid(logits + logit_bias)
        dimg = dimg + scale * (grad @ x)
        dx = dx + scale * (grad.T @ img)
        return (x, dx), (dimg, dscale + jnp.sum(grad * logits), dbias + jnp.sum(grad))

    # The -[i = j] part of G seeds the accumulators.
    dimg = -coef * scale * txt
    dscale = -coef * jnp.sum(_positive_logits(img, txt, scale))
    dbias = _varying(-coef * img.shape[0], axes)
    (dimg, dscale, dbias), (_, dtxt) = _ring(
        tile_fn, (dimg, dscale, dbias), (txt, -coef * scale * img),
        axes=axes, ring_size=ring_size, chunk=chunk)
    return dimg, dtxt, jax.lax.psum(dscale, axes), jax.lax.psum(dbias, axes)


# ---------------------------------------------------------------- public API


def _ring_options(img, mesh, batch_axes, chunk):
    axes = tuple(batch_axes)
    ring_size = _ring_size(mesh, axes)
    global_batch = img.shape[0]
    if global_batch % ring_size:
        raise ValueError(f"global batch {global_batch} does not split over {ring_size} devices")
    block = global_batch // ring_size
    chunk = default_chunk(block, img.shape[1]) if chunk is None else chunk
    if chunk < 1 or block % chunk:
        raise ValueError(f"chunk={chunk} must divide the per-device batch {block}")
    return dict(axes=axes, ring_size=ring_size, chunk=chunk, global_batch=global_batch)


def ring_infonce_loss(img, txt, logit_scale, *, mesh: Mesh, batch_axes: Sequence[str],
                      chunk: int | None = None):
    """`global_infonce_loss` computed blockwise around a ring; img/txt are [B, d] sharded over batch_axes."""
    opts = _ring_options(img, mesh, batch_axes, chunk)
    rows, scalar = P(opts["axes"]), P()
    forward = jax.shard_map(
        functools.partial(_infonce_forward, **opts), mesh=mesh,
        in_specs=(rows, rows, scalar), out_specs=(scalar, rows, rows))
    backward = jax.shard_map(
        functools.partial(_infonce_backward, **opts), mesh=mesh,
        in_specs=(rows, rows, scalar, rows, rows, scalar), out_specs=(rows, rows, scalar))

    @jax.custom_vjp
    def loss(img, txt, logit_scale):
        return forward(img, txt, logit_scale)[0]

    def loss_fwd(img, txt, logit_scale):
        value, lse_row, lse_col = forward(img, txt, logit_scale)
        return value, (img, txt, logit_scale, lse_row, lse_col)

    def loss_bwd(residuals, g):
        return backward(*residuals, g)

    loss.defvjp(loss_fwd, loss_bwd)
    return loss(img.astype(jnp.float32), txt.astype(jnp.float32),
                jnp.asarray(logit_scale, jnp.float32))


def ring_sigmoid_loss(img, txt, logit_scale, logit_bias, *, mesh: Mesh, batch_axes: Sequence[str],
                      chunk: int | None = None):
    """`global_sigmoid_loss` computed blockwise around a ring; img/txt are [B, d] sharded over batch_axes."""
    opts = _ring_options(img, mesh, batch_axes, chunk)
    rows, scalar = P(opts["axes"]), P()
    forward = jax.shard_map(
        functools.partial(_sigmoid_forward, **opts), mesh=mesh,
        in_specs=(rows, rows, scalar, scalar), out_specs=scalar)
    backward = jax.shard_map(
        functools.partial(_sigmoid_backward, **opts), mesh=mesh,
        in_specs=(rows, rows, scalar, scalar, scalar), out_specs=(rows, rows, scalar, scalar))

    @jax.custom_vjp
    def loss(img, txt, logit_scale, logit_bias):
        return forward(img, txt, logit_scale, logit_bias)

    def loss_fwd(img, txt, logit_scale, logit_bias):
        return forward(img, txt, logit_scale, logit_bias), (img, txt, logit_scale, logit_bias)

    def loss_bwd(residuals, g):
        return backward(*residuals, g)

    loss.defvjp(loss_fwd, loss_bwd)
    return loss(img.astype(jnp.float32), txt.astype(jnp.float32),
                jnp.asarray(logit_scale, jnp.float32), jnp.asarray(logit_bias, jnp.float32))


def grad_temp_bytes(loss_fn: Callable, global_batch: int, dim: int, *, mesh: Mesh,
                    batch_axes: Sequence[str]) -> int:
    """Per-device XLA temporary memory of value_and_grad(loss_fn) at [global_batch, dim], compiled only.

    `loss_fn(img, txt, logit_scale, logit_bias)`; nothing is allocated, the arguments are
    abstract and sharded like the real embeddings.
    """
    rows = NamedSharding(mesh, P(tuple(batch_axes)))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
    emb = jax.ShapeDtypeStruct((global_batch, dim), jnp.float32, sharding=rows)
    step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3)))
    compiled = step.lower(emb, emb, scalar, scalar).compile()
    return compiled.memory_analysis().temp_size_in_bytes
