"""Contrastive losses over the global batch, computed inside `jax.shard_map`.

Each device holds its local slice of the image and text embeddings. It all-gathers the other
side's embeddings so that every local row is scored against every column of the global batch:
the logits held per device are b x B (local rows, global columns), never B x B. The per-device
partial sums are `psum`-ed, so the loss returned is the global loss on every device and its
gradient (taken outside the shard_map) equals a single-device computation on the whole batch:
the transpose of `all_gather` is a reduce-scatter that routes each column's gradient back to the
device that owns that embedding.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P


def softmax_rows_loss(logits: jax.Array, positive_col: jax.Array) -> jax.Array:
    """Sum over rows of -log softmax(logits)[row, positive_col[row]]."""
    lse = jax.nn.logsumexp(logits, axis=1)
    pos = jnp.take_along_axis(logits, positive_col[:, None], axis=1)[:, 0]
    return jnp.sum(lse - pos)


def sigmoid_pairs_loss(logits: jax.Array, positive_col: jax.Array) -> jax.Array:
    """Sum over all (row, col) of -log sigmoid(z * logit), z = +1 on the positive, else -1."""
    cols = jnp.arange(logits.shape[1])
    z = jnp.where(cols[None, :] == positive_col[:, None], 1.0, -1.0)
    return -jnp.sum(jax.nn.log_sigmoid(z * logits))


def reference_infonce_loss(img, txt, logit_scale):
    """Single-device symmetric InfoNCE (CLIP) on the full batch; the ground truth for tests."""
    logits = jnp.exp(logit_scale) * img @ txt.T
    labels = jnp.arange(img.shape[0])
    return (softmax_rows_loss(logits, labels) + softmax_rows_loss(logits.T, labels)) / (2 * img.shape[0])


def reference_sigmoid_loss(img, txt, logit_scale, logit_bias):
    """Single-device SigLIP loss on the full batch, normalised by the batch size as in the paper."""
    logits = jnp.exp(logit_scale) * img @ txt.T + logit_bias
    return sigmoid_pairs_loss(logits, jnp.arange(img.shape[0])) / img.shape[0]


def _local_infonce_sum(img, txt, logit_scale, axes, precision):
    b = img.shape[0]
    all_img = jax.lax.all_gather(img, axes, tiled=True)
    all_txt = jax.lax.all_gather(txt, axes, tiled=True)
    scale = jnp.exp(logit_scale)
    positive_col = jax.lax.axis_index(axes) * b + jnp.arange(b)
    i2t = softmax_rows_loss(scale * jnp.matmul(img, all_txt.T, precision=precision), positive_col)
    t2i = softmax_rows_loss(scale * jnp.matmul(txt, all_img.T, precision=precision), positive_col)
    return i2t + t2i


def _local_sigmoid_sum(img, txt, logit_scale, logit_bias, axes, precision):
    b = img.shape[0]
    # Rows are local images, columns the global texts: every (image, text) pair of the global
    # batch lands on exactly one device, so one direction covers the whole matrix.
    all_txt = jax.lax.all_gather(txt, axes, tiled=True)
    positive_col = jax.lax.axis_index(axes) * b + jnp.arange(b)
    logits = jnp.exp(logit_scale) * jnp.matmul(img, all_txt.T, precision=precision) + logit_bias
    return sigmoid_pairs_loss(logits, positive_col)


def global_infonce_loss(
    img, txt, logit_scale, *, mesh: Mesh, batch_axes: Sequence[str], precision=jax.lax.Precision.HIGHEST
):
    """Symmetric InfoNCE over the global batch; img/txt are [B, d] arrays sharded over batch_axes.

    `precision` of the logit matmuls (and, through autodiff, of their gradients): see
    `clipjax.losses.registry.PRECISIONS`."""
    axes = tuple(batch_axes)
    global_batch = img.shape[0]

    def per_device(img, txt, logit_scale):
        return jax.lax.psum(_local_infonce_sum(img, txt, logit_scale, axes, precision), axes) / (
            2 * global_batch
        )

    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P(axes), P(axes), P()),
        out_specs=P(),
    )(img.astype(jnp.float32), txt.astype(jnp.float32), logit_scale)


def global_sigmoid_loss(
    img,
    txt,
    logit_scale,
    logit_bias,
    *,
    mesh: Mesh,
    batch_axes: Sequence[str],
    precision=jax.lax.Precision.HIGHEST,
):
    """SigLIP loss over the global batch (every image against every text of all devices)."""
    axes = tuple(batch_axes)
    global_batch = img.shape[0]

    def per_device(img, txt, logit_scale, logit_bias):
        return (
            jax.lax.psum(_local_sigmoid_sum(img, txt, logit_scale, logit_bias, axes, precision), axes)
            / global_batch
        )

    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P(axes), P(axes), P(), P()),
        out_specs=P(),
    )(img.astype(jnp.float32), txt.astype(jnp.float32), logit_scale, logit_bias)


def alignment_only_loss(img, txt):
    """Mean squared distance of positive pairs, with no negatives at all.

    An ablation, not a training objective: without negatives nothing keeps the embeddings
    apart, and they collapse. Used to show (and test) the collapse alarm.
    """
    return jnp.mean(jnp.sum(jnp.square(img - txt), axis=-1))
