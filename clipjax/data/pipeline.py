"""Input pipeline: serialized records -> grain -> host batches of numpy arrays.

Which records is the data source's business (`clipjax.data.sources`); this module turns a
decoder over random-access records (`clipjax.data.decode.Decoder`, whose reader has `len()`)
into resumable per-process batches.

Train batches are dicts with exactly these keys (b = batch_size // process_count):
  image   uint8 [b, S, S, 3]   not normalised (a NaFlex model: [b, L, p * p * 3] patches
                               and image_grid int32 [b, 2], clipjax.data.naflex)
  text    int32 [b, L]         token ids, pad 0
  text_id int32 [b]            stable hash of the normalised caption
  index   int32 [b]            position of the example in its split
  label   int32 [b]            concept id for shapes, -1 for folder data

Layout of the grain graph, and why:
  MapDataset.source(IndexChunks)[k:]
                                   chunk k = the k-th run of b record ids of
                                   this process's shard, in an order reshuffled
                                   every epoch (vectorised: grain's per-element
                                   shuffle costs ~3 ms per 256 ids), with each
                                   id's epoch when the decoder crops at random
  .map(Decoder)                    one batched ArrayRecord read, parse, decode
                                   (`clipjax.data.images`), tokenize; bad records
                                   are dropped here (per-record reads plus tfds'
                                   generic decoder would cost ~100 us per record)
  .to_iter_dataset(prefetch threads)
  [.mp_prefetch(workers)]          the two steps above in worker processes, one
                                   per core by default (`data.worker_count`);
                                   grain hands the arrays back in shared memory
  ChunkBatches(b)                  in the main process: drop counts folded in
                                   (DropCounter, read back as
                                   TrainIterator.drop_counts), then exactly b
                                   examples per batch after drops, keys in order

The TrainIterator's get_state()/set_state() resume at exactly the next batch. The state is
ChunkBatches' position in the stream of chunks ({'chunk': k, 'offset': j}), not grain's, so it
does not depend on the number of worker processes: a run resumes on a host with other cores
(the graph is rebuilt from chunk k). It also holds the drop counts up to that position (without
chunk k's, which a restored run decodes and counts again), so a resumed run's totals are the
uninterrupted run's. With several JAX processes each has its own position (they
drop different records, so one may be a chunk ahead of another): get_state() gathers all of them
(a collective) and set_state() gives each process its own. Random crops
(`data.random_resized_crop`) are seeded by (seed, shuffle_seed, epoch, record id)
(`clipjax.data.decode`).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Sequence

from absl import flags, logging
import grain
import numpy as np

from clipjax.data import workers as worker_pool
from clipjax.data.decode import Decoder, batch_keys
from clipjax.data.drops import BadDataError, DropCounter
from clipjax.data.naflex import NaflexInputs, OneLengthBatches
from clipjax.data.process_state import TrainIterator, local_batch, process_gather

PROCESS_STATES_FORMAT = "clipjax.chunk_positions/1"


class IndexChunks:
    """Random-access source of record-id chunks for one process.

    All processes walk the same endless stream: every epoch a fresh seeded
    permutation of the whole split. Global batch k is positions [k*B, (k+1)*B)
    of that stream and process p takes its slice [k*B + p*b, k*B + (p+1)*b).
    So the processes read disjoint records at every step, and the global batch
    at each step is the same whatever the number of processes: a run on 2 hosts
    sees exactly the batches a run on 1 host sees. Chunks run across epoch
    boundaries, so no example is ever skipped.

    With `with_epochs` a chunk is {'index': record ids, 'epoch': the epoch of each}.
    """

    # Effectively endless: ~1e18 examples.
    _NUM_CHUNKS = 2**60

    def __init__(
        self,
        num_records: int,
        chunk_size: int,
        seed: int | Sequence[int],
        process_index: int = 0,
        process_count: int = 1,
        start_example: int = 0,
        with_epochs: bool = False,
    ):
        self.with_epochs = with_epochs
        self.num_records = int(num_records)
        self.chunk_size = int(chunk_size)
        self.global_size = self.chunk_size * int(process_count)
        # `start_example` shifts the whole stream: a run resumed with another global batch size
        # continues from the number of examples it had seen.
        self.offset = self.chunk_size * int(process_index) + int(start_example)
        self.seed = [int(seed)] if np.isscalar(seed) else [int(s) for s in seed]
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self._NUM_CHUNKS // self.global_size

    def _epoch_order(self, epoch: int) -> np.ndarray:
        order = self._cache.get(epoch)
        if order is None:
            rng = np.random.default_rng([*self.seed, epoch])
            order = rng.permutation(self.num_records)
            # Only the current and the next epoch are ever in use (prefetch threads).
            self._cache = {e: o for e, o in self._cache.items() if e >= epoch - 1}
            self._cache[epoch] = order
        return order

    def __getitem__(self, k: int) -> np.ndarray | dict[str, np.ndarray]:
        start = int(k) * self.global_size + self.offset
        positions = np.arange(start, start + self.chunk_size)
        epochs, offsets = np.divmod(positions, self.num_records)
        out = np.empty(self.chunk_size, dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._epoch_order(int(e))[offsets[sel]]
        return {"index": out, "epoch": epochs} if self.with_epochs else out


class ChunkBatches:
    """Exactly `batch_size` examples per batch (keys `decode.batch_keys`) from decoded chunks of any size.

    `decoded_chunks(k)` iterates over the decoded chunks k, k + 1, ... of the stream (after drops
    a chunk may hold fewer examples, or none). The position is {'chunk': the first chunk not yet
    given out in full, 'offset': how many of its examples were}: plain numbers, so a run resumes
    exactly whether the chunks were decoded in threads or in any number of worker processes.
    Each chunk's drops are folded into `counter` in this process.
    """

    def __init__(
        self,
        decoded_chunks,
        batch_size: int,
        counter: DropCounter,
        *,
        process_index: int = 0,
        process_count: int = 1,
        gather: Callable[[dict], list[dict]] | None = None,
    ):
        self._decoded_chunks = decoded_chunks
        self._batch_size = int(batch_size)
        self._counter = counter
        self._process_index, self._process_count = int(process_index), int(process_count)
        self._gather = gather
        self._chunk, self._offset = 0, 0
        self._iterator = None
        self._head = None  # the decoded chunk `self._chunk`, once read
        # The drop counts before the head was counted: a restored run decodes (and counts) the
        # head chunk again, so a saved state holds these.
        self._counted_before_head = counter.state()

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._iterator = self._decoded_chunks(self._chunk)
        parts, needed = [], self._batch_size
        while needed:
            if self._head is None:
                self._counted_before_head = self._counter.state()
                try:
                    self._head = self._count(next(self._iterator))
                except BadDataError:
                    parts.clear()  # views of shared memory, else kept alive by the traceback
                    raise
            size = len(self._head["index"])
            if size == 0:
                # Every record of the chunk was dropped. The offset stays: it counts examples of
                # the next chunk that has any (so grain's states of earlier versions read alike).
                self._head, self._chunk = None, self._chunk + 1
                continue
            take = min(needed, size - self._offset)
            parts.append(
                {k: self._head[k][self._offset : self._offset + take] for k in batch_keys(self._head)}
            )
            needed -= take
            self._offset += take
            if self._offset == size:
                self._head, self._chunk, self._offset = None, self._chunk + 1, 0
        # Always copies: a chunk from a worker process lives in shared memory, which a batch the
        # trainer keeps (or an exception's frames) must not hold on to.
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _count(self, chunk: dict[str, Any]) -> dict[str, Any]:
        try:
            return self._counter(chunk)
        except BadDataError as e:
            error = e
        # Too much bad data ends the run. Worker processes hand chunks over in shared memory:
        # let go of them (this chunk, the error's frames, the prefetched ones) first, or Python
        # warns of leaked shared memory at exit.
        del chunk
        self.close()
        raise error.with_traceback(None)

    def get_state(self) -> dict:
        """{'chunk', 'offset'} of this process; with `gather` (several JAX processes), every
        process's under 'processes' (a collective: all processes call it at the same step)."""
        drops = self._counted_before_head if self._head is not None else self._counter.state()
        own = {"chunk": self._chunk, "offset": self._offset, "drops": drops}
        if self._gather is None:
            return own
        states = self._gather(own)
        return {
            "format": PROCESS_STATES_FORMAT,
            "process_count": len(states),
            "processes": {str(p): state for p, state in enumerate(states)},
        }

    def set_state(self, state: dict) -> None:
        """Continue from `state`: this class's (one process's, or every process's), or grain's
        rebatching state of earlier versions ({'parent': the chunk iterator's state,
        'batch_idx': examples of it given out})."""
        if state.get("format") == PROCESS_STATES_FORMAT:
            processes = state["processes"]
            own = processes.get(str(self._process_index))
            if own is None or int(state["process_count"]) != self._process_count:
                # Chunk k is global batch k whatever the number of processes, but the offsets
                # into it are per process: restart the earliest unfinished global batch.
                chunk = min(int(s["chunk"]) for s in processes.values())
                logging.warning(
                    "data state of %s processes restored in %s: continuing at global batch %s, "
                    "which some processes had partly read",
                    state["process_count"],
                    self._process_count,
                    chunk,
                )
                # Each process's drop counts stay its own (a fresh process's start at 0).
                own = {"chunk": chunk, "offset": 0, "drops": (own or {}).get("drops")}
            state = own
        self._counter.restore(state.get("drops"))
        if "chunk" in state:
            chunk, offset = int(state["chunk"]), int(state["offset"])
        else:
            parent = state["parent"]
            if "next_index" in parent:  # chunks decoded in threads
                chunk = int(parent["next_index"])
            else:  # worker processes: each worker's count of the chunks it handed over
                chunk = sum(int(w["next_index"]) for w in parent["iterators_in_use_states"])
            offset = int(state["batch_idx"])
        self.close()
        self._chunk, self._offset, self._head = chunk, offset, None
        self._counted_before_head = self._counter.state()

    def close(self) -> None:
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()
        self._iterator = self._head = None


def make_train_iterator(
    decoder: Decoder,
    data_config,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    start_example: int = 0,
    gather: Callable[[dict], list[dict]] | None = None,
    naflex: NaflexInputs | None = None,
) -> TrainIterator:
    """Endless, shuffled, per-process iterator over local train batches of `decoder.reader`'s records.

    The order depends on `seed` and on data_config.shuffle_seed; the stream starts at its
    `start_example`-th example (0 for a new run). Also read from the (complete)
    `data_config`: batch_size (global), worker_count (`worker_processes`), read_threads,
    prefetch (chunks buffered ahead), max_bad_fraction, random_resized_crop (() or a
    (low, high) share of the area: random crops, for this iterator only). A decoder with
    `needs_epochs = True` is called with {'index', 'epoch'} chunks, as a cropping one is.
    `gather(own_position) -> [position of each process]` makes get_state() hold every
    process's position; by default `process_gather(process_count)`. `naflex`: a NaFlex model's
    patch batches, one sequence length each (clipjax.data.naflex).
    """
    local = local_batch(data_config, process_index, process_count)
    num_records = len(decoder.reader)
    if num_records <= process_index:
        raise ValueError(
            f"process {process_index} of {process_count} gets no records (train split has {num_records})"
        )
    stream_seed = (int(seed) % 2**32, int(data_config.shuffle_seed))
    crop_scale = tuple(getattr(data_config, "random_resized_crop", ()) or ())
    if crop_scale:
        if not hasattr(decoder, "with_random_crop"):
            raise ValueError(
                f"data.random_resized_crop: the decoder of data.name={data_config.name!r} "
                f"({type(decoder).__name__}) cannot crop at random"
            )
        decoder = decoder.with_random_crop(crop_scale, stream_seed)
    if naflex is not None:
        decoder = decoder.with_naflex(naflex)
    chunks = IndexChunks(
        num_records,
        local,
        seed=stream_seed,
        process_index=process_index,
        process_count=process_count,
        start_example=start_example,
        with_epochs=bool(crop_scale) or bool(getattr(decoder, "needs_epochs", False)),
    )
    workers = worker_pool.worker_processes(int(data_config.worker_count), decoder)
    threads, prefetch = int(data_config.read_threads), int(data_config.prefetch)
    if workers > 0:
        # grain's worker processes read absl flags; outside an absl app they are
        # unparsed and reading them raises, so fall back to their defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        # Each worker decodes ahead on its own: split `prefetch` among them, or dozens of
        # workers would hold dozens of batches each.
        prefetch = -(-prefetch // workers)

    def decoded_chunks(first: int):
        """The decoded chunks first, first + 1, ... (worker processes start on the first next())."""
        ds = grain.MapDataset.source(chunks)[first:].map(decoder)
        it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch))
        if workers > 0:
            it_ds = it_ds.mp_prefetch(
                grain.MultiprocessingOptions(num_workers=workers),
                # Workers end with this process, even when it is killed.
                worker_init_fn=functools.partial(worker_pool.init_worker, os.getpid()),
            )
        return iter(it_ds)

    counter = DropCounter.for_training(data_config, num_records // process_count)
    batches = ChunkBatches(
        decoded_chunks,
        local,
        counter,
        process_index=process_index,
        process_count=process_count,
        gather=gather if gather is not None else process_gather(process_count),
    )
    return TrainIterator(batches if naflex is None else OneLengthBatches(batches, naflex), counter)
