"""Ring (blockwise) contrastive losses: the global-batch losses in O(b*d + b*chunk) memory per device.

The `gather` form in `contrastive.py` holds b x B logits per device, which outgrows memory long
before the embeddings do. Here each device keeps its local image block `img` [b, d] and text
block `txt` [b, d]; the text blocks travel around a `ppermute` ring (`clipjax.parallel.ring`: a
whole block per lap step, sent on while it is being scored, so communication overlaps compute),
and each device scores its local images against the visiting block one tile of `chunk` columns
at a time:

    logits[i, j] = exp(logit_scale) * <img_i, txt_j>     (b x chunk per tile, never b x B)

The positives (the global diagonal) all lie in the first lap step, when the visiting block is
the device's own, so each tile knows its positives from the step number alone.

Softmax (symmetric InfoNCE). Rows (image -> text) keep a running max and sum of exponentials
(online log-sum-exp) on the device that owns them. Columns (text -> image) keep the same pair,
but it travels with their text block (two vectors of length b), so after a full lap it is home
and complete: one matmul per tile serves both directions.

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

The backward runs two laps: one with the images as rows and the texts visiting (d img, and
the scalar gradients), one the other way round (d txt), each side bringing its own softmax
statistics; G is symmetric in the two roles. A single lap could carry d txt home in a buffer
travelling with its block, but that buffer and its copy in flight would be two more b x d
blocks, and memory is what the ring is for: the second lap costs one more b x chunk x d product
per tile (5 logit products per step in all, against the gather form's 6) and keeps the
backward at two travelling blocks. The laps are ordered (`clipjax.parallel.ring.after`) so XLA
does not hold both at once. The scalar gradients are per-device partial sums, psum-ed at the
end. The positives are taken from the tile's own logits, as the gather form does, so that
lse - logit_ii and P_ii - 1 are differences of identically rounded numbers.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clipjax.parallel.ring import after, ring_pass, ring_size as ring_size_of, varying


# A tile of logits holds at most this many entries (16 MiB in float32) by default.
MAX_TILE_ELEMENTS = 2**22


def default_chunk(block: int, dim: int) -> int:
    """Columns per tile: the fewest tiles per block whose width stays within 4d and 4M logits.

    The widest tile allowed is `limit = min(block, 4 d, 4M // block)` (at least 1): wide tiles
    make large matrix products (at 8,192 x 256 on 8 devices a whole-block tile is as fast as the
    gathered loss), and the cap on b x chunk logits keeps the few live tiles of the backward pass
    small next to one embedding block however large the batch grows. The block is cut into
    n = ceil(block / limit) tiles of equal width (the last one narrower by fewer than n columns,
    see `clipjax.parallel.ring`), so no block size, prime or not, pays for narrow tiles.
    """
    limit = max(1, min(block, 4 * dim, MAX_TILE_ELEMENTS // max(block, 1)))
    tiles = -(-block // limit)
    return max(1, -(-block // tiles))


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

    def tile_fn(tile, column_stats, acc, positive):
        (x,) = tile
        col_max, col_sum = column_stats
        row_max, row_sum, pos = acc
        logits = scale * jnp.matmul(img, x.T, precision=precision)
        row_max, row_sum = _online_lse(row_max, row_sum, logits, axis=1)
        col_max, col_sum = _online_lse(col_max, col_sum, logits, axis=0)
        pos = pos + jnp.sum(jnp.where(positive, logits, 0.0), axis=1)
        return (col_max, col_sum), (row_max, row_sum, pos)

    b = img.shape[0]
    no_max = varying(jnp.full((b,), -jnp.inf, img.dtype), axes)
    zeros = varying(jnp.zeros((b,), img.dtype), axes)
    (row_max, row_sum, pos), (col_max, col_sum) = ring_pass(
        tile_fn, (no_max, zeros, zeros), (txt,), (no_max, zeros), axes=axes, size=ring_size, chunk=chunk
    )
    # lse - logit_ii is small next to either term (both near exp(logit_scale)): take it as
    # (max - logit_ii) + log(sum), never through a rounded lse. Local column j's positive is
    # local row j's.
    local = jnp.sum((row_max - pos) + jnp.log(row_sum) + (col_max - pos) + jnp.log(col_sum))
    stats = (row_max, 1 / row_sum, col_max, 1 / col_sum, pos)
    return jax.lax.psum(local, axes) / (2 * global_batch), stats


def _infonce_grad_pass(rows, rows_stats, visiting, visiting_stats, scale, coef, with_scale, opts):
    """d rows (and optionally the partial d logit_scale) with `visiting` going round the ring.

    Run once with the images as rows and the texts visiting, once the other way round: the
    logit gradient (P + Q - 2I) / (2B) is symmetric in the two roles once each side brings its
    own softmax statistics (max, 1 / sum, positive logit).
    """
    axes, precision = opts["axes"], opts["precision"]
    row_max, row_inv_sum, row_pos = rows_stats

    def tile_fn(tile, carried, acc, positive):
        x, max_x, inv_sum_x, pos_x = tile
        drows, dscale = acc
        logits = scale * jnp.matmul(rows, x.T, precision=precision)
        # softmax = exp(logit - max) / sum, as autodiff of the gather form's logsumexp computes
        # it: exp(logit - lse) would carry lse's rounding, |lse| * eps, into every probability.
        p_row = jnp.exp(logits - row_max[:, None]) * row_inv_sum[:, None]
        p_col = jnp.exp(logits - max_x[None, :]) * inv_sum_x[None, :]
        grad = coef * (p_row + p_col - jnp.where(positive, 2.0, 0.0))
        drows = drows + scale * jnp.matmul(grad, x, precision=precision)
        if with_scale:
            # sum_ij G_ij logit_ij is small next to its terms. Each softmax sums to one over its
            # row (column), so it equals the same sum with every logit measured from its row's
            # (column's) positive, where the -2 [i = j] terms vanish and nothing cancels.
            centred = p_row * (logits - row_pos[:, None]) + p_col * (logits - pos_x[None, :])
            dscale = dscale + coef * jnp.sum(centred)
        return carried, (drows, dscale)

    acc = (jnp.zeros_like(rows), varying(jnp.zeros((), rows.dtype), axes))
    (drows, dscale), _ = ring_pass(
        tile_fn, acc, (visiting, *visiting_stats), axes=axes, size=opts["ring_size"], chunk=opts["chunk"]
    )
    return drows, dscale


def _infonce_backward(img, txt, logit_scale, stats, g, **opts):
    scale = jnp.exp(logit_scale)
    coef = g / (2 * opts["global_batch"])
    row_max, row_inv_sum, col_max, col_inv_sum, pos = stats
    img_stats, txt_stats = (row_max, row_inv_sum, pos), (col_max, col_inv_sum, pos)
    dimg, dscale = _infonce_grad_pass(img, img_stats, txt, txt_stats, scale, coef, True, opts)
    img = after(img, dscale)
    dtxt, _ = _infonce_grad_pass(txt, txt_stats, img, img_stats, scale, coef, False, opts)
    return dimg, dtxt, jax.lax.psum(dscale, opts["axes"])


# ---------------------------------------------------------------- sigmoid (SigLIP), per device


def _sigmoid_forward(img, txt, logit_scale, logit_bias, *, axes, ring_size, chunk, global_batch, precision):
    scale = jnp.exp(logit_scale)

    def tile_fn(tile, carried, total, positive):
        (x,) = tile
        logits = scale * jnp.matmul(img, x.T, precision=precision) + logit_bias
        return carried, total - jnp.sum(jax.nn.log_sigmoid(jnp.where(positive, logits, -logits)))

    total, _ = ring_pass(
        tile_fn, varying(jnp.zeros((), img.dtype), axes), (txt,), axes=axes, size=ring_size, chunk=chunk
    )
    return jax.lax.psum(total, axes) / global_batch


def _sigmoid_grad_pass(rows, visiting, scale, logit_bias, coef, with_scalars, opts):
    """d rows (and optionally the partial d logit_scale and d bias), `visiting` going round the
    ring; the logit gradient (sigmoid(logit) - I) / B is symmetric in images and texts."""
    axes, precision = opts["axes"], opts["precision"]

    def tile_fn(tile, carried, acc, positive):
        (x,) = tile
        drows, dscale, dbias = acc
        logits = scale * jnp.matmul(rows, x.T, precision=precision)
        grad = coef * (jax.nn.sigmoid(logits + logit_bias) - jnp.where(positive, 1.0, 0.0))
        drows = drows + scale * jnp.matmul(grad, x, precision=precision)
        if with_scalars:
            dscale, dbias = dscale + jnp.sum(grad * logits), dbias + jnp.sum(grad)
        return carried, (drows, dscale, dbias)

    zero = varying(jnp.zeros((), rows.dtype), axes)
    (drows, dscale, dbias), _ = ring_pass(
        tile_fn,
        (jnp.zeros_like(rows), zero, zero),
        (visiting,),
        axes=axes,
        size=opts["ring_size"],
        chunk=opts["chunk"],
    )
    return drows, dscale, dbias


def _sigmoid_backward(img, txt, logit_scale, logit_bias, value, g, **opts):
    scale = jnp.exp(logit_scale)
    coef = g / opts["global_batch"]
    # The forward lap's `value` is not needed here, but depending on it keeps XLA from running
    # the forward and backward laps at once (holding both laps' travelling blocks).
    dimg, dscale, dbias = _sigmoid_grad_pass(img, after(txt, value), scale, logit_bias, coef, True, opts)
    img = after(img, dscale)
    dtxt, _, _ = _sigmoid_grad_pass(txt, img, scale, logit_bias, coef, False, opts)
    axes = opts["axes"]
    return dimg, dtxt, jax.lax.psum(dscale, axes), jax.lax.psum(dbias, axes)


# ---------------------------------------------------------------- public API


def _ring_options(img, mesh, batch_axes, chunk, precision):
    axes = tuple(batch_axes)
    ring_size = ring_size_of(mesh, axes)
    global_batch = img.shape[0]
    if global_batch % ring_size:
        raise ValueError(f"global batch {global_batch} does not split over {ring_size} devices")
    block = global_batch // ring_size
    chunk = default_chunk(block, img.shape[1]) if chunk is None else chunk
    if chunk < 1:
        raise ValueError(f"chunk={chunk}: columns per tile must be at least 1")
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
    (columns per tile; need not divide B / devices) defaults to `default_chunk`; `precision` of
    the logit matmuls, forward and backward (see `clipjax.losses.registry.PRECISIONS`).
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
        in_specs=(rows, rows, scalar, scalar, scalar, scalar),
        out_specs=(rows, rows, scalar, scalar),
    )

    @jax.custom_vjp
    def loss(img, txt, logit_scale, logit_bias):
        return forward(img, txt, logit_scale, logit_bias)

    def loss_fwd(img, txt, logit_scale, logit_bias):
        value = forward(img, txt, logit_scale, logit_bias)
        return value, (img, txt, logit_scale, logit_bias, value)

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
