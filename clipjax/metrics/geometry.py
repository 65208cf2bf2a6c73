"""Geometry of paired embeddings on one device (full matrices): the reference for `embedding.py`.

Alignment and uniformity follow Wang & Isola (2020) and assume unit-norm rows, which is what the
towers return; they are computed on the inputs as given. Rows i of `img` and `txt` are a pair.
`logit_scale` is the logarithm of the logit multiplier, as stored in params and taken by the
losses; `logit_bias` may be None (the softmax loss has none).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from clipjax.metrics.spectrum import HIGHEST

UNIFORMITY_T = 2.0


def _off_diagonal(n: int) -> jax.Array:
    return ~jnp.eye(n, dtype=bool)


def squared_distances(x: jax.Array, y: jax.Array) -> jax.Array:
    """||x_i - y_j||^2 for all pairs, through the Gram matrix (clipped at 0 against rounding)."""
    gram = jnp.matmul(x, y.T, precision=HIGHEST)
    sq = jnp.sum(x * x, axis=1)[:, None] + jnp.sum(y * y, axis=1)[None, :] - 2.0 * gram
    return jnp.maximum(sq, 0.0)


def logits(img: jax.Array, txt: jax.Array, logit_scale, logit_bias=None) -> jax.Array:
    """exp(logit_scale) * img @ txt.T (+ bias): rows images, columns texts, as in the losses."""
    out = jnp.exp(logit_scale) * jnp.matmul(img, txt.T, precision=HIGHEST)
    return out if logit_bias is None else out + logit_bias


def alignment(img: jax.Array, txt: jax.Array) -> jax.Array:
    """Mean over pairs of ||img_i - txt_i||^2 (0 when every pair coincides)."""
    return jnp.mean(jnp.sum(jnp.square(img - txt), axis=1))


def uniformity(x: jax.Array, t: float = UNIFORMITY_T) -> jax.Array:
    """log mean over i != j of exp(-t ||x_i - x_j||^2): 0 when all points coincide, more negative when spread."""
    n = x.shape[0]
    z = jnp.where(_off_diagonal(n), -t * squared_distances(x, x), -jnp.inf)
    return jax.nn.logsumexp(z) - jnp.log(n * (n - 1.0))


def modality_gap(img: jax.Array, txt: jax.Array) -> jax.Array:
    """Distance between the image and the text centroids."""
    return jnp.linalg.norm(jnp.mean(img, axis=0) - jnp.mean(txt, axis=0))


def mean_pairwise_cosine(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Mean cosine similarity over i != j (rows are normalised here, so any norm is fine)."""
    n = x.shape[0]
    u = x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=1, keepdims=True), eps))
    cos = jnp.matmul(u, u.T, precision=HIGHEST)
    return jnp.sum(jnp.where(_off_diagonal(n), cos, 0.0)) / (n * (n - 1.0))


def logit_stats(img: jax.Array, txt: jax.Array, logit_scale, logit_bias=None) -> dict[str, jax.Array]:
    """Positive logits (diagonal) and negative logits (off-diagonal) of the image -> text matrix."""
    z = logits(img, txt, logit_scale, logit_bias)
    n = z.shape[0]
    off = _off_diagonal(n)
    return {
        "logit_pos_mean": jnp.mean(jnp.diagonal(z)),
        "logit_neg_mean": jnp.sum(jnp.where(off, z, 0.0)) / (n * (n - 1.0)),
        # The hardest negative of each image, averaged: how close the loss is to confusing pairs.
        "logit_neg_max_mean": jnp.mean(jnp.max(jnp.where(off, z, -jnp.inf), axis=1)),
    }
