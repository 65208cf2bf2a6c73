"""Ring (blockwise) contrastive losses: the global-batch losses in O(b*d + b*chunk) memory per device.

The `gather` form in `contrastive.py` holds b x B logits per device, which outgrows memory long
before the embeddings do. Here each device keeps its local image block `img` [b, d] and text
block `txt` [b, d]; the text blocks travel around a `ppermute` ring, and each device scores its
local images against the visiting block one tile of `chunk` columns at a time:

    logits[i, j] = exp(logit_scale) * <img_i, txt_j>     (b x chunk per tile, never b x B)

The positives (the global diagonal) all lie in the first lap step, when the visiting block is
the device's own, so each tile knows its positives from the step number alone.

Softmax (symmetric InfoNCE). Rows (image -> text) keep a running max and sum of exponentials
(online log-sum-exp) on the device that owns them. Columns (text -> image) keep the same pair,
but it travels with their text tile, so after a full lap it is home and complete: one matmul
per tile serves both directions.

    L = (sum_i (lse_row_i - logit_ii) + sum_j (lse_col_j - logit_jj)) / (2B)

Sigmoid (SigLIP) needs no statistics: L = sum_ij softplus(-z_ij (logit_ij + bias)) / B, with
z = +1 on the positives and -1 elsewhere.

The backward pass is a `jax.custom_vjp` around the two shard_maps (forward and backward each run
their own ring) and recomputes the tiles from the saved O(B) statistics (the row and column
max, 1 / sum and positive logit). With g the loss cotangent and G = dL/dlogit:

    softmax: G_ij = g * (P_ij + Q_ij - 2 [i = j]) / (2B),  P = row softmax, Q = column softmax
    sigmoid: G_ij = g * (sigmoid(logit_ij + bias) - [i = j]) / B
    d img_i = s sum_j G_ij txt_j,   d txt_j = s sum_i G_ij img_i,   s = exp(logit_scale)
    d logit_scale = sum_ij G_ij (logit_ij - bias)   (d logit / d logit_scale is the logit itself)
    d bias = sum_ij G_ij

For softmax, d logit_scale is summed in the equivalent centred form
g / (2B) * sum_ij (P_ij (logit_ij - logit_ii) + Q_ij (logit_ij - logit_jj)), which avoids
cancelling two large sums.

d img accumulates on the owning device. d txt of a visiting tile is accumulated in a buffer
that travels with the tile, so it reaches the text's owner at the end of the lap. The scalar
gradients are per-device partial sums, psum-ed at the end. The positives are taken from the
tile's own logits, as the gather form does, so that lse - logit_ii and P_ii - 1 are
differences of identically rounded numbers.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


# A tile of logits holds at most this many entries (16 MiB in float32) by default.
MAX_TILE_ELEMENTS = 2**22


def default_chunk(block: int, dim: int) -> int:
    """Columns per tile: the largest divisor of the local block within [d/4, 4d] and 4M logits.

    Wide tiles make large matrix products (at 8,192 x 256 on 8 devices a whole-block tile is
    as fast as the gathered loss, a d/4 one 30% slower); the cap on b x chunk logits keeps the
    few live tiles of the backward pass near the size of one embedding block however large the
    batch grows, and d/4 columns is the floor that keeps the tile products efficient at 1M.
    """
    cap = min(4 * dim, max(1, MAX_TILE_ELEMENTS // max(block, 1)))
    limit = max(1, min(block, max(8, dim // 4, cap)))
    return max(c for c in range(1, limit + 1) if block % c == 0)


def _ring_size(mesh: Mesh, axes: tuple[str, ...]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _varying(x, axes):
    # Loop carries must have the same varying-axes type on entry and exit; fresh constants are
    # invariant, while anything computed from the local block is varying.
    return jax.lax.pcast(x, axes, to="varying")


def _ring(tile_fn: Callable, acc, travelling, *, axes, ring_size: int, chunk: int):
    """Visit every column tile of every device's travelling block once.

    `travelling` is a tuple of arrays with the local block size b as leading dimension;
    `tile_fn(tile, acc, positive) -> (tile, acc)` sees `chunk` rows of each, and `positive`, the
    b x chunk mask of the (local row, visiting column) pairs that are positives. A tile is passed
    to the next device as soon as it has been used, and the received tile is written where it
    came from: the ring moves tile by tile, so the in-flight copy is one tile, not a second
    block. After ring_size * n steps every block (and whatever was accumulated in it) is back
    with its owner.

    `tile_fn` should not apply elementwise ops to the tile's b x d arrays directly (scale the
    logits, not the embeddings): XLA fuses the slice into such an op, which then reads the
    block behind the in-place write's back, and XLA answers by copying the whole block on every
    step.
    """
    block = travelling[0].shape[0]
    n = block // chunk
    perm = [(j, (j + 1) % ring_size) for j in range(ring_size)]

    def step(t, carry):
        acc, travelling = carry
        start = (t % n) * chunk
        tile = tuple(jax.lax.dynamic_slice_in_dim(a, start, chunk) for a in travelling)
        # In the first n steps the visiting block is the device's own: column c is row start + c.
        rows = jax.lax.broadcasted_iota(jnp.int32, (block, chunk), 0)
        cols = jax.lax.broadcasted_iota(jnp.int32, (block, chunk), 1)
        positive = (rows == cols + start) & (t < n)
        tile, acc = tile_fn(tile, acc, positive)
        if ring_size > 1:
            tile = tuple(jax.lax.ppermute(x, axes, perm) for x in tile)
        travelling = tuple(
            jax.lax.dynamic_update_slice_in_dim(a, x, start, 0) for a, x in zip(travelling, tile)
        )
        return acc, travelling

    return jax.lax.fori_loop(0, ring_size * n, step, (acc, travelling))


# ---------------------------------------------------------------- softmax (InfoNCE), per device


def _online_lse(running_max, running_sum, logits, axis):
    """Fold one tile into a running (max, sum of exp(logit - max)) along `axis`."""
    new_max = jnp.maximum(running_max, jnp.max(logits, axis=axis))
    # Summing exponentials and taking one log at the end keeps the rounding relative to the
    # sum; folding in log space would add an error proportional to |lse| at every tile.
    running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.sum(
        jnp.exp(logits - jnp.expand_dims(new_max, axis)), axis=axis
    )
    return new_max, running_sum


def _infonce_forward(img, txt, logit_scale, *, axes, ring_size, chunk, global_batch, precision):
    scale = jnp.exp(logit_scale)

    def tile_fn(tile, acc, positive):
        x, col_max, col_sum = tile
        row_max, row_sum, pos = acc
        logits = scale * jnp.matmul(img, x.T, precision=precision)
        row_max, row_sum = _online_lse(row_max, row_sum, logits, axis=1)
        col_max, col_sum = _online_lse(col_max, col_sum, logits, axis=0)
        pos = pos + jnp.sum(jnp.where(positive, logits, 0.0), axis=1)
        return (x, col_max, col_sum), (row_max, row_sum, pos)

    b = img.shape[0]
    no_max = _varying(jnp.full((b,), -jnp.inf, img.dtype), axes)
    zeros = _varying(jnp.zeros((b,), img.dtype), axes)
    (row_max, row_sum, pos), (_, col_max, col_sum) = _ring(
        tile_fn, (no_max, zeros, zeros), (txt, no_max, zeros), axes=axes, ring_size=ring_size, chunk=chunk
    )
    # lse - logit_ii is small next to either term (both near exp(logit_scale)): take it as
    # (max - logit_ii) + log(sum), never through a rounded lse. Local column j's positive is
    # local row j's.
    local = jnp.sum((row_max - pos) + jnp.log(row_sum) + (col_max - pos) + jnp.log(col_sum))
    stats = (row_max, 1 / row_sum, col_max, 1 / col_sum, pos)
    return jax.lax.psum(local, axes) / (2 * global_batch), stats


def _infonce_backward(img, txt, logit_scale, stats, g, *, axes, ring_size, chunk, global_batch, precision):
    scale = jnp.exp(logit_scale)
    coef = g / (2 * global_batch)
    row_max, row_inv_sum, col_max, col_inv_sum, pos = stats

    def tile_fn(tile, acc, positive):
        x, max_x, inv_sum_x, pos_x, dx = tile
        dimg, dscale = acc
        logits = scale * jnp.matmul(img, x.T, precision=precision)
        # softmax = exp(logit - max) / sum, as autodiff of the gather form's logsumexp computes
        # it: exp(logit - lse) would carry lse's rounding, |lse| * eps, into every probability.
        p_row = jnp.exp(logits - row_max[:, None]) * row_inv_sum[:, None]
        p_col = jnp.exp(logits - max_x[None, :]) * inv_sum_x[None, :]
        grad = coef * (p_row + p_col - jnp.where(positive, 2.0, 0.0))
        dimg = dimg + scale * jnp.matmul(grad, x, precision=precision)
        dx = dx + scale * jnp.matmul(grad.T, img, precision=precision)
        # sum_ij G_ij logit_ij is small next to its terms. Each softmax sums to one over its
        # row (column), so it equals the same sum with every logit measured from its row's
        # (column's) positive, where the -2 [i = j] terms vanish and nothing cancels.
        centred = p_row * (logits - pos[:, None]) + p_col * (logits - pos_x[None, :])
        return (x, max_x, inv_sum_x, pos_x, dx), (dimg, dscale + coef * jnp.sum(centred))

    acc = (jnp.zeros_like(img), _varying(jnp.zeros((), img.dtype), axes))
    (dimg, dscale), (*_, dtxt) = _ring(
        tile_fn,
        acc,
        (txt, col_max, col_inv_sum, pos, jnp.zeros_like(txt)),
        axes=axes,
        ring_size=ring_size,
        chunk=chunk,
    )
    return dimg, dtxt, jax.lax.psum(dscale, axes)


# ---------------------------------------------------------------- sigmoid (SigLIP), per device


def _sigmoid_forward(img, txt, logit_scale, logit_bias, *, axes, ring_size, chunk, global_batch, precision):
    scale = jnp.exp(logit_scale)

    def tile_fn(tile, total, positive):
        (x,) = tile
        logits = scale * jnp.matmul(img, x.T, precision=precision) + logit_bias
        return tile, total - jnp.sum(jax.nn.log_sigmoid(jnp.where(positive, logits, -logits)))

    total, _ = _ring(
        tile_fn, _varying(jnp.zeros((), img.dtype), axes), (txt,), axes=axes, ring_size=ring_size, chunk=chunk
    )
    return jax.lax.psum(total, axes) / global_batch


def _sigmoid_backward(
    img, txt, logit_scale, logit_bias, g, *, axes, ring_size, chunk, global_batch, precision
):
    scale = jnp.exp(logit_scale)
    coef = g / global_batch

    def tile_fn(tile, acc, positive):
        x, dx = tile
        dimg, dscale, dbias = acc
        logits = scale * jnp.matmul(img, x.T, precision=precision)
        grad = coef * (jax.nn.sigmoid(logits + logit_bias) - jnp.where(positive, 1.0, 0.0))
        dimg = dimg + scale * jnp.matmul(grad, x, precision=precision)
        dx = dx + scale * jnp.matmul(grad.T, img, precision=precision)
        return (x, dx), (dimg, dscale + jnp.sum(grad * logits), dbias + jnp.sum(grad))

    zero = _varying(jnp.zeros((), img.dtype), axes)
    (dimg, dscale, dbias), (_, dtxt) = _ring(
        tile_fn,
        (jnp.zeros_like(img), zero, zero),
        (txt, jnp.zeros_like(txt)),
        axes=axes,
        ring_size=ring_size,
        chunk=chunk,
    )
    return dimg, dtxt, jax.lax.psum(dscale, axes), jax.lax.psum(dbias, axes)


# ---------------------------------------------------------------- public API


def _ring_options(img, mesh, batch_axes, chunk, precision):
    axes = tuple(batch_axes)
    ring_size = _ring_size(mesh, axes)
    global_batch = img.shape[0]
    if global_batch % ring_size:
        raise ValueError(f"global batch {global_batch} does not split over {ring_size} devices")
    block = global_batch // ring_size
    chunk = default_chunk(block, img.shape[1]) if chunk is None else chunk
    if chunk < 1 or block % chunk:
        raise ValueError(f"chunk={chunk} must divide the per-device batch {block}")
    return dict(axes=axes, ring_size=ring_size, chunk=chunk, global_batch=global_batch, precision=precision)


def ring_infonce_loss(
    img,
    txt,
    logit_scale,
    *,
    mesh: Mesh,
    batch_axes: Sequence[str],
    chunk: int | None = None,
    precision=jax.lax.Precision.HIGHEST,
):
    """`global_infonce_loss`, computed blockwise around a ring of the devices along batch_axes.

    img/txt are [B, d] sharded over batch_axes; `logit_scale` is the log of the scale; `chunk`
    (columns per tile, a divisor of B / devices) defaults to `default_chunk`; `precision` of
    the logit matmuls, forward and backward (see `clipjax.losses.select.PRECISIONS`).
    """
    opts = _ring_options(img, mesh, batch_axes, chunk, precision)
    rows, scalar = P(opts["axes"]), P()
    forward = jax.shard_map(
        functools.partial(_infonce_forward, **opts),
        mesh=mesh,
        in_specs=(rows, rows, scalar),
        out_specs=(scalar, (rows,) * 5),
    )
    backward = jax.shard_map(
        functools.partial(_infonce_backward, **opts),
        mesh=mesh,
        in_specs=(rows, rows, scalar, (rows,) * 5, scalar),
        out_specs=(rows, rows, scalar),
    )

    @jax.custom_vjp
    def loss(img, txt, logit_scale):
        return forward(img, txt, logit_scale)[0]

    def loss_fwd(img, txt, logit_scale):
        value, stats = forward(img, txt, logit_scale)
        return value, (img, txt, logit_scale, stats)

    def loss_bwd(residuals, g):
        return backward(*residuals, g)

    loss.defvjp(loss_fwd, loss_bwd)
    return loss(img.astype(jnp.float32), txt.astype(jnp.float32), jnp.asarray(logit_scale, jnp.float32))


def ring_sigmoid_loss(
    img,
    txt,
    logit_scale,
    logit_bias,
    *,
    mesh: Mesh,
    batch_axes: Sequence[str],
    chunk: int | None = None,
    precision=jax.lax.Precision.HIGHEST,
):
    """`global_sigmoid_loss`, computed blockwise around a ring of the devices along batch_axes.

    img/txt are [B, d] sharded over batch_axes; `logit_scale` is the log of the scale and
    `logit_bias` a scalar; `chunk` and `precision` as in `ring_infonce_loss`.
    """
    opts = _ring_options(img, mesh, batch_axes, chunk, precision)
    rows, scalar = P(opts["axes"]), P()
    forward = jax.shard_map(
        functools.partial(_sigmoid_forward, **opts),
        mesh=mesh,
        in_specs=(rows, rows, scalar, scalar),
        out_specs=scalar,
    )
    backward = jax.shard_map(
        functools.partial(_sigmoid_backward, **opts),
        mesh=mesh,
        in_specs=(rows, rows, scalar, scalar, scalar),
        out_specs=(rows, rows, scalar, scalar),
    )

    @jax.custom_vjp
    def loss(img, txt, logit_scale, logit_bias):
        return forward(img, txt, logit_scale, logit_bias)

    def loss_fwd(img, txt, logit_scale, logit_bias):
        return forward(img, txt, logit_scale, logit_bias), (img, txt, logit_scale, logit_bias)

    def loss_bwd(residuals, g):
        return backward(*residuals, g)

    loss.defvjp(loss_fwd, loss_bwd)
    return loss(
        img.astype(jnp.float32),
        txt.astype(jnp.float32),
        jnp.asarray(logit_scale, jnp.float32),
        jnp.asarray(logit_bias, jnp.float32),
    )


def grad_temp_bytes(
    loss_fn: Callable, global_batch: int, dim: int, *, mesh: Mesh, batch_axes: Sequence[str]
) -> int:
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
