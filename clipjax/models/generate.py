"""Captions from a model with a decoder: greedy and beam search over a key/value cache.

Each new token costs one position of the text tower (CoCa, where the decoder continues from
it) and of the decoder, reading the keys and values of the earlier positions from a cache
instead of recomputing them; the image is encoded once. A caption starts with the tokenizer's
bos id and ends at its eos id, after which the row holds pad ids (0), as a tokenizer pads.
A decoder trained on LocCa's tasks starts from its captioning task token instead, never writes a
task or coordinate token in a caption, and writes the box a caption refers to
(`referring_boxes`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from clipjax.models.locca import TASKS, locca_tokens, task_sequences
from clipjax.models.text import PAD_ID


def _step_fn(model, memory, bos_id):
    """step(tokens [B, 1], caches, index) -> (log-probabilities [B, vocab], caches).

    The modules are rebuilt from their arrays inside each call: the loop bodies that call it
    are traced apart from the caller, and nnx modules do not cross trace levels."""
    graphdef, state = nnx.split(model)
    state = nnx.to_pure_dict(state)
    spec = model.decoder.spec
    never = sorted({PAD_ID, bos_id})
    layout = locca_tokens(model.decoder)
    if layout is not None:  # no task or coordinate token in a caption
        never += list(range(layout.text_vocab, layout.vocab_size))

    def step(tokens, caches, index):
        model = nnx.merge(graphdef, state)
        text_cache, decoder_cache = caches
        inputs = tokens
        if spec.from_text_tower:
            final_norm = spec.input != "text_tower_raw"
            inputs, text_cache = model.text_tower.step(tokens, text_cache, index, final_norm)
        logits, decoder_cache = model.decoder.step(
            inputs, memory, decoder_cache, index, model.tied_embedding()
        )
        # A caption never continues with pad (it is no target in training) or another bos.
        logits = logits.astype(jnp.float32).at[:, jnp.array(never)].set(-jnp.inf)
        return jax.nn.log_softmax(logits, axis=-1), (text_cache, decoder_cache)

    return step


def _caches(model, batch):
    text = model.text_tower.init_cache(batch) if model.decoder.spec.from_text_tower else ()
    return text, model.decoder.init_cache(batch)


def _start(model, batch: int, max_len: int, bos_id: int) -> jax.Array:
    """Rows of `max_len` pads, each starting with bos (LocCa: its captioning task token)."""
    layout = locca_tokens(model.decoder)
    first = bos_id if layout is None else layout.task_id("caption")
    return jnp.zeros((batch, max_len), jnp.int32).at[:, 0].set(first)


def _check(model, max_len, bos_id, eos_id):
    if model.decoder is None:
        raise ValueError("this model has no captioning decoder (model.decoder.variant is 'none')")
    if not 2 <= max_len <= model.decoder.max_len:
        raise ValueError(f"max_len: {max_len} is outside 2..{model.decoder.max_len} (the model's context)")
    if bos_id is None or eos_id is None:
        raise ValueError("captioning needs a tokenizer with bos and eos ids")


def greedy_captions(model, images: jax.Array, *, max_len: int, bos_id: int, eos_id: int) -> jax.Array:
    """int32 [B, max_len]: bos, then the most likely next token each time, until eos."""
    _check(model, max_len, bos_id, eos_id)
    b = images.shape[0]
    step = _step_fn(model, model.image_memory(images), bos_id)
    tokens = _start(model, b, max_len, bos_id)

    def body(index, carry):
        tokens, caches, done = carry
        logp, caches = step(jax.lax.dynamic_slice_in_dim(tokens, index, 1, axis=1), caches, index)
        chosen = jnp.where(done, PAD_ID, jnp.argmax(logp, axis=-1).astype(jnp.int32))
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, chosen[:, None], index + 1, axis=1)
        return tokens, caches, done | (chosen == eos_id)

    tokens, _, _ = jax.lax.fori_loop(0, max_len - 1, body, (tokens, _caches(model, b), jnp.zeros((b,), bool)))
    return tokens.at[:, 0].set(bos_id)


def beam_captions(
    model, images: jax.Array, *, max_len: int, bos_id: int, eos_id: int, beams: int
) -> tuple[jax.Array, jax.Array]:
    """(int32 [B, max_len] the most likely caption of `beams` kept at each length, float32 [B]
    its log-probability). A finished beam (eos emitted) carries on with pads at no cost, so
    finished and unfinished captions compete on their total log-probability."""
    _check(model, max_len, bos_id, eos_id)
    if beams < 1:
        raise ValueError(f"beams: expected a positive integer, got {beams}")
    b, k = images.shape[0], beams
    memory = model.image_memory(images)
    memory = jnp.repeat(memory, k, axis=0)  # beam j of image i at row i * k + j
    step = _step_fn(model, memory, bos_id)
    tokens = _start(model, b * k, max_len, bos_id)
    # Only the first beam starts alive, so the first expansion gives k different tokens.
    scores = jnp.tile(jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf), b)
    vocab = model.decoder.vocab_size

    def body(index, carry):
        tokens, caches, scores, done = carry
        logp, caches = step(jax.lax.dynamic_slice_in_dim(tokens, index, 1, axis=1), caches, index)
        pad_only = jnp.full((vocab,), -jnp.inf).at[PAD_ID].set(0.0)
        logp = jnp.where(done[:, None], pad_only, logp)
        candidates = (scores[:, None] + logp).reshape(b, k * vocab)
        best, flat = jax.lax.top_k(candidates, k)
        parent = (flat // vocab + jnp.arange(b)[:, None] * k).reshape(-1)
        chosen = (flat % vocab).reshape(-1).astype(jnp.int32)
        reorder = lambda x: jnp.take(x, parent, axis=1 if x.ndim == 5 else 0)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens[parent], chosen[:, None], index + 1, axis=1)
        caches = jax.tree.map(reorder, caches)
        done = done[parent] | (chosen == eos_id)
        return tokens, caches, best.reshape(-1), done

    carry = (tokens, _caches(model, b * k), scores, jnp.zeros((b * k,), bool))
    tokens, _, scores, _ = jax.lax.fori_loop(0, max_len - 1, body, carry)
    # top_k sorts, so each image's first beam is its best.
    return tokens.reshape(b, k, max_len)[:, 0].at[:, 0].set(bos_id), scores.reshape(b, k)[:, 0]


def referring_boxes(model, images: jax.Array, tokens: jax.Array) -> jax.Array:
    """float32 [B, 4] (x_min, y_min, x_max, y_max): the box a decoder trained on LocCa's tasks
    writes for the object each caption (token ids [B, L] as the tokenizer gives them) describes,
    the most likely coordinate token each time. Four teacher-forced passes, one per coordinate:
    the causal mask keeps the placeholders after the position read out of its logits."""
    layout = locca_tokens(model.decoder)
    if layout is None:
        raise ValueError(
            "this model's decoder was not trained on LocCa's tasks (model.decoder.tasks is not 'locca')"
        )
    b = tokens.shape[0]
    memory = model.image_memory(images)
    referring = jnp.full((b,), TASKS.index("referring"), jnp.int32)
    seq, _ = task_sequences(tokens, jnp.zeros((b, 4), jnp.float32), referring, layout)
    n = jnp.sum(tokens != PAD_ID, axis=1) - 2  # the caption's words; coordinate k goes at n + 1 + k
    rows = jnp.arange(b)
    first, last = layout.first_coordinate, layout.first_coordinate + layout.bins
    for k in range(4):
        logits = model.decoder(seq[:, :-1], memory, model.tied_embedding())
        read = logits[rows, n + k, first:last]
        seq = seq.at[rows, n + 1 + k].set(first + jnp.argmax(read, axis=-1).astype(jnp.int32))
    return layout.boxes(seq[rows[:, None], n[:, None] + 1 + jnp.arange(4)[None, :]])
