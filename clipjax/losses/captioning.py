"""The captioning loss of a model with a decoder (CoCa, LocCa): teacher-forced next-token
cross-entropy, averaged over the real target tokens of the whole global batch.

Why a mean over tokens of the global batch rather than of each micro-batch or device: it is the
loss of the un-split batch, so the gradients are those of one device seeing everything, whatever
the mesh and `microbatches` (a micro-batch contributes its sum; the count is the batch's). The
pad id (0) is never a target; the tokenizers end each caption with eos, which is one, so the
decoder learns where to stop.

Label smoothing (`loss.label_smoothing` = e) takes (1 - e) of the target's negative
log-probability and e of the mean over the vocabulary, as in the usual definition.

Why the logits may be computed a slice of the vocabulary at a time (`loss.caption_vocab_chunk`):
they are B x L x V floats, 15 MB an example for CLIP's 49,408-word vocabulary at 77 tokens,
more than the rest of a B/32 step holds per example. `chunked_token_cross_entropy` keeps a
running maximum, sum of exponentials, target logit and logit sum per token over the slices, and
recomputes each slice's logits in the backward pass (`jax.checkpoint` on the loop body), so
only B x L x chunk logits exist at once; the value and gradients are those of the whole.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from clipjax.models.text import PAD_ID
from clipjax.schema import Field


def _smoothing(value) -> str | None:
    return None if 0.0 <= value < 1.0 else "expected a number in [0, 1)"


def _task_weights(value) -> str | None:
    if len(value) != 3 or any(not isinstance(v, (int, float)) or v < 0 for v in value) or not sum(value):
        return "expected three non-negative weights (caption, referring, grounded), not all zero"
    return None


# Joined to `config.loss` (read only with a `model.decoder`).
FIELDS = {
    "caption_weight": Field(
        2.0, "with model.decoder: weight of the captioning cross-entropy (CoCa: 2)", minimum=0.0
    ),
    "contrastive_weight": Field(
        1.0, "weight of the contrastive objective (loss.name) beside a captioning loss", minimum=0.0
    ),
    "caption_vocab_chunk": Field(
        0,
        "with model.decoder: the captioning logits this many vocabulary entries at a time, recomputed "
        "in the backward pass (0: all at once); bounds their memory to B x L x chunk",
        minimum=0,
    ),
    "label_smoothing": Field(
        0.0, "with model.decoder: label smoothing of the captioning loss", check=_smoothing
    ),
    "locca_tasks": Field(
        (1.0, 1.0, 1.0),
        "with model.decoder.tasks='locca': relative frequencies of captioning, referring expression "
        "(text -> box) and grounded captioning (box -> text), drawn per example",
        check=_task_weights,
    ),
}


def caption_targets(tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(targets [B, L - 1]: tokens 1.., float32 mask of the real ones) for teacher forcing."""
    targets = tokens[:, 1:]
    return targets, (targets != PAD_ID).astype(jnp.float32)


def token_cross_entropy(logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-token cross-entropy [B, T] of logits [B, T, vocab] (float32) against int targets."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    if not label_smoothing:
        return nll
    return (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)


def caption_token_losses(
    model,
    images: jax.Array,
    tokens: jax.Array,
    label_smoothing: float = 0.0,
    vocab_chunk: int = 0,
    sequences: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One teacher-forced pass of a model with a decoder over images and their captions' token
    ids [B, L]: (image embeddings, text embeddings, each target's cross-entropy [B, L - 1], 0 at
    pads), the logits `vocab_chunk` vocabulary entries at a time (0: all at once). `sequences`:
    (token ids [B, L'], which targets are trained [B, L' - 1]) the decoder reads and predicts
    instead of the captions (LocCa's tasks, `clipjax.models.locca.task_sequences`)."""
    if sequences is None:
        a, b, features = model.embed_and_decode(images, tokens)
        targets, mask = caption_targets(tokens)
    else:
        a, b, features = model.embed_and_decode(images, tokens, sequences[0])
        targets, mask = sequences[0][:, 1:], sequences[1]
    weight, bias = model.decoder.output_layer(model.tied_embedding())
    losses = chunked_token_cross_entropy(features, weight, bias, targets, label_smoothing, vocab_chunk)
    return a, b, losses * mask


def caption_token_count(tokens: jax.Array) -> jax.Array:
    """The number of real targets in `tokens`: what the summed `caption_token_losses` are divided by."""
    return jnp.sum(caption_targets(tokens)[1])


def chunked_token_cross_entropy(
    features: jax.Array,
    weight: jax.Array,
    bias: jax.Array | None,
    targets: jax.Array,
    label_smoothing: float = 0.0,
    chunk: int = 0,
) -> jax.Array:
    """`token_cross_entropy` of the logits `features @ weight + bias` ([B, T, d] @ [d, V]),
    computed `chunk` vocabulary entries at a time (0 or >= V: all at once)."""
    vocab = weight.shape[1]
    if not chunk or chunk >= vocab:
        logits = jnp.einsum("btd,dv->btv", features, weight)
        return token_cross_entropy(logits if bias is None else logits + bias, targets, label_smoothing)
    n = -(-vocab // chunk)
    pad = n * chunk - vocab
    weights = jnp.pad(weight, ((0, 0), (0, pad))).reshape(weight.shape[0], n, chunk).transpose(1, 0, 2)
    biases = jnp.pad(jnp.zeros((vocab,), weight.dtype) if bias is None else bias, (0, pad)).reshape(n, chunk)
    starts = jnp.arange(n) * chunk
    shape = targets.shape

    @jax.checkpoint
    def visit(carry, xs):
        top, total_exp, target_logit, logit_sum = carry
        w, b, start = xs
        logits = jnp.einsum("btd,dc->btc", features, w) + b
        real = (start + jnp.arange(chunk)) < vocab  # the last slice's padding is no word
        new_top = jnp.maximum(top, jnp.max(jnp.where(real, logits, -jnp.inf), axis=-1))
        exp = jnp.where(real, jnp.exp(logits - new_top[..., None]), 0.0)
        total_exp = total_exp * jnp.exp(top - new_top) + jnp.sum(exp, axis=-1)
        offset = targets - start
        here = (offset >= 0) & (offset < chunk)
        picked = jnp.take_along_axis(logits, jnp.clip(offset, 0, chunk - 1)[..., None], axis=-1)[..., 0]
        target_logit = target_logit + jnp.where(here, picked, 0.0)
        logit_sum = logit_sum + jnp.sum(jnp.where(real, logits, 0.0), axis=-1)
        return (new_top, total_exp, target_logit, logit_sum), None

    # A finite start for the running maximum: exp(start - max) is then an exact 0 with a zero
    # gradient, where -inf - (-inf) would be nan.
    zeros = jnp.zeros(shape, jnp.float32)
    init = (jnp.full(shape, -1e30, jnp.float32), zeros, zeros, zeros)
    (top, total_exp, target_logit, logit_sum), _ = jax.lax.scan(visit, init, (weights, biases, starts))
    log_normalizer = top + jnp.log(total_exp)
    nll = log_normalizer - target_logit
    if not label_smoothing:
        return nll
    mean_logp = logit_sum / vocab - log_normalizer
    return (1.0 - label_smoothing) * nll - label_smoothing * mean_logp
