"""Embeddings of an evaluation set, each process encoding only its own share, and the collectives
that combine what evaluators report.

The inputs are split across processes as big_vision splits evaluation data: process p of P takes
the p-th contiguous slice of the N inputs (ceil(N / P) rows, fewer or none for the last ones,
`process_share`) and pads it to that common length, so every process makes the same number of
encoder calls (each call is one program over the whole mesh, a collective). Padded rows are
dropped as soon as they are embedded, so they never count. Only what an evaluator reports is
combined: counts summed (`sum_over_processes`), or rows gathered in order where a metric needs
them whole (`gather_rows`). On one process the share is everything and nothing is combined.
"""

from __future__ import annotations

import collections
from typing import Callable, NamedTuple

import jax
import numpy as np
from jax.experimental import multihost_utils

from clipjax.data.process_state import jax_gather, process_rows
from clipjax.parallel import batch_parallelism, batch_sharding


class Share(NamedTuple):
    """This process's contiguous slice of some rows, and the longest slice any process has."""

    rows: slice
    length: int


def process_share(total: int) -> Share:
    rows = process_rows(total, jax.process_index(), jax.process_count())
    return Share(slice(rows.start, rows.stop), -(-total // jax.process_count()))


def local_batch_size(mesh, batch_size: int) -> int:
    """Rows each process gives one encoder call: the global batch (a multiple of the mesh's batch
    parallelism, at least one row per device) split evenly across processes, as training splits it."""
    parallel = batch_parallelism(mesh)
    return max(parallel, (batch_size // parallel) * parallel) // jax.process_count()


def _padded(rows: np.ndarray, size: int) -> np.ndarray:
    if len(rows) == size:
        return rows
    fill = rows[-1:] if len(rows) else np.zeros((1, *rows.shape[1:]), rows.dtype)
    return np.concatenate([rows, np.repeat(fill, size - len(rows), axis=0)])


def _local_rows(out: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded array, in order (replicas hold the same rows once)."""
    shards = {shard.index[0].start or 0: shard.data for shard in out.addressable_shards}
    return np.concatenate([np.asarray(shards[start]) for start in sorted(shards)])


def embed_local(
    encode: Callable[..., jax.Array],
    local: np.ndarray | tuple[np.ndarray, ...],
    *,
    length: int,
    mesh,
    batch_size: int,
) -> np.ndarray:
    """`encode` of this process's `local` rows (at most `length`, which every process passes alike).

    Each call takes `local_batch_size` rows of every process, this one's padded (one compile, and
    the same number of calls everywhere); each device embeds its part, and only this process's
    rows come back. `local` may be a tuple of arrays with rows alike (images and their captions,
    say): `encode` then takes one global array of each."""
    local_batch = local_batch_size(mesh, batch_size)
    sharding = batch_sharding(mesh)
    parts = local if isinstance(local, tuple) else (local,)
    outputs = []
    for start in range(0, length, local_batch):
        chunks = [part[start : start + local_batch] for part in parts]
        xs = [
            jax.make_array_from_process_local_data(
                sharding, rows, (local_batch * jax.process_count(), *rows.shape[1:])
            )
            for rows in (_padded(chunk, local_batch) for chunk in chunks)
        ]
        outputs.append(_local_rows(encode(*xs))[: len(chunks[0])])
    if not outputs:  # no inputs: no rows, but the width and dtype of an output, as for any batch
        shapes = [jax.ShapeDtypeStruct((local_batch, *part.shape[1:]), part.dtype) for part in parts]
        out = jax.eval_shape(encode, *shapes)
        return np.zeros((0, *out.shape[1:]), out.dtype)
    return np.concatenate(outputs)


def _gather_parts(local: np.ndarray) -> list[np.ndarray]:
    """Every process's `local` rows, one array per process (each may have a different number)."""
    counts = multihost_utils.process_allgather(np.int32(len(local)))
    if not counts.any():
        return [local] * len(counts)
    everything = multihost_utils.process_allgather(_padded(local, int(counts.max())))
    return [part[:count].astype(local.dtype) for part, count in zip(everything, counts)]


def gather_rows(local: np.ndarray) -> np.ndarray:
    """Every process's rows, in process order (each may have a different number)."""
    local = np.asarray(local)
    return local if jax.process_count() == 1 else np.concatenate(_gather_parts(local))


def sum_over_processes(counts: np.ndarray) -> np.ndarray:
    """Integer `counts` (one shape in every process) summed over processes."""
    counts = np.asarray(counts)
    if jax.process_count() == 1:
        return counts
    return multihost_utils.process_allgather(counts).sum(axis=0).astype(counts.dtype)


def gather_objects(own) -> list:
    """Every process's JSON-able `own` (hashes, captions, counts), in process order."""
    return [own] if jax.process_count() == 1 else jax_gather(own)


def sum_counters(counts: dict[str, int]) -> dict[str, int]:
    """{reason: count} summed over processes (each may name other reasons)."""
    total: collections.Counter = collections.Counter()
    for part in gather_objects(dict(counts)):
        total.update(part)
    return dict(total)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    x = np.asarray(x)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
