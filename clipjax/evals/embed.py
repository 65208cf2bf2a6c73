"""Embeddings of an evaluation set, computed sharded over the mesh in fixed-size batches."""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from clipjax.parallel import batch_parallelism, batch_sharding


def embed_in_batches(
    encode: Callable[[jax.Array], jax.Array], inputs: np.ndarray, *, mesh, batch_size: int
) -> np.ndarray:
    """Run `encode` over `inputs` in batches sharded over the mesh's batch axes.

    The last batch is padded to full size so every call has the same shape (one compile), and
    each batch is split across devices, so no device ever holds the whole set.
    """
    parallel = batch_parallelism(mesh)
    batch_size = max(parallel, (batch_size // parallel) * parallel)
    sharding = batch_sharding(mesh)
    outputs = []
    for start in range(0, len(inputs), batch_size):
        chunk = inputs[start : start + batch_size]
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
        # Every process holds the same `inputs`; each device takes its rows of the chunk, and
        # the result is gathered to every process (it may span other hosts' devices).
        x = jax.make_array_from_callback(chunk.shape, sharding, lambda index, c=chunk: c[index])
        out = multihost_utils.process_allgather(encode(x), tiled=True)
        outputs.append(np.asarray(out)[:n])
    if not outputs:  # no inputs: no rows, but the width and dtype of an output, as for any batch
        out = jax.eval_shape(encode, jax.ShapeDtypeStruct((batch_size, *inputs.shape[1:]), inputs.dtype))
        return np.zeros((0, *out.shape[1:]), out.dtype)
    return np.concatenate(outputs)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    x = np.asarray(x)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
