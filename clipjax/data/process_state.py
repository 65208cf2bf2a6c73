"""Where each process stands in its data: the training iterator a source hands the trainer, and
the gathering of every JAX process's position into the one state a checkpoint saves.

Each process reads its own part of the data (its slice of each global batch, or its own tar
shards), and they drop different records, so their positions differ: `get_state()` gathers all
of them (a collective, which the checkpoint hook calls on every process at the same step) and
`set_state()` picks this process's.
"""

from __future__ import annotations

import json
from typing import Callable

import numpy as np

from clipjax.data.drops import DropCounter
from clipjax.data.workers import release_shared_memory


class TrainIterator:
    """The endless per-process batch iterator of a training run.

    `next()` gives the next local batch (keys BATCH_KEYS), `get_state()` / `set_state()` save
    and restore the position exactly (JSON-able state), `drop_counts` is {reason: records
    skipped so far}. Data sources hand one of these to the trainer.
    """

    def __init__(self, iterator, drops: DropCounter):
        self._iterator = iterator
        self._drops = drops

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterator)

    def get_state(self):
        return self._iterator.get_state()

    def set_state(self, state) -> None:
        self._iterator.set_state(state)

    @property
    def drop_counts(self) -> dict[str, int]:
        return dict(self._drops.counts)

    def close(self) -> None:
        """Stop worker processes, if any (they also stop when the iterator is collected), and
        hand back the shared memory of the batches they had prefetched."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()
            release_shared_memory()


def process_rows(total: int, index: int, count: int) -> range:
    """Process `index` of `count`'s contiguous share of `total` rows, as big_vision splits
    evaluation data: ceil(total / count) each, fewer or none for the last processes. Contiguous,
    so the shares put back in process order are the rows in their order."""
    length = -(-total // count)
    start = min(total, index * length)
    return range(start, min(total, start + length))


def local_batch(data_config, process_index: int, process_count: int) -> int:
    """This process's share of `data.batch_size`; ValueError where there is none."""
    batch_size = int(data_config.batch_size)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if batch_size % process_count:
        raise ValueError(f"data.batch_size {batch_size} is not divisible by process_count {process_count}")
    return batch_size // process_count


def jax_gather(own: dict) -> list[dict]:
    """Every JAX process's JSON-able `own`, in process order (a collective: all must call it)."""
    from jax.experimental import multihost_utils  # only runs with several JAX processes

    data = np.frombuffer(json.dumps(own).encode("utf-8"), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int32))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: len(data)] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[:size]).decode("utf-8")) for row, size in zip(rows, sizes)]


def process_gather(process_count: int) -> Callable[[dict], list[dict]] | None:
    """`jax_gather` when `process_count` is this run's number of JAX processes (> 1): each
    process reads its own part of the data, so a checkpoint must hold every process's position.
    None otherwise (one process, or several simulated in one process by tests and tools)."""
    if process_count <= 1:
        return None
    import jax

    return jax_gather if jax.process_count() == process_count else None
