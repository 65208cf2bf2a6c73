"""All embedding metrics of a global batch, sharded like the loss, and the single-device reference.

Nothing is gathered whole onto one device except the small things: each device holds its local
rows; the covariance is a psum of per-device partial sums of (X - mean)^T (X - mean) (d x d), and
the pairwise quantities score the local rows against the all-gathered columns (b x B per device,
as in the loss) and psum the partial sums. Only the d x d eigendecomposition runs replicated.
The result is a flat dict of float32 / int32 scalars plus the two spectra (`img_spectrum`,
`txt_spectrum`, d eigenvalues each); `split_spectra` separates them for the metric writer.

`logit_scale` is the logarithm of the logit multiplier (params["logit_scale"], as the losses take
it); `logit_bias` may be None; `keys` ([B] int, e.g. text_id or label) may be None, which drops
the collision metrics. Everything is traceable, so it can run inside the jitted train step.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from clipjax.metrics import geometry
from clipjax.metrics.collisions import collision_stats, collision_sums, same_key_mask
from clipjax.metrics.spectrum import HIGHEST, covariance, spectrum_metrics

MODALITIES = ("img", "txt")
SPECTRUM_KEYS = tuple(f"{m}_spectrum" for m in MODALITIES)


def _global_logsumexp(z: jax.Array, axes) -> jax.Array:
    """logsumexp over every entry of every device's block, shifted by the global max against underflow."""
    local = jax.nn.logsumexp(z)
    top = jax.lax.pmax(local, axes)
    return top + jnp.log(jax.lax.psum(jnp.exp(local - top), axes))


def _per_device(img, txt, logit_scale, logit_bias, *key_arrays, key_prefixes, axes, n):
    b = img.shape[0]
    psum = lambda v: jax.lax.psum(v, axes)
    pairs = n * (n - 1.0)
    rows = jax.lax.axis_index(axes) * b + jnp.arange(b)
    off = rows[:, None] != jnp.arange(n)[None, :]

    out, covs, means, gathered = {}, {}, {}, {}
    for name, x in zip(MODALITIES, (img, txt)):
        # Two passes (mean first, then centered products) rather than E[xx^T] - mu mu^T: near
        # collapse the mean dominates and the one-pass difference would cancel to noise.
        mean = psum(jnp.sum(x, axis=0)) / n
        centered = x - mean
        covs[name] = psum(jnp.matmul(centered.T, centered, precision=HIGHEST)) / n
        means[name] = mean

        all_x = jax.lax.all_gather(x, axes, tiled=True)
        gathered[name] = all_x
        gram = jnp.matmul(x, all_x.T, precision=HIGHEST)
        sq_rows = jnp.sum(x * x, axis=1)
        sq_cols = jnp.sum(all_x * all_x, axis=1)
        sq_dist = jnp.maximum(sq_rows[:, None] + sq_cols[None, :] - 2.0 * gram, 0.0)
        z = jnp.where(off, -geometry.UNIFORMITY_T * sq_dist, -jnp.inf)
        out[f"{name}_uniformity"] = _global_logsumexp(z, axes) - jnp.log(pairs)
        inv_rows = jax.lax.rsqrt(jnp.maximum(sq_rows, 1e-12))
        inv_cols = jax.lax.rsqrt(jnp.maximum(sq_cols, 1e-12))
        cos = gram * inv_rows[:, None] * inv_cols[None, :]  # one Gram serves both distances and cosines
        out[f"{name}_mean_cosine"] = psum(jnp.sum(jnp.where(off, cos, 0.0))) / pairs

    out["alignment"] = psum(jnp.sum(jnp.square(img - txt))) / n
    out["modality_gap"] = jnp.linalg.norm(means["img"] - means["txt"])

    z = jnp.exp(logit_scale) * jnp.matmul(img, gathered["txt"].T, precision=HIGHEST) + logit_bias
    out["logit_pos_mean"] = psum(jnp.sum(jnp.take_along_axis(z, rows[:, None], axis=1))) / n
    out["logit_neg_mean"] = psum(jnp.sum(jnp.where(off, z, 0.0))) / pairs
    out["logit_neg_max_mean"] = psum(jnp.sum(jnp.max(jnp.where(off, z, -jnp.inf), axis=1))) / n

    for prefix, keys in zip(key_prefixes, key_arrays):
        same = same_key_mask(keys, jax.lax.all_gather(keys, axes, tiled=True), off)
        out.update({prefix + k: psum(v) / n for k, v in collision_sums(same, z).items()})
    return out, (covs, means)


def embedding_metrics(
    img, txt, keys, logit_scale, logit_bias=None, *, mesh: Mesh, batch_axes: Sequence[str]
) -> dict[str, jax.Array]:
    """Metrics of the global batch; img/txt are [B, d] (keys [B]) sharded over batch_axes.

    `keys` may also be a dict {prefix: [B] keys}: collision metrics are computed for each, their
    names prefixed (e.g. {'': text_id, 'label_': label} gives `collision_frac` and
    `label_collision_frac`).
    """
    axes = tuple(batch_axes)
    n = img.shape[0]
    # Metrics only observe: keep them out of any surrounding grad (eigh's gradient is unstable
    # for the repeated eigenvalues of a collapsed spectrum).
    img, txt = (jax.lax.stop_gradient(jnp.asarray(x, jnp.float32)) for x in (img, txt))
    bias = jnp.zeros((), jnp.float32) if logit_bias is None else jnp.asarray(logit_bias, jnp.float32)
    operands = [img, txt, jnp.asarray(logit_scale, jnp.float32), bias]
    specs = [P(axes), P(axes), P(), P()]
    keyed = {} if keys is None else (dict(keys) if isinstance(keys, dict) else {"": keys})
    for key_array in keyed.values():
        operands.append(jnp.asarray(key_array, jnp.int32))
        specs.append(P(axes))

    def per_device(*args):
        return _per_device(*args, key_prefixes=tuple(keyed), axes=axes, n=n)

    out, (covs, means) = jax.shard_map(per_device, mesh=mesh, in_specs=tuple(specs), out_specs=P())(*operands)
    for name in MODALITIES:
        out.update(spectrum_metrics(covs[name], means[name], prefix=f"{name}_"))
    return out


def reference_embedding_metrics(img, txt, keys, logit_scale, logit_bias=None) -> dict[str, jax.Array]:
    """The same dict from full matrices on one device; the ground truth for tests."""
    img, txt = jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32)
    out = {}
    for name, x in zip(MODALITIES, (img, txt)):
        out.update(spectrum_metrics(*covariance(x), prefix=f"{name}_"))
        out[f"{name}_uniformity"] = geometry.uniformity(x)
        out[f"{name}_mean_cosine"] = geometry.mean_pairwise_cosine(x)
    out["alignment"] = geometry.alignment(img, txt)
    out["modality_gap"] = geometry.modality_gap(img, txt)
    out.update(geometry.logit_stats(img, txt, logit_scale, logit_bias))
    if keys is not None:
        out.update(collision_stats(img, txt, jnp.asarray(keys, jnp.int32), logit_scale, logit_bias))
    return out


def split_spectra(metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(scalars, spectra): the scalars go to metrics.jsonl / TensorBoard, the spectra to the plot."""
    scalars = {k: v for k, v in metrics.items() if k not in SPECTRUM_KEYS}
    spectra = {k: np.asarray(v) for k, v in metrics.items() if k in SPECTRUM_KEYS}
    return scalars, spectra
