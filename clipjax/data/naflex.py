"""NaFlex inputs (SigLIP 2's variable resolution) from images, in numpy and PIL only: data
workers import this without jax.

An image keeps about its aspect ratio: it is resized so that both sides are multiples of the
patch size p and its patch count is at most a budget (`naflex_size`, transformers'
Siglip2ImageProcessor's rule), cut into rows x cols patches flattened (row, column, channel) row
by row, and padded with zero patches to the budget: what the NaFlex ViT takes
(clipjax.models.naflex.Patches), the grid saying which patches are the image's.

Training (`Decoder.with_naflex`, `data.naflex_seq_lens`): the region that becomes the input is
the whole image, or with `data.random_resized_crop` the random region drawn as for square crops;
it is resized (PIL bilinear, the processor's filter; only the region resampled and JPEGs decoded
at a reduced scale, as the square pipeline does) once for each of the K sequence lengths, and a
decoded example holds the K sequences side by side: `image` uint8 [sum of the lengths, p*p*3],
`image_grid` int32 [K, 2]. `OneLengthBatches` then keeps one length per batch: `image` uint8
[b, L, p*p*3] and `image_grid` int32 [b, 2] (rows, cols), the padding masked by the model.

Why every length is made in the workers: which batch an example lands in is known only when the
batches are put together (a dropped record moves the next examples one batch on, and each
process drops other records), while every process's part of a global batch must have the
batch's length. One resize per length costs less than a second decode; the decoded chunks take
sum / max of the lengths' memory (1.8x for 256, 576 and 1,024).

The batch's length is drawn uniformly from the lengths by (seed, batch number), the batch
number being the train step: the same on every process, and the same lengths after a resume.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from PIL import Image

from clipjax.data.images import Box, region_rgb


class NaflexInputs(NamedTuple):
    """What the data pipeline needs of a NaFlex model's training inputs."""

    patch_size: int
    seq_lens: tuple[int, ...]  # the patch budgets a batch may have
    seed: int = 0  # draws each batch's length
    first_batch: int = 0  # the batch number (train step) of the iterator's first batch


_LENGTH_STREAM = 2  # keeps the length draws apart from the data order's and the crops' streams


def seq_len_at(naflex: NaflexInputs, batch: int) -> int:
    """The sequence length of batch number `batch`: one of `seq_lens`, uniformly."""
    lens = naflex.seq_lens
    if len(lens) == 1:
        return int(lens[0])
    rng = np.random.default_rng([int(naflex.seed) % 2**32, int(batch), _LENGTH_STREAM])
    return int(lens[int(rng.integers(len(lens)))])


def naflex_size(height: int, width: int, patch_size: int, max_num_patches: int) -> tuple[int, int]:
    """(height, width) that transformers' Siglip2ImageProcessor resizes an image to: both sides
    scaled by one factor and rounded up to multiples of the patch (at least one patch each), the
    largest factor whose patches number at most `max_num_patches`. The factor is found as the
    processor finds it, by bisection over (1e-6, 100) down to an interval of 1e-5, so that the
    result is the processor's even where two sizes lie closer together than that."""
    p = patch_size

    def sides(scale: float) -> tuple[int, int]:
        return max(p, math.ceil(height * scale / p) * p), max(p, math.ceil(width * scale / p) * p)

    low, high = 1e-5 / 10, 100.0
    while high - low >= 1e-5:
        middle = (low + high) / 2
        h, w = sides(middle)
        if (h // p) * (w // p) <= max_num_patches:
            low = middle
        else:
            high = middle
    return sides(low)


def to_patches(pixels: np.ndarray, patch_size: int, length: int) -> tuple[np.ndarray, tuple[int, int]]:
    """uint8 [H, W, 3] (sides multiples of the patch) -> (uint8 [length, p * p * 3]: the patches
    flattened (row, column, channel) row by row, then zeros; (rows, cols))."""
    p = patch_size
    rows, cols = pixels.shape[0] // p, pixels.shape[1] // p
    x = pixels.reshape(rows, p, cols, p, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, p * p * 3)
    patches = np.zeros((length, p * p * 3), np.uint8)
    patches[: rows * cols] = x
    return patches, (rows, cols)


def naflex_patches(image, patch_size: int, max_num_patches: int) -> tuple[np.ndarray, tuple[int, int]]:
    """A NaFlex model's input from one image (uint8 [H, W, 3] or [H, W], or a PIL image), as
    transformers' Siglip2ImageProcessor (PIL backend) makes it: resized to `naflex_size` with
    PIL's bilinear filter, cut into patches flattened (row, column, channel) row by row and padded
    with zeros to `max_num_patches`: (uint8 [max_num_patches, p * p * 3], (rows, cols)). The
    model standardises the pixels itself (SigLIP 2: (x / 255 - 0.5) / 0.5, the processor's)."""
    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    height, width = naflex_size(im.height, im.width, patch_size, max_num_patches)
    if im.size != (width, height):
        im = im.resize((width, height), Image.BILINEAR)
    x = np.asarray(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8)
    return to_patches(x, patch_size, max_num_patches)


def region_sizes(width: float, height: float, naflex: NaflexInputs) -> list[tuple[int, int]]:
    """(width, height) a region of that size is resized to, for each sequence length."""
    return [naflex_size(height, width, naflex.patch_size, n)[::-1] for n in naflex.seq_lens]


def region_patches(
    im: Image.Image, box: Box, sizes: list[tuple[int, int]], naflex: NaflexInputs
) -> tuple[np.ndarray, np.ndarray]:
    """`box` of `im` at each of `sizes` (`region_sizes` of the box in the source's pixels), as
    patches: (uint8 [sum of the lengths, p * p * 3], each length's sequence after the other;
    int32 [K, 2], each one's (rows, cols))."""
    fitted = [
        to_patches(region_rgb(im, size, Image.BILINEAR, box), naflex.patch_size, n)
        for size, n in zip(sizes, naflex.seq_lens)
    ]
    return np.concatenate([f[0] for f in fitted]), np.array([f[1] for f in fitted], np.int32)


class OneLengthBatches:
    """The batches of `batches` (every length's sequences side by side, `region_patches`) with
    one sequence length each, `seq_len_at` of its batch number: `image` [b, L, p * p * 3] and
    `image_grid` [b, 2]. The position is `batches`' own (`get_state`, `set_state`): the batch
    number comes from `naflex.first_batch`, the step the run starts from."""

    def __init__(self, batches, naflex: NaflexInputs):
        self._batches, self.naflex = batches, naflex
        self._batch = int(naflex.first_batch)
        self._starts = np.cumsum((0,) + tuple(naflex.seq_lens))

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._batches)
        length = seq_len_at(self.naflex, self._batch)
        self._batch += 1
        k = self.naflex.seq_lens.index(length)
        image = batch["image"][:, self._starts[k] : self._starts[k] + length]
        grid = batch["image_grid"][:, k]
        return {**batch, "image": np.ascontiguousarray(image), "image_grid": np.ascontiguousarray(grid)}

    def get_state(self):
        return self._batches.get_state()

    def set_state(self, state) -> None:
        self._batches.set_state(state)

    def close(self) -> None:
        close = getattr(self._batches, "close", None)
        if close is not None:
            close()
