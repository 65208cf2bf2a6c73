"""The captioning loss of a model with a decoder (CoCa, LocCa): teacher-forced next-token
cross-entropy, averaged over the real target tokens of the whole global batch.

Why a mean over tokens of the global batch rather than of each micro-batch or device: it is the
loss of the un-split batch, so the gradients are those of one device seeing everything, whatever
the mesh and `microbatches` (a micro-batch contributes its sum; the count is the batch's). The
pad id (0) is never a target; the tokenizers end each caption with eos, which is one, so the
decoder learns where to stop.

Label smoothing (`loss.label_smoothing` = e) takes (1 - e) of the target's negative
log-probability and e of the mean over the vocabulary, as in the usual definition.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from clipjax.models.text import PAD_ID
from clipjax.schema import Field


def _smoothing(value) -> str | None:
    return None if 0.0 <= value < 1.0 else "expected a number in [0, 1)"


# Joined to `config.loss` (read only with a `model.decoder`).
FIELDS = {
    "caption_weight": Field(
        2.0, "with model.decoder: weight of the captioning cross-entropy (CoCa: 2)", minimum=0.0
    ),
    "contrastive_weight": Field(
        1.0, "weight of the contrastive objective (loss.name) beside a captioning loss", minimum=0.0
    ),
    "label_smoothing": Field(
        0.0, "with model.decoder: label smoothing of the captioning loss", check=_smoothing
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


def caption_loss_sum(logits: jax.Array, tokens: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Sum of the cross-entropy over the real targets of `tokens` ([B, L]; logits [B, L - 1, V])."""
    targets, mask = caption_targets(tokens)
    return jnp.sum(token_cross_entropy(logits, targets, label_smoothing) * mask)


def caption_token_count(tokens: jax.Array) -> jax.Array:
    """The number of real targets in `tokens`: what `caption_loss_sum` is divided by."""
    return jnp.sum(caption_targets(tokens)[1])
