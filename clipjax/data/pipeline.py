"""Input pipeline: tfds ArrayRecord files -> grain -> host batches of numpy arrays.

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
  .filter(non-empty)
  RebatchIterDataset(b)            exactly b examples per batch after drops
  .map(key order)

The iterator's get_state()/set_state() resume at exactly the next batch.
"""

from __future__ import annotations

import collections
import io
import os
from typing import Any, Sequence

from absl import flags
import grain
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from clipjax.data import folder_tfds
from clipjax.data.images import square_rgb
from clipjax.data import options
from clipjax.data import records
from clipjax.data import shapes
from clipjax.data import shapes_tfds
from clipjax.data import tokenizers

BATCH_KEYS = ("image", "text", "text_id", "index", "label")
SHAPES_ATTRIBUTE_KEYS = shapes.ATTRIBUTE_NAMES

# Records dropped by every pipeline of this process, by reason. Each train
# iterator also has its own `.drop_counts`.
DROPPED: collections.Counter = collections.Counter()


# ----------------------------------------------------------------------------
# Datasets.


def _data_dir(data_config) -> str:
    data_dir = options.get(data_config, "data_dir", "")
    if not data_dir:
        raise ValueError("data.data_dir is not set")
    return os.path.abspath(os.path.expanduser(data_dir))


def prepare(data_config) -> tfds.core.DatasetBuilder:
    """Prepares the dataset once (safe under concurrent processes); returns its builder."""
    return get_builder(data_config)


def get_builder(data_config) -> tfds.core.DatasetBuilder:
    """The prepared tfds builder for `data_config` (prepares it if needed)."""
    name = options.get(data_config, "name", "shapes")
    data_dir = _data_dir(data_config)
    if name == "shapes":
        return shapes_tfds.prepare_shapes(
            data_dir,
            image_size=int(options.get(data_config, "image_size", 32)),
            num_train=int(options.get(data_config, "num_train", 50_000)),
            num_test=int(options.get(data_config, "num_test", 5_000)),
            seed=int(options.get(data_config, "shapes_seed", 0)),
        )
    if name == "image_text_folder":
        return folder_tfds.prepare_folder(
            data_dir,
            options.get(data_config, "source", ""),
            test_fraction=float(options.get(data_config, "test_fraction", 0.0)),
        )
    raise ValueError(f"data.name must be 'shapes' or 'image_text_folder', got {name!r}")


def _raw_source(builder: tfds.core.DatasetBuilder, split: str):
    available = list(builder.info.splits.keys())
    base = split.split("[")[0]
    if base not in available:
        hint = (
            " (set data.test_fraction > 0 to hold out a test split)"
            if builder.name == "image_text_folder"
            else ""
        )
        raise ValueError(f"dataset {builder.name} has no split {base!r}; available: {available}{hint}")
    return builder.as_data_source(split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)


def zero_shot_tasks(data_config) -> dict[str, tuple[list[str], list[str]]]:
    """{attribute: (class names, prompt templates)}; {} for folder data."""
    if options.get(data_config, "name", "shapes") == "shapes":
        return shapes.zero_shot_tasks()
    return {}


def dataset_texts(data_config, include_prompts: bool = True) -> list[str]:
    """Training captions (valid ones, in split order), plus zero-shot prompts.

    Meant for training the tokenizer, so the prompts' words are in its vocabulary.
    """
    source = _raw_source(get_builder(data_config), "train")
    texts = []
    step = 4096
    for start in range(0, len(source), step):
        raw = source.__getitems__(list(range(start, min(start + step, len(source)))))
        for caption in records.parse(raw, (), ("caption",))["caption"]:
            text = _decode_caption(caption)
            if text is not None:
                texts.append(text)
    if include_prompts:
        for classes, templates in zero_shot_tasks(data_config).values():
            texts.extend(t.format(c) for c in classes for t in templates)
    return texts


def make_dataset_tokenizer(data_config, cache_dir: str | None = None):
    """`tokenizers.make_tokenizer` for `data_config.tokenizer`, trained on this
    dataset's texts when it needs training (cached under data_dir/tokenizers)."""
    tok_config = options.get(data_config, "tokenizer", None)
    texts = None
    needs_texts = options.get(tok_config, "kind", "byte") == "sentencepiece" and not options.get(
        tok_config, "model_file", ""
    )
    if needs_texts:
        texts = dataset_texts(data_config)
    return tokenizers.make_tokenizer(
        tok_config,
        texts_for_training=texts,
        cache_dir=cache_dir or os.path.join(_data_dir(data_config), "tokenizers"),
    )


# ----------------------------------------------------------------------------
# Decoding.


def _decode_caption(caption: bytes | None) -> str | None:
    if caption is None:
        return None
    try:
        text = caption.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    return text or None


def decode_image_bytes(data: bytes, image_size: int) -> np.ndarray:
    """Encoded image -> uint8 [S, S, 3]: shorter side resized to S, centre crop."""
    with Image.open(io.BytesIO(data)) as im:
        # JPEG can decode at a reduced scale directly, much faster for big photos.
        im.draft("RGB", (image_size, image_size))
        return square_rgb(im, image_size)


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
            image = decode_image_bytes(data, s)
        except Exception:  # pylint: disable=broad-except
            # PIL raises many exception types for corrupt or truncated files
            # (OSError, SyntaxError, ValueError, DecompressionBombError, ...).
            return None, "bad_image"
        if image.shape != (s, s, 3):
            return None, "bad_image_shape"
        return image, ""

    def __call__(self, indices) -> dict[str, Any]:
        raw = self.source.__getitems__([int(i) for i in np.asarray(indices).reshape(-1)])
        ints = ("text_id", "index", "label") + self.extra_int_fields
        fields = records.parse(raw, ints, ("image", "caption"))
        skipped: collections.Counter = collections.Counter()
        keep, images, captions = [], [], []
        for j in range(len(raw)):
            caption = _decode_caption(fields["caption"][j])
            if caption is None:
                skipped["bad_caption"] += 1
                continue
            image, reason = self._image(fields["image"][j])
            if image is None:
                skipped[reason] += 1
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
        return out


class DropCounter:
    """Folds each chunk's '_skipped' counts into this counter and `DROPPED`.

    With `max_bad_fraction` set, raises once at least `min_seen` records have
    gone by and more than that fraction of them could not be decoded: a data
    set that is mostly broken should stop training, not quietly shrink it.
    """

    def __init__(self, max_bad_fraction: float | None = None, min_seen: int = 1000):
        self.counts: collections.Counter = collections.Counter()
        self.kept = 0
        self.max_bad_fraction = max_bad_fraction
        self.min_seen = min_seen

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __call__(self, chunk: dict[str, Any]) -> dict[str, Any]:
        chunk = dict(chunk)
        skipped = chunk.pop("_skipped")
        self.counts.update(skipped)
        DROPPED.update(skipped)
        self.kept += len(chunk["index"])
        seen = self.kept + self.total
        if (
            self.max_bad_fraction is not None
            and seen >= self.min_seen
            and self.total > self.max_bad_fraction * seen
        ):
            raise ValueError(
                f"{self.total} of {seen} records could not be decoded "
                f"({dict(self.counts)}), more than data.max_bad_fraction="
                f"{self.max_bad_fraction}"
            )
        return chunk


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
    ):
        self.num_records = int(num_records)
        self.chunk_size = int(chunk_size)
        self.global_size = self.chunk_size * int(process_count)
        self.offset = self.chunk_size * int(process_index)
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


def _decoder(data_config, builder, split, tokenizer, **kwargs) -> ChunkDecoder:
    return ChunkDecoder(
        _raw_source(builder, split),
        image_size=int(options.get(data_config, "image_size", 32)),
        encoded_images=builder.name == "image_text_folder",
        tokenizer=tokenizer,
        **kwargs,
    )


# ----------------------------------------------------------------------------
# Public entry points.


def make_train_iterator(
    data_config, tokenizer, *, seed: int, process_index: int = 0, process_count: int = 1
) -> grain.DatasetIterator:
    """Endless, shuffled, per-process iterator over local train batches.

    The order depends on `seed` and on data_config.shuffle_seed (default 0).
    Other settings read from `data_config`: batch_size (global), image_size,
    worker_count (0: decode in this process's prefetch threads), read_threads
    (default 1), prefetch (chunks buffered ahead, default 4), max_bad_fraction
    (default None: never fail on undecodable records), plus whatever
    `get_builder` needs. The returned iterator carries `.drop_counts`, the
    records it dropped as undecodable, by reason.
    """
    batch_size = int(options.get(data_config, "batch_size", 256))
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if batch_size % process_count:
        raise ValueError(f"data.batch_size {batch_size} is not divisible by process_count {process_count}")
    local_batch = batch_size // process_count
    builder = get_builder(data_config)
    decoder = _decoder(data_config, builder, "train", tokenizer)
    num_records = len(decoder.source)
    if num_records <= process_index:
        raise ValueError(
            f"process {process_index} of {process_count} gets no records (train split has {num_records})"
        )
    chunks = IndexChunks(
        num_records,
        local_batch,
        seed=(int(seed) % 2**32, int(options.get(data_config, "shuffle_seed", 0))),
        process_index=process_index,
        process_count=process_count,
    )
    ds = grain.MapDataset.source(chunks).map(decoder)
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(
            num_threads=int(options.get(data_config, "read_threads", 1)),
            prefetch_buffer_size=int(options.get(data_config, "prefetch", 4)),
        )
    )
    worker_count = int(options.get(data_config, "worker_count", 0))
    if worker_count > 0:
        # grain's worker processes read absl flags; outside an absl app they are
        # unparsed and reading them raises, so fall back to their defaults.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    max_bad = options.get(data_config, "max_bad_fraction", None)
    counter = DropCounter(
        None if max_bad is None else float(max_bad), min_seen=min(1000, max(num_records // process_count, 1))
    )
    it_ds = it_ds.map(counter).filter(_non_empty)
    it_ds = grain.experimental.RebatchIterDataset(it_ds, batch_size=local_batch, drop_remainder=True)
    it_ds = it_ds.map(_batch_in_key_order)
    iterator = iter(it_ds)
    iterator.drop_counts = counter.counts
    return iterator


def load_split_arrays(
    data_config, tokenizer, split: str = "test", max_examples: int | None = None
) -> dict[str, np.ndarray]:
    """A whole split (or its first `max_examples` records, if > 0) as numpy arrays.

    Keys: image uint8 [n,S,S,3], text int32 [n,L], text_id/index/label int32 [n],
    caption str [n], and for shapes also shape/color/size/position int32 [n].
    Undecodable records are left out (and counted in `DROPPED`).
    """
    builder = get_builder(data_config)
    is_shapes = builder.name == "shapes"
    decoder = _decoder(
        data_config,
        builder,
        split,
        tokenizer,
        keep_captions=True,
        extra_int_fields=SHAPES_ATTRIBUTE_KEYS if is_shapes else (),
    )
    n = len(decoder.source)
    if max_examples:  # None or 0: the whole split
        n = min(int(max_examples), n)
    counter = DropCounter()
    chunks = [counter(decoder(np.arange(start, min(start + 1024, n)))) for start in range(0, n, 1024)]
    if not chunks:
        chunks = [counter(decoder(np.zeros(0, np.int64)))]
    out = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    out["caption"] = out["caption"].astype(str)
    return out
