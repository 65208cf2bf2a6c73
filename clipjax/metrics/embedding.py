"""All embedding metrics of a global batch, sharded like the loss, in O(B) memory; and the
single-device reference.

Each device holds its local rows, and nothing of size B x B (or b x B) is ever built: the
metrics that need all pairs run one lap of the ring the losses use (`clipjax.parallel.ring`,
b x chunk tiles, column blocks travelling), the others have closed forms over O(d) sums.
Every metric is exact (no subsampling); how each is computed:

| metric | computed |
| --- | --- |
| `*_spectrum`, `*_effective_rank*`, `*_alpha`, `*_dims_99` | d x d covariance and mean, psum of per-device sums; eigh replicated |
| `alignment`, `modality_gap` | per-row and mean sums, psum |
| `*_mean_cosine` | closed form: sum_{i != j} u_i . u_j = ||sum_i u_i||^2 - sum_i ||u_i||^2 (u = unit rows) |
| `logit_pos_mean` | the local diagonal, psum |
| `logit_neg_mean` | closed form: all pairs s <sum img, sum txt> + B^2 bias, minus the diagonal |
| `*_uniformity` | ring lap, online log-sum-exp per row of -t ||x_i - x_j||^2 (i != j), combined over devices |
| `logit_neg_max_mean` | ring lap, running max per row over the off-diagonal logits |
| `*collision_*` | ring lap: same-key counts per row, and the row softmax's same-key mass from a running max, sum and same-key sum |

Two laps run one after the other (images visiting, then texts with the keys), so at most two
column blocks (the one scored, the one in flight) are live, as in the loss.

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
from clipjax.metrics.collisions import collision_stats
from clipjax.metrics.spectrum import HIGHEST, covariance, spectrum_metrics
from clipjax.parallel.ring import after, ring_pass, ring_size, varying

MODALITIES = ("img", "txt")
SPECTRUM_KEYS = tuple(f"{m}_spectrum" for m in MODALITIES)
# A tile of pairwise values holds at most this many entries (16 MiB in float32).
MAX_TILE_ELEMENTS = 2**22


def _tile_width(block: int, dim: int) -> int:
    return max(1, min(block, 4 * dim, MAX_TILE_ELEMENTS // max(block, 1)))


def _safe_max(m):
    # A row whose tiles so far were all masked (the diagonal alone) has max -inf; shifting by
    # it would give exp(-inf + inf) = nan.
    return jnp.where(jnp.isneginf(m), 0.0, m)


def _online(running_max, running_sums, z, weights):
    """Fold a tile into a row's running max and sums of exp(z - max), one sum per weight mask."""
    new_max = jnp.maximum(running_max, jnp.max(z, axis=1))
    shift = _safe_max(new_max)
    decay = jnp.exp(running_max - shift)
    e = jnp.exp(z - shift[:, None])
    sums = tuple(
        s * decay + jnp.sum(e if w is None else jnp.where(w, e, 0.0), axis=1)
        for s, w in zip(running_sums, weights)
    )
    return new_max, sums


def _global_lse(row_max, row_sum, axes):
    """log sum over every row of every device of row_sum * exp(row_max)."""
    top = jax.lax.pmax(jnp.max(row_max), axes)
    shift = _safe_max(top)
    return shift + jnp.log(jax.lax.psum(jnp.sum(row_sum * jnp.exp(row_max - shift)), axes))


def _sq_dist(rows, cols, row_sq):
    gram = jnp.matmul(rows, cols.T, precision=HIGHEST)
    return jnp.maximum(row_sq[:, None] + jnp.sum(cols * cols, axis=1)[None, :] - 2.0 * gram, 0.0)


def _per_device(img, txt, logit_scale, logit_bias, *key_arrays, key_prefixes, axes, n, size):
    b, d = img.shape
    chunk = _tile_width(b, d)
    psum = lambda v: jax.lax.psum(v, axes)
    pairs = n * (n - 1.0)
    out, covs, means, sums = {}, {}, {}, {}
    for name, x in zip(MODALITIES, (img, txt)):
        # Two passes (mean first, then centered products) rather than E[xx^T] - mu mu^T: near
        # collapse the mean dominates and the one-pass difference would cancel to noise.
        mean = psum(jnp.sum(x, axis=0)) / n
        centered = x - mean
        covs[name] = psum(jnp.matmul(centered.T, centered, precision=HIGHEST)) / n
        means[name] = mean
        sums[name] = psum(jnp.sum(x, axis=0))
        u = x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=1, keepdims=True), 1e-12))
        total = psum(jnp.sum(u, axis=0))
        out[f"{name}_mean_cosine"] = (jnp.dot(total, total, precision=HIGHEST) - psum(jnp.sum(u * u))) / pairs

    out["alignment"] = psum(jnp.sum(jnp.square(img - txt))) / n
    out["modality_gap"] = jnp.linalg.norm(means["img"] - means["txt"])
    scale = jnp.exp(logit_scale)
    positives = psum(jnp.sum(scale * jnp.sum(img * txt, axis=1) + logit_bias))
    out["logit_pos_mean"] = positives / n
    every_pair = scale * jnp.dot(sums["img"], sums["txt"], precision=HIGHEST) + float(n) * n * logit_bias
    out["logit_neg_mean"] = (every_pair - positives) / pairs

    t = geometry.UNIFORMITY_T
    no_max = varying(jnp.full((b,), -jnp.inf, img.dtype), axes)
    zeros = varying(jnp.zeros((b,), img.dtype), axes)
    img_sq, txt_sq = jnp.sum(img * img, axis=1), jnp.sum(txt * txt, axis=1)

    def images_visiting(tile, carried, acc, positive):
        (x,) = tile
        z = jnp.where(positive, -jnp.inf, -t * _sq_dist(img, x, img_sq))
        row_max, (row_sum,) = _online(acc[0], acc[1:], z, (None,))
        return carried, (row_max, row_sum)

    (u_max, u_sum), _ = ring_pass(images_visiting, (no_max, zeros), (img,), axes=axes, size=size, chunk=chunk)
    out["img_uniformity"] = _global_lse(u_max, u_sum, axes) - jnp.log(pairs)

    def texts_visiting(tile, carried, acc, positive):
        y, *col_keys = tile
        (u_max, u_sum), neg_max, (l_max, l_sums), counts = acc
        z = jnp.where(positive, -jnp.inf, -t * _sq_dist(txt, y, txt_sq))
        u_max, (u_sum,) = _online(u_max, (u_sum,), z, (None,))
        logits = scale * jnp.matmul(img, y.T, precision=HIGHEST) + logit_bias
        neg_max = jnp.maximum(neg_max, jnp.max(jnp.where(positive, -jnp.inf, logits), axis=1))
        same = [
            (row_keys[:, None] == keys[None, :]) & (row_keys[:, None] >= 0) & ~positive
            for row_keys, keys in zip(key_arrays, col_keys)
        ]
        # One running softmax per row over every text of the batch (the diagonal included, as the
        # loss's image -> text distribution), with the same-key share summed alongside.
        l_max, l_sums = _online(l_max, l_sums, logits, (None, *same))
        counts = tuple(c + jnp.sum(s, axis=1).astype(c.dtype) for c, s in zip(counts, same))
        return carried, ((u_max, u_sum), neg_max, (l_max, l_sums), counts)

    k = len(key_arrays)
    acc = ((no_max, zeros), no_max, (no_max, (zeros,) * (k + 1)), (zeros,) * k)
    # After the first lap: the laps are independent and would otherwise run (and hold) together.
    visiting = (after(txt, out["img_uniformity"]), *key_arrays)
    ((u_max, u_sum), neg_max, (_, l_sums), counts), _ = ring_pass(
        texts_visiting, acc, visiting, axes=axes, size=size, chunk=chunk
    )
    out["txt_uniformity"] = _global_lse(u_max, u_sum, axes) - jnp.log(pairs)
    out["logit_neg_max_mean"] = psum(jnp.sum(neg_max)) / n
    for prefix, count, same_sum in zip(key_prefixes, counts, l_sums[1:]):
        out[prefix + "collision_count_mean"] = psum(jnp.sum(count)) / n
        out[prefix + "collision_frac"] = psum(jnp.sum((count > 0).astype(jnp.float32))) / n
        out[prefix + "collision_prob_mass"] = psum(jnp.sum(same_sum / l_sums[0])) / n
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
        return _per_device(*args, key_prefixes=tuple(keyed), axes=axes, n=n, size=ring_size(mesh, axes))

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
