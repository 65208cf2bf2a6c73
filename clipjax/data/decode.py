"""The one decoder of every source: examples as read -> arrays of the good ones, the others counted.

A source reads its examples in whatever way its storage needs (its `reader(items, epochs)`:
records by number, samples of tar shards) and hands them over as `Raw` bytes; everything after
that is here, the same for all: the caption checked (`bad_caption`: none, blank or not UTF-8),
the image decoded and centre-cropped (`clipjax.data.images`) or, in training with
`data.random_resized_crop`, cropped at random (`missing_image`, `bad_image`, `bad_image_shape`),
the caption tokenized. For a NaFlex model (`with_naflex`) the image becomes patch sequences
instead of a square: the whole image (or the random region) resized at about its aspect ratio
to each training sequence length (`clipjax.data.naflex`). A source whose examples carry an
object's box (`reader.boxes`) gets it mapped into the crop (`box`, zeros where there is none or
the crop cut it away; `bad_box` when it is malformed). A dropped example is left out, and
`_dropped` names it and why, for the drop accounting (`clipjax.data.drops`) and for a resumable
stream's position.

Random crops are drawn from a generator seeded by (seed, shuffle_seed, epoch, the example's
`id`): the same example gets the same crop whatever the batch size, the process count, the
number of workers or a resumption, and another crop every epoch.
"""

from __future__ import annotations

import copy
import functools
import itertools
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np
from PIL import Image

from clipjax.captions import caption_text_id, decode_caption
from clipjax.data import records
from clipjax.data import naflex as naflex_inputs
from clipjax.data.drops import DropCounter
from clipjax.data.images import (
    bad_box,
    box_in_region,
    center_crop_box,
    check_crop_scale,
    decode_image,
    decode_region,
    random_resized_crop_box,
    square_rgb,
    whole_image,
)

BATCH_KEYS = ("image", "text", "text_id", "index", "label")
# Batch keys only some sources give: `box` float32 [4], an object's (x_min, y_min, x_max,
# y_max) as fractions of the image (zeros: none); `image_grid` int32, a NaFlex image's patch
# rows and columns (`clipjax.data.naflex`).
OPTIONAL_BATCH_KEYS = ("box", "image_grid")


def batch_keys(arrays) -> tuple[str, ...]:
    """The batch keys of decoded `arrays`: every one of BATCH_KEYS, and the optional ones it has."""
    return BATCH_KEYS + tuple(k for k in OPTIONAL_BATCH_KEYS if k in arrays)


class Raw(NamedTuple):
    """One example as its source read it, before decoding."""

    id: int  # seeds its random crop: a record's number, a tar sample's index
    image: bytes | None
    caption: bytes | None
    index: int | None = -1  # the batch's `index` (None: -1)
    text_id: int | None = None  # None: the caption's (`clipjax.captions.caption_text_id`)
    label: int | None = -1
    ints: tuple = ()  # the reader's `extra_int_fields`, in order (None: -1)
    error: str = ""  # why it cannot be used, found while reading (a broken tar shard)
    name: str = ""  # in error messages (empty: its id)
    box: tuple | None = None  # an object's (x_min, y_min, x_max, y_max) fractions (None: none)


class RecordReader:
    """A random-access source of serialized records (`len()`, `__getitems__`) as `Raw` examples:
    the records the tfds builders of clipjax's sources write (fields image, caption, text_id,
    index, label, `extra_int_fields`, and with `boxes` the float [4] field box)."""

    def __init__(self, source, extra_int_fields: Sequence[str] = (), boxes: bool = False):
        self.source, self.extra_int_fields, self.boxes = source, tuple(extra_int_fields), bool(boxes)

    def __len__(self) -> int:
        return len(self.source)

    def __call__(self, ids, epochs=None) -> list[Raw]:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        ints = ("text_id", "index", "label") + self.extra_int_fields
        boxes = ("box",) if self.boxes else ()
        f = records.parse(self.source.__getitems__(ids), ints, ("image", "caption"), boxes)
        return [
            Raw(
                i,
                f["image"][j],
                f["caption"][j],
                f["index"][j],
                -1 if f["text_id"][j] is None else f["text_id"][j],
                f["label"][j],
                tuple(f[k][j] for k in self.extra_int_fields),
                box=f["box"][j] if self.boxes else None,
            )
            for j, i in enumerate(ids)
        ]


class Decoder:
    """Reads (`reader(items, epochs) -> [Raw]`) and decodes a chunk of examples; drops bad ones.

    Called with the reader's items (record ids, tar samples) and their epochs (one for all, or
    one each; random crops and per-epoch caption draws need them), or with {'index': ids,
    'epoch': epochs} as `pipeline.IndexChunks` gives them. Images are stored encoded (PNG,
    JPEG) or, with `encoded_images=False`, as raw uint8 pixels of image_size. They are
    centre-cropped unless `with_random_crop` made a training copy: evaluation never crops at
    random. A module-level class so that worker processes can unpickle it.
    """

    random_crop: tuple[float, float] | None = None  # the share of the area a crop covers
    crop_seed: tuple[int, ...] = ()
    naflex: naflex_inputs.NaflexInputs | None = None  # patch sequences instead of a square

    def __init__(self, reader, image_size: int, *, encoded_images=True, tokenizer=None, keep_captions=False):
        self.reader = reader
        self.image_size = int(image_size)
        self.encoded_images = encoded_images
        self.tokenizer = tokenizer
        self.keep_captions = keep_captions

    @property
    def needs_epochs(self) -> bool:
        return getattr(self.reader, "needs_epochs", False)

    def with_random_crop(self, scale: Sequence[float], seed: Sequence[int]) -> Decoder:
        """A copy that crops a random region covering a share `scale` = (low, high) of the area
        (`clipjax.data.images.random_resized_crop_box`), seeded per (seed, epoch, example id)."""
        problem = check_crop_scale(tuple(scale)) or (None if len(scale) else "expected (low, high)")
        if problem:
            raise ValueError(f"random crop scale: {problem}, got {tuple(scale)}")
        decoder = copy.copy(self)
        decoder.random_crop = (float(scale[0]), float(scale[1]))
        decoder.crop_seed = tuple(int(v) for v in seed)
        return decoder

    def with_naflex(self, naflex: naflex_inputs.NaflexInputs) -> Decoder:
        """A copy that gives each image as a NaFlex model's patch sequences, one for each of
        `naflex.seq_lens` side by side (`clipjax.data.naflex.region_patches`): `image` uint8
        [sum of the lengths, p * p * 3] and `image_grid` int32 [lengths, 2] per example."""
        decoder = copy.copy(self)
        decoder.naflex = naflex
        return decoder

    def _crop(self, example_id: int, epoch):
        """None (centre crop; NaFlex: the whole image), or the crop function of one example in
        one epoch."""
        if self.random_crop is None:
            return None if self.naflex is None else whole_image
        if epoch is None:
            raise ValueError("a random-cropping Decoder needs each example's epoch ({'index', 'epoch'})")
        # The trailing 1 keeps this stream apart from the epoch permutation's ([*seed, epoch]).
        rng = np.random.default_rng([*self.crop_seed, int(epoch), int(example_id) % 2**32, 1])
        return functools.partial(random_resized_crop_box, rng=rng, scale=self.random_crop)

    @property
    def boxes(self) -> bool:
        return getattr(self.reader, "boxes", False)

    def _image(self, data: bytes | None, crop=None) -> tuple[Any, str]:
        s = self.image_size
        if not data:
            return None, "missing_image"
        if self.naflex is not None:
            return self._patches(data, crop)
        if not self.encoded_images:
            if len(data) != s * s * 3:
                return None, "bad_image_shape"
            image = np.frombuffer(data, np.uint8).reshape(s, s, 3)
            if crop is not None:
                image = square_rgb(Image.fromarray(image), s, box=crop(s, s))
            return image, ""
        try:
            image = decode_image(data, s, crop=crop)
        except Exception:  # noqa: BLE001 - PIL raises many types for corrupt or truncated files
            # (OSError, SyntaxError, ValueError, DecompressionBombError, ...).
            return None, "bad_image"
        if image.shape != (s, s, 3):
            return None, "bad_image_shape"
        return image, ""

    def _patches(self, data: bytes, crop) -> tuple[tuple[np.ndarray, np.ndarray] | None, str]:
        """A NaFlex image's (patches, grids) of every sequence length, from the region `crop`
        picks."""
        sizes = functools.partial(naflex_inputs.region_sizes, naflex=self.naflex)
        fit = functools.partial(naflex_inputs.region_patches, naflex=self.naflex)
        s = self.image_size
        if not self.encoded_images:
            if len(data) != s * s * 3:
                return None, "bad_image_shape"
            box = crop(s, s)
            image = Image.fromarray(np.frombuffer(data, np.uint8).reshape(s, s, 3))
            return fit(image, box, sizes(box[2] - box[0], box[3] - box[1])), ""
        try:
            return decode_region(data, crop, sizes, fit), ""
        except Exception:  # noqa: BLE001 - as in `_image`
            return None, "bad_image"

    def decode_one(self, raw: Raw, epoch=None, seen: dict | None = None):
        """(image, caption text, "") of a good example (a NaFlex decoder's image: its patches and
        grids), or (None, None, why it is dropped).
        `seen` (a dict) receives the image's size and the region of it that became the output
        (None: the centre crop)."""
        if raw.error:
            return None, None, raw.error
        caption = decode_caption(raw.caption)
        if caption is None:
            return None, None, "bad_caption"
        crop = self._crop(raw.id, epoch)
        if seen is not None:

            def crop(width, height, pick=crop):
                seen["size"] = (width, height)
                seen["region"] = None if pick is None else pick(width, height)
                return seen["region"]

        image, reason = self._image(raw.image, crop)
        return image, caption, reason

    def _box(self, raw: Raw, epoch) -> tuple[np.ndarray | None, str | None, str, np.ndarray]:
        """`decode_one` and the example's box in the output's coordinates (zeros: none)."""
        if raw.box is not None and bad_box(raw.box):
            return None, None, "bad_box", np.zeros(4, np.float32)
        seen: dict = {}
        image, caption, reason = self.decode_one(raw, epoch, seen)
        if reason or raw.box is None:
            return image, caption, reason, np.zeros(4, np.float32)
        size = seen["size"]
        region = seen["region"] or center_crop_box(*size, self.image_size)
        return image, caption, reason, box_in_region(raw.box, size, region)

    def __call__(self, items, epochs=None) -> dict[str, Any]:
        """The good examples as arrays (BATCH_KEYS, the reader's extra int fields, and 'caption'
        with keep_captions), and '_dropped': (position in the chunk, name, reason) of the others."""
        if isinstance(items, dict):
            items, epochs = items["index"], items["epoch"]
        raws = self.reader(items, epochs)
        if epochs is not None:
            epochs = np.broadcast_to(np.asarray(epochs).reshape(-1) if np.ndim(epochs) else epochs, len(raws))
        kept, images, captions, boxes, dropped = [], [], [], [], []
        for j, raw in enumerate(raws):
            epoch = None if epochs is None else epochs[j]
            if self.boxes:
                image, caption, reason, box = self._box(raw, epoch)
            else:
                (image, caption, reason), box = self.decode_one(raw, epoch), None
            if reason:
                dropped.append((j, raw.name or raw.id, reason))
                continue
            kept.append(raw)
            images.append(image)
            captions.append(caption)
            boxes.append(box)
        out: dict[str, Any] = self._stacked(images)
        if self.tokenizer is not None:
            out["text"] = np.asarray(self.tokenizer.encode(captions), np.int32)
        text_ids = [caption_text_id(c) if r.text_id is None else r.text_id for r, c in zip(kept, captions)]
        out["text_id"] = records.ints(text_ids)
        out["index"] = records.ints([r.index for r in kept])
        out["label"] = records.ints([r.label for r in kept])
        for k, name in enumerate(getattr(self.reader, "extra_int_fields", ())):
            out[name] = records.ints([r.ints[k] for r in kept])
        if self.boxes:
            out["box"] = np.array(boxes, np.float32).reshape(len(kept), 4)
        if self.keep_captions:
            out["caption"] = np.array(captions, dtype=object)
        out["_dropped"] = dropped
        return out

    def _stacked(self, images: list) -> dict[str, np.ndarray]:
        """{'image'} of the good examples' images (NaFlex: and 'image_grid')."""
        if self.naflex is None:
            s = self.image_size
            return {"image": np.stack(images) if images else np.zeros((0, s, s, 3), np.uint8)}
        if not images:
            p, lens = self.naflex.patch_size, self.naflex.seq_lens
            return {
                "image": np.zeros((0, sum(lens), p * p * 3), np.uint8),
                "image_grid": np.zeros((0, len(lens), 2), np.int32),
            }
        return {"image": np.stack([i[0] for i in images]), "image_grid": np.stack([i[1] for i in images])}


def chunks_of(items: Iterable, size: int):
    """Lists of `size` items (the last shorter), read as they are needed."""
    items = iter(items)
    return iter(lambda: list(itertools.islice(items, size)), [])


def load_arrays(
    decoder: Decoder, chunks: Iterable, max_examples: int | None = None, drops: DropCounter | None = None
) -> dict[str, np.ndarray]:
    """The first `max_examples` good examples (all when None or 0) of the decoded `chunks` (the
    reader's items, chunk after chunk: no more is read than that needs) as numpy arrays.

    Keys: image uint8 [n,S,S,3], text int32 [n,L], text_id/index/label int32 [n], the reader's
    extra int fields, caption str [n] (with keep_captions). Bad examples are left out and counted
    in `drops`.
    """
    counter = drops if drops is not None else DropCounter()
    chunks, out, kept = iter(chunks), [], 0
    while not max_examples or kept < max_examples:
        chunk = next(chunks, None)
        if chunk is None:
            break
        out.append(counter(decoder(chunk)))
        kept += len(out[-1]["index"])
    if not out:
        out = [counter(decoder([]))]
    arrays = {k: np.concatenate([c[k] for c in out]) for k in out[0]}
    if max_examples:
        arrays = {k: v[: int(max_examples)] for k, v in arrays.items()}
    if "caption" in arrays:
        arrays["caption"] = arrays["caption"].astype(str)
    return arrays
