"""One lap of a `ppermute` ring: every device meets every device's block, one tile at a time.

The ring losses (`clipjax.losses.blockwise`) and the embedding metrics (`clipjax.metrics.embedding`)
score each device's local rows against the columns of the whole global batch without ever holding
more than two column blocks. The pattern is the one ring attention uses:

- The visiting block (read-only inputs, e.g. the text embeddings) is sent on to the next device
  whole, at the start of each lap step. The send does not depend on that step's work, so the
  scheduler can run it while the current block is scored (double buffering: the block in use
  and the one in flight). That is one collective per lap step, not one per tile.
- The carried block (accumulators that belong to the visiting columns, e.g. the columns'
  running log-sum-exp or their gradient) is updated by the step's work and sent on after it.
  After the last step it arrives home, complete.
- Within a step the columns are taken `chunk` at a time, so the b x chunk products and whatever
  is derived from them stay small however large the block is. When `chunk` does not divide the
  block, the last tile is narrower: no padding and no masking.

In lap step t device k holds the block of device k - t (mod W), so the positives (global row
index equal to global column index) all lie in step 0, at local column == local row.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh


def ring_size(mesh: Mesh, axes: tuple[str, ...]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def varying(x, axes):
    """Mark a fresh constant as device-varying over `axes`: loop carries must have the same
    varying-axes type on entry and exit, and anything computed from a local block is varying."""
    return jax.lax.pcast(x, axes, to="varying")


def after(block, scalar):
    """`block`, as a value that exists only once `scalar` has been computed.

    Two ring laps that do not depend on each other (the two gradient passes of a loss, the
    forward and backward laps, the metric laps) would be started together by XLA, which then
    holds the travelling blocks of both: twice the memory. Making one lap's visiting block
    depend on a result of the other orders them, and the add fuses into the copy the loop makes
    of its initial block anyway. (An optimization_barrier did not: it was gone from XLA's
    compiled CPU program.) XLA keeps 0 * x, which is not 0 for x = inf or nan.
    """
    return block + (0.0 * scalar).astype(block.dtype)


def tile_bounds(block: int, chunk: int) -> tuple[int, int]:
    """(full tiles, width of the narrower last tile or 0) for `block` columns in tiles of `chunk`."""
    return block // chunk, block % chunk


def _score_block(tile_fn, acc, visiting, carried, first, chunk):
    """Every tile of one visiting block; `first` (a traced bool) marks lap step 0."""
    block = visiting[0].shape[0]
    full, rest = tile_bounds(block, chunk)

    def one_tile(start, width, acc, carried):
        tile = tuple(jax.lax.dynamic_slice_in_dim(a, start, width) for a in visiting)
        carried_tile = tuple(jax.lax.dynamic_slice_in_dim(a, start, width) for a in carried)
        rows = jax.lax.broadcasted_iota(jnp.int32, (block, width), 0)
        cols = jax.lax.broadcasted_iota(jnp.int32, (block, width), 1)
        positive = (rows == cols + start) & first
        carried_tile, acc = tile_fn(tile, carried_tile, acc, positive)
        carried = tuple(
            jax.lax.dynamic_update_slice_in_dim(a, x, start, 0) for a, x in zip(carried, carried_tile)
        )
        return acc, carried

    if full == 1:
        acc, carried = one_tile(0, chunk, acc, carried)
    elif full > 1:
        acc, carried = jax.lax.fori_loop(
            0, full, lambda i, state: one_tile(i * chunk, chunk, *state), (acc, carried)
        )
    if rest:
        acc, carried = one_tile(full * chunk, rest, acc, carried)
    return acc, carried


def ring_pass(
    tile_fn: Callable,
    acc,
    visiting: tuple,
    carried: tuple = (),
    *,
    axes: tuple[str, ...],
    size: int,
    chunk: int,
):
    """One lap: returns (acc, carried), the carried block back with its owner.

    Inside a `shard_map` over `axes` (`size` devices). `visiting` and `carried` are tuples of
    arrays whose leading dimension is the local block size b. `tile_fn(tile, carried_tile, acc,
    positive) -> (carried_tile, acc)` sees up to `chunk` rows of each (the visiting columns) and
    `positive`, the b x width mask of (local row, visiting column) pairs with the same global
    index. `acc` stays on the device: whatever it accumulates is about the local rows.

    `tile_fn` should not apply elementwise ops to the tile's arrays before a product where it can
    apply them to the product instead (scale the logits, not the embeddings): XLA fuses the slice
    into such an op and may copy the whole block to do it.
    """
    perm = [(j, (j + 1) % size) for j in range(size)]
    send = lambda arrays: tuple(jax.lax.ppermute(x, axes, perm) for x in arrays)

    def step(t, state):
        acc, visiting, carried = state
        incoming = send(visiting)  # in flight while this block is scored
        acc, carried = _score_block(tile_fn, acc, visiting, carried, t == 0, chunk)
        return acc, incoming, send(carried)

    if size == 1:
        return _score_block(tile_fn, acc, visiting, carried, jnp.bool_(True), chunk)
    acc, visiting, carried = jax.lax.fori_loop(0, size - 1, step, (acc, visiting, carried))
    # The last step scores the last visitor and sends nothing on but the accumulators.
    acc, carried = _score_block(tile_fn, acc, visiting, carried, jnp.bool_(False), chunk)
    return acc, send(carried)
