"""Input pipeline: serialized records -> grain -> host batches of numpy arrays.

Which records is the data source's business (`clipjax.data.sources`); this module turns a
random-access record source (`len()`, `__getitems__`) into resumable per-process batches.

Train batches are dicts with exactly these keys (b = batch_size // process_count):
  image   uint8 [b, S, S, 3]   not normalised
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
  .map(ChunkDecoder)               one batched ArrayRecord read, parse, decode
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
(a collective) and set_state() gives each process its own. Random crops (`data.random_resized_crop`) are drawn
from a generator seeded by (seed, shuffle_seed, epoch, record id): the same example gets the same
crop whatever the batch size, the process count, the number of workers or a resumption, and
another crop every epoch.
"""

from __future__ import annotations

import collections
import copy
import functools
import os
from typing import Any, Callable, Sequence

from absl import flags, logging
import grain
import numpy as np
from PIL import Image

from clipjax.captions import decode_caption
from clipjax.data import records, workers as worker_pool
from clipjax.data.drops import BadDataError, DropCounter
from clipjax.data.process_state import TrainIterator, process_gather
from clipjax.data.images import check_crop_scale, decode_image, random_resized_crop_box, square_rgb

BATCH_KEYS = ("image", "text", "text_id", "index", "label")
PROCESS_STATES_FORMAT = "clipjax.chunk_positions/1"


class ChunkDecoder:
    """Reads and decodes the records at a batch of indices; drops bad ones.

    Called with an array of record ids, or with {'index': ids, 'epoch': epochs} (what
    `IndexChunks(with_epochs=True)` gives), which random crops need for their seeds. Returns the
    valid examples as arrays plus '_skipped', a {reason: count} dict that the main process folds
    into the drop counters. A module-level class rather than a closure so grain worker processes
    can unpickle it.

    Images are centre-cropped unless `with_random_crop` made a training copy: evaluation never
    crops at random.
    """

    random_crop: tuple[float, float] | None = None  # the share of the area a crop covers
    crop_seed: tuple[int, ...] = ()

    def __init__(
        self,
        source,
        image_size: int,
        encoded_images: bool,
        tokenizer=None,
        extra_int_fields: Sequence[str] = (),
        keep_captions: bool = False,
    ):
        self.source = source
        self.image_size = int(image_size)
        self.encoded_images = encoded_images
        self.tokenizer = tokenizer
        self.extra_int_fields = tuple(extra_int_fields)
        self.keep_captions = keep_captions

    def with_random_crop(self, scale: Sequence[float], seed: Sequence[int]) -> ChunkDecoder:
        """A copy that crops a random region covering a share `scale` = (low, high) of the area
        (`clipjax.data.images.random_resized_crop_box`), seeded per (seed, epoch, record id)."""
        problem = check_crop_scale(tuple(scale)) or (None if len(scale) else "expected (low, high)")
        if problem:
            raise ValueError(f"random crop scale: {problem}, got {tuple(scale)}")
        low, high = (float(v) for v in scale)
        decoder = copy.copy(self)
        decoder.random_crop = (low, high)
        decoder.crop_seed = tuple(int(v) for v in seed)
        return decoder

    def _crop(self, record: int, epoch: int | None):
        """None (centre crop), or the crop function of one example in one epoch."""
        if self.random_crop is None:
            return None
        if epoch is None:
            raise ValueError("a random-cropping ChunkDecoder needs each record's epoch ({'index', 'epoch'})")
        # The trailing 1 keeps this stream apart from the epoch permutation's ([*seed, epoch]).
        rng = np.random.default_rng([*self.crop_seed, int(epoch), int(record), 1])
        return functools.partial(random_resized_crop_box, rng=rng, scale=self.random_crop)

    def _image(self, data: bytes | None, crop=None) -> tuple[np.ndarray | None, str]:
        s = self.image_size
        if not data:
            return None, "missing_image"
        if not self.encoded_images:
            if len(data) != s * s * 3:
                return None, "bad_image_shape"
            image = np.frombuffer(data, np.uint8).reshape(s, s, 3)
            if crop is not None:
                image = square_rgb(Image.fromarray(image), s, box=crop(s, s))
            return image, ""
        try:
            image = decode_image(data, s, crop=crop)
        except Exception:  # pylint: disable=broad-except
            # PIL raises many exception types for corrupt or truncated files
            # (OSError, SyntaxError, ValueError, DecompressionBombError, ...).
            return None, "bad_image"
        if image.shape != (s, s, 3):
            return None, "bad_image_shape"
        return image, ""

    def __call__(self, indices) -> dict[str, Any]:
        epochs = None
        if isinstance(indices, dict):
            indices, epochs = indices["index"], np.asarray(indices["epoch"]).reshape(-1)
        ids = [int(i) for i in np.asarray(indices).reshape(-1)]
        raw = self.source.__getitems__(ids)
        ints = ("text_id", "index", "label") + self.extra_int_fields
        fields = records.parse(raw, ints, ("image", "caption"))
        skipped: collections.Counter = collections.Counter()
        examples: list[tuple[int, str]] = []  # a few (record, reason), for error messages
        keep, images, captions = [], [], []
        for j in range(len(raw)):
            caption = decode_caption(fields["caption"][j])
            if caption is None:
                image, reason = None, "bad_caption"
            else:
                crop = self._crop(ids[j], None if epochs is None else epochs[j])
                image, reason = self._image(fields["image"][j], crop)
            if image is None:
                skipped[reason] += 1
                if len(examples) < DropCounter.EXAMPLES:
                    examples.append((ids[j], reason))
                continue
            keep.append(j)
            images.append(image)
            captions.append(caption)
        s = self.image_size
        out = {"image": np.stack(images) if images else np.zeros((0, s, s, 3), np.uint8)}
        if self.tokenizer is not None:
            out["text"] = self.tokenizer.encode(captions)
        for k in ints:
            out[k] = records.ints([fields[k][j] for j in keep])
        if self.keep_captions:
            out["caption"] = np.array(captions, dtype=object)
        out["_skipped"] = dict(skipped)
        out["_skipped_examples"] = examples
        return out


# The two steps below are no longer in this module's graph (`ChunkBatches` does both); sources that
# assemble their own grain graph use them.
def _non_empty(chunk: dict[str, Any]) -> bool:
    return len(chunk["index"]) > 0


def _batch_in_key_order(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # Rebatching rebuilds dicts with sorted keys; keep the documented order.
    return {k: batch[k] for k in BATCH_KEYS}


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
    """Exactly `batch_size` examples per batch (keys BATCH_KEYS) from decoded chunks of any size.

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
            parts.append({k: self._head[k][self._offset : self._offset + take] for k in BATCH_KEYS})
            needed -= take
            self._offset += take
            if self._offset == size:
                self._head, self._chunk, self._offset = None, self._chunk + 1, 0
        # Always copies: a chunk from a worker process lives in shared memory, which a batch the
        # trainer keeps (or an exception's frames) must not hold on to.
        return {k: np.concatenate([p[k] for p in parts]) for k in BATCH_KEYS}

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
    decoder: ChunkDecoder,
    data_config,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    start_example: int = 0,
    gather: Callable[[dict], list[dict]] | None = None,
) -> TrainIterator:
    """Endless, shuffled, per-process iterator over local train batches of `decoder.source`.

    The order depends on `seed` and on data_config.shuffle_seed; the stream starts at its
    `start_example`-th example (0 for a new run). Also read from the (complete)
    `data_config`: batch_size (global), worker_count (`worker_processes`), read_threads,
    prefetch (chunks buffered ahead), max_bad_fraction, random_resized_crop (() or a
    (low, high) share of the area: random crops, for this iterator only). A decoder with
    `needs_epochs = True` is called with {'index', 'epoch'} chunks, as a cropping one is.
    `gather(own_position) -> [position of each process]` makes get_state() hold every
    process's position; by default `process_gather(process_count)`.
    """
    batch_size = int(data_config.batch_size)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if batch_size % process_count:
        raise ValueError(f"data.batch_size {batch_size} is not divisible by process_count {process_count}")
    local_batch = batch_size // process_count
    num_records = len(decoder.source)
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
    chunks = IndexChunks(
        num_records,
        local_batch,
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

    max_bad = data_config.max_bad_fraction
    counter = DropCounter(
        None if max_bad is None else float(max_bad), min_seen=min(1000, max(num_records // process_count, 1))
    )
    batches = ChunkBatches(
        decoded_chunks,
        local_batch,
        counter,
        process_index=process_index,
        process_count=process_count,
        gather=gather if gather is not None else process_gather(process_count),
    )
    return TrainIterator(batches, counter)


def load_split_arrays(
    decoder: ChunkDecoder, max_examples: int | None = None, drops: DropCounter | None = None
) -> dict[str, np.ndarray]:
    """All records of `decoder.source` (or the first `max_examples`, if > 0) as numpy arrays.

    Keys: image uint8 [n,S,S,3], text int32 [n,L], text_id/index/label int32 [n], caption
    str [n] (with keep_captions), and the decoder's extra int fields. Undecodable records are
    left out and counted in `drops`.
    """
    n = len(decoder.source)
    if max_examples:  # None or 0: the whole split
        n = min(int(max_examples), n)
    counter = drops if drops is not None else DropCounter()
    chunks = [counter(decoder(np.arange(start, min(start + 1024, n)))) for start in range(0, n, 1024)]
    if not chunks:
        chunks = [counter(decoder(np.zeros(0, np.int64)))]
    out = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    if "caption" in out:
        out["caption"] = out["caption"].astype(str)
    return out
