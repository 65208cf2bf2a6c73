"""LocCa's localisation tasks for a captioning decoder: the token sequences it trains on and
reads back.

LocCa (Wan et al., 2024) trains the decoder on three tasks, each example drawn one of them, all
written as one token sequence so the same teacher-forced cross-entropy serves them:

* captioning:            [caption]  w1 .. wn eos                 targets: w1 .. eos
* referring expression:  [referring] w1 .. wn  x0 y0 x1 y1 eos     targets: x0 .. eos (text -> box)
* grounded captioning:   [grounded] x0 y0 x1 y1  w1 .. wn eos      targets: w1 .. eos (box -> text)

The task tokens and the coordinate tokens are appended to the text vocabulary (the decoder's
vocabulary is `text vocabulary + 3 + box_bins`; the text tower is unchanged), and the prompt part
of a sequence is read but never a target. A coordinate v in [0, 1] is the bin round(v x (bins -
1)): with bins = S + 1 the pixel edges of an S-pixel image are exact. A sequence is at most 4
tokens longer than the caption's ([bos] w1 .. wn [eos] becomes 1 + n + 4 + 1), so the decoder's
context is the text context + 4. An example without a box (all zeros) is always captioned.

Why the tasks are drawn per example on device from (seed, step, the example's `index`), as
image-image views are: the draw is then the same whatever the mesh, the micro-batching or a
resumption.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from clipjax.models.text import PAD_ID

TASKS = ("caption", "referring", "grounded")
EXTRA_CONTEXT = 4  # the four coordinate tokens


@dataclasses.dataclass(frozen=True)
class LoccaTokens:
    """Where LocCa's tokens sit in the decoder's vocabulary: the task tokens right after the text
    vocabulary, then `bins` coordinate tokens."""

    text_vocab: int
    bins: int

    @property
    def vocab_size(self) -> int:
        return self.text_vocab + len(TASKS) + self.bins

    def task_id(self, task: str) -> int:
        return self.text_vocab + TASKS.index(task)

    @property
    def first_coordinate(self) -> int:
        return self.text_vocab + len(TASKS)

    def box_tokens(self, boxes: jax.Array) -> jax.Array:
        """float [..., 4] (x_min, y_min, x_max, y_max) in [0, 1] -> int32 [..., 4] token ids."""
        bins = jnp.round(jnp.clip(boxes, 0.0, 1.0) * (self.bins - 1)).astype(jnp.int32)
        return self.first_coordinate + bins

    def boxes(self, tokens: jax.Array) -> jax.Array:
        """`box_tokens`' inverse (a token outside the coordinates reads as its nearest)."""
        bins = jnp.clip(tokens - self.first_coordinate, 0, self.bins - 1)
        return bins.astype(jnp.float32) / (self.bins - 1)


def has_box(boxes: jax.Array) -> jax.Array:
    """bool [B]: the box has an area (zeros mean none)."""
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def draw_tasks(probabilities, boxes: jax.Array, index: jax.Array, *, seed: int, step) -> jax.Array:
    """int32 [B] task of each example (TASKS order), drawn from (seed, step, index) with the
    given probabilities; examples without a box are captioned."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), 0x10CCA)
    logits = jnp.log(jnp.asarray(probabilities, jnp.float32))
    draw = jax.vmap(lambda i: jax.random.categorical(jax.random.fold_in(key, i), logits))(index)
    return jnp.where(has_box(boxes), draw, 0).astype(jnp.int32)


def _shifted(words: jax.Array, offset: jax.Array, length: int) -> jax.Array:
    """[B, length]: position p holds words[:, p - offset] (pad outside the words)."""
    at = jnp.arange(length)[None, :] - offset[:, None]
    inside = (at >= 0) & (at < words.shape[1])
    return jnp.where(inside, jnp.take_along_axis(words, jnp.clip(at, 0, words.shape[1] - 1), axis=1), PAD_ID)


def locca_tokens(decoder) -> LoccaTokens | None:
    """The token layout of a `CaptionDecoder` trained on LocCa's tasks (None: captions only)."""
    if decoder is None or decoder.spec.tasks != "locca":
        return None
    bins = decoder.spec.box_bins
    return LoccaTokens(decoder.vocab_size - len(TASKS) - bins, bins)


def task_sequences(
    tokens: jax.Array, boxes: jax.Array, tasks: jax.Array, layout: LoccaTokens
) -> tuple[jax.Array, jax.Array]:
    """(int32 [B, L + 4] each example's sequence for its task, float32 [B, L + 3] which of its
    next-token targets (positions 1..) are trained) from the captions' token ids [B, L] as the
    tokenizer wraps them ([bos] w1 .. wn [eos] pads), the boxes [B, 4] and the tasks [B]. A
    referring expression ends with the caption's own eos token."""
    b, length = tokens.shape
    out_len = length + EXTRA_CONTEXT
    p = jnp.arange(out_len)[None, :]
    words = tokens[:, 1:]  # w1 .. wn eos pads
    n = jnp.sum(tokens != PAD_ID, axis=1) - 2  # words between bos and eos
    coords = layout.box_tokens(boxes)  # [B, 4]

    def put_box(seq, start):
        at = p - start[:, None]
        inside = (at >= 0) & (at < 4)
        return jnp.where(inside, jnp.take_along_axis(coords, jnp.clip(at, 0, 3), axis=1), seq)

    ones = jnp.ones((b,), jnp.int32)
    caption = _shifted(words, ones, out_len)
    grounded = put_box(_shifted(words, ones + 4, out_len), ones)
    referring = jnp.where(p <= n[:, None], caption, PAD_ID)
    referring = put_box(referring, n + 1)
    eos = jnp.take_along_axis(tokens, jnp.clip(n + 1, 0, length - 1)[:, None], axis=1)
    referring = jnp.where(p == (n + 5)[:, None], eos, referring)
    sequences = jnp.stack([caption, referring, grounded])  # [3, B, L + 4]
    first_target = jnp.stack([ones, n + 1, ones + 4])[:, :, None]  # [3, B, 1]
    trained = (p >= first_target) & (sequences != PAD_ID)
    pick = lambda x: jnp.take_along_axis(x, tasks[None, :, None], axis=0)[0]
    starts = jnp.array([layout.task_id(t) for t in TASKS], jnp.int32)[tasks]
    seq = pick(sequences).at[:, 0].set(starts)
    return seq.astype(jnp.int32), pick(trained)[:, 1:].astype(jnp.float32)
