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
  MapDataset.source(IndexChunks)   chunk k = the k-th run of b record ids of
                                   this process's shard, in an order reshuffled
                                   every epoch (vectorised: grain's per-element
                                   shuffle costs ~3 ms per 256 ids)
  .map(ChunkDecoder)               one batched ArrayRecord read, parse, decode,
                                   tokenize; bad records are dropped here
                                   (per-record reads plus tfds' generic decoder
                                   would cost ~100 us per record)
  .to_iter_dataset(prefetch threads)
  [.mp_prefetch(worker_count)]     decoding in worker processes if asked
  .map(DropCounter)                drop counts folded in, in the main process
                                   (read back as TrainIterator.drop_counts)
  .filter(non-empty)
  RebatchIterDataset(b)            exactly b examples per batch after drops
  .map(key order)

The TrainIterator's get_state()/set_state() resume at exactly the next batch.
"""

from __future__ import annotations

import collections
from typing import Any, Sequence

from absl import flags
import grain
import numpy as np

from clipjax.data import records
from clipjax.data.images import decode_image

BATCH_KEYS = ("image", "text", "text_id", "index", "label")


def decode_caption(caption: bytes | None) -> str | None:
    """UTF-8 caption bytes -> stripped text; None when missing, empty or not UTF-8."""
    if caption is None:
        return None
    try:
        text = caption.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    return text or None


class ChunkDecoder:
    """Reads and decodes the records at a batch of indices; drops bad ones.

    Returns the valid examples as arrays plus '_skipped', a {reason: count}
    dict that the main process folds into the drop counters. A module-level
    class rather than a closure so grain worker processes can unpickle it.
    """

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

    def _image(self, data: bytes | None) -> tuple[np.ndarray | None, str]:
        s = self.image_size
        if not data:
            return None, "missing_image"
        if not self.encoded_images:
            if len(data) != s * s * 3:
                return None, "bad_image_shape"
            return np.frombuffer(data, np.uint8).reshape(s, s, 3), ""
        try:
            image = decode_image(data, s)
        except Exception:  # pylint: disable=broad-except
            # PIL raises many exception types for corrupt or truncated files
            # (OSError, SyntaxError, ValueError, DecompressionBombError, ...).
            return None, "bad_image"
        if image.shape != (s, s, 3):
            return None, "bad_image_shape"
        return image, ""

    def __call__(self, indices) -> dict[str, Any]:
        ids = [int(i) for i in np.asarray(indices).reshape(-1)]
        raw = self.source.__getitems__(ids)
        ints = ("text_id", "index", "label") + self.extra_int_fields
        fields = records.parse(raw, ints, ("image", "caption"))
        skipped: collections.Counter = collections.Counter()
        examples: list[tuple[int, str]] = []  # a few (record, reason), for error messages
        keep, images, captions = [], [], []
        for j in range(len(raw)):
            caption = decode_caption(fields["caption"][j])
            image, reason = (None, "bad_caption") if caption is None else self._image(fields["image"][j])
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


class DropCounter:
    """Folds each chunk's '_skipped' counts into `counts`.

    With `max_bad_fraction` set, raises once at least `min_seen` records have gone by and more
    than that fraction of them, and more than `MIN_ALLOWED` records, could not be decoded: a
    data set that is mostly broken should stop training, not quietly shrink it, while a small
    folder with a few bad files should not. The error says how many, why, and which records.
    """

    MIN_ALLOWED = 20
    EXAMPLES = 5

    def __init__(self, max_bad_fraction: float | None = None, min_seen: int = 1000):
        self.counts: collections.Counter = collections.Counter()
        self.examples: list[tuple[int, str]] = []
        self.kept = 0
        self.max_bad_fraction = max_bad_fraction
        self.min_seen = min_seen

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __call__(self, chunk: dict[str, Any]) -> dict[str, Any]:
        chunk = dict(chunk)
        skipped = chunk.pop("_skipped")
        self.examples.extend(chunk.pop("_skipped_examples", [])[: self.EXAMPLES - len(self.examples)])
        self.counts.update(skipped)
        self.kept += len(chunk["index"])
        seen = self.kept + self.total
        if (
            self.max_bad_fraction is not None
            and seen >= self.min_seen
            and self.total > max(self.max_bad_fraction * seen, self.MIN_ALLOWED)
        ):
            which = ", ".join(f"record {i} ({reason})" for i, reason in self.examples)
            raise BadDataError(
                f"{self.total} of {seen} records could not be decoded ({dict(self.counts)}), more than "
                f"data.max_bad_fraction={self.max_bad_fraction} of them; first: {which}"
            )
        return chunk


class BadDataError(ValueError):
    """Too much of the data cannot be decoded; the message is one line."""


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
    ):
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

    def __getitem__(self, k: int) -> np.ndarray:
        start = int(k) * self.global_size + self.offset
        positions = np.arange(start, start + self.chunk_size)
        epochs, offsets = np.divmod(positions, self.num_records)
        out = np.empty(self.chunk_size, dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._epoch_order(int(e))[offsets[sel]]
        return out


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
        """Stop worker processes, if any (they also stop when the iterator is collected)."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


def make_train_iterator(
    decoder: ChunkDecoder,
    data_config,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    start_example: int = 0,
) -> TrainIterator:
    """Endless, shuffled, per-process iterator over local train batches of `decoder.source`.

    The order depends on `seed` and on data_config.shuffle_seed; the stream starts at its
    `start_example`-th example (0 for a new run). Also read from the (complete)
    `data_config`: batch_size (global), worker_count (0: decode in this process's prefetch
    threads), read_threads, prefetch (chunks buffered ahead), max_bad_fraction.
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
    chunks = IndexChunks(
        num_records,
        local_batch,
        seed=(int(seed) % 2**32, int(data_config.shuffle_seed)),
        process_index=process_index,
        process_count=process_count,
        start_example=start_example,
    )
    ds = grain.MapDataset.source(chunks).map(decoder)
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(
            num_threads=int(data_config.read_threads), prefetch_buffer_size=int(data_config.prefetch)
        )
    )
    if data_config.worker_count > 0:
        # grain's worker processes read absl flags; outside an absl app they are
        # unparsed and reading them raises, so fall back to their defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(data_config.worker_count)))
    max_bad = data_config.max_bad_fraction
    counter = DropCounter(
        None if max_bad is None else float(max_bad), min_seen=min(1000, max(num_records // process_count, 1))
    )
    it_ds = it_ds.map(counter).filter(_non_empty)
    it_ds = grain.experimental.RebatchIterDataset(it_ds, batch_size=local_batch, drop_remainder=True)
    it_ds = it_ds.map(_batch_in_key_order)
    return TrainIterator(iter(it_ds), counter)


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
