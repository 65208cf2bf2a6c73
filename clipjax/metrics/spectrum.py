"""Eigen-spectrum of an embedding matrix: effective rank (RankMe), power-law decay, dims for 99%.

Everything past `covariance` takes the d x d centered covariance (and the mean) or eigenvalues
rather than the [N, d] samples, so that the sharded path (which builds the covariance from
per-device partial sums, see `embedding.py`) and the single-device reference share the same code
from there on.

Two effective ranks are reported. `effective_rank` is RankMe as published (Garrido et al. 2023):
the singular values of the embeddings themselves, X = U S V^T, whose squares are N times the
eigenvalues of the second moment X^T X / N = C + mu mu^T. `effective_rank_centered` uses the
centered X - mu instead (the eigenvalues of C): it ignores the shared offset of all embeddings
(the "cone" of contrastive models) and so shows the spread around it. The spectrum, alpha and
dims_99 describe the centered covariance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import entr

# On GPUs the default float32 matmul may run in TF32 (about 1e-3 relative error), which would
# bury the tail of the spectrum; these matmuls are small, so pay for full precision.
HIGHEST = jax.lax.Precision.HIGHEST

# Eigenvalues below this fraction of the largest are left out of the power-law fit: float32
# rounding of the covariance and of eigh is about 1e-6 of the largest eigenvalue, and a fit
# reaching into that noise floor would flatten the slope.
ALPHA_REL_FLOOR = 1e-4
# Second-moment eigenvalues below this fraction of the largest count as zero in RankMe.
RANK_REL_FLOOR = 1e-6


def covariance(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(X - mean)^T (X - mean) / N for [N, d] rows, and the mean; float32."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=0)
    centered = x - mean
    return jnp.matmul(centered.T, centered, precision=HIGHEST) / x.shape[0], mean


def eigenvalues(cov: jax.Array) -> jax.Array:
    """Eigenvalues of a covariance, descending, clipped at 0 (rounding leaves the null space slightly negative)."""
    # eigh reads one triangle only; sums accumulated in different orders leave C a few ulps off
    # symmetric, and symmetrising makes the result independent of which triangle that is.
    cov = 0.5 * (cov + cov.T)
    return jnp.maximum(jnp.linalg.eigvalsh(cov)[::-1], 0.0)


def effective_rank(eigs: jax.Array, eps: float = 1e-12) -> jax.Array:
    """exp(entropy of p), p = sigma / sum(sigma), over singular values sigma_k = sqrt(N * eig_k)
    of the matrix whose X^T X / N has eigenvalues `eigs` (the factor sqrt(N) cancels in p).

    It is k for k equal singular values and 0 elsewhere, and 1 when every sigma is 0.
    """
    sigma = jnp.sqrt(eigs)
    p = sigma / (jnp.sum(sigma) + eps)
    return jnp.exp(jnp.sum(entr(p)))


def power_law_alpha(eigs: jax.Array, rel_floor: float = ALPHA_REL_FLOOR) -> jax.Array:
    """Decay exponent a of eig_k ~ k^-a: minus the least-squares slope of log eig_k on log k.

    The fit uses k = 1..K, the leading eigenvalues with eig_k >= rel_floor * eig_1 (a prefix,
    since eigs is descending). a > 0 for a decaying spectrum, 0 for a flat one; 0 is also returned
    when fewer than two eigenvalues qualify (collapsed data), where the slope is undefined.
    """
    k = jnp.arange(1, eigs.shape[0] + 1, dtype=jnp.float32)
    use = (eigs > 0) & (eigs >= rel_floor * eigs[0])
    w = use.astype(jnp.float32)
    x = jnp.log(k)
    y = jnp.log(jnp.where(use, eigs, 1.0))
    count = jnp.maximum(jnp.sum(w), 1.0)
    dx = x - jnp.sum(w * x) / count
    dy = y - jnp.sum(w * y) / count
    sxx = jnp.sum(w * dx * dx)
    sxy = jnp.sum(w * dx * dy)
    return jnp.where(sxx > 0, -sxy / jnp.where(sxx > 0, sxx, 1.0), 0.0)


def dims_for_variance(eigs: jax.Array, fraction: float = 0.99) -> jax.Array:
    """Number of leading eigenvalues whose sum reaches `fraction` of the total variance (int32)."""
    cum = jnp.cumsum(eigs)
    needed = jnp.sum(cum < fraction * cum[-1]) + 1
    return jnp.minimum(needed, eigs.shape[0]).astype(jnp.int32)


def spectrum_metrics(cov: jax.Array, mean: jax.Array, prefix: str = "") -> dict[str, jax.Array]:
    """`{prefix}spectrum` (the d eigenvalues of the centered covariance `cov`) and the scalars
    derived from it; RankMe from the second moment cov + mean mean^T (module docstring)."""
    eigs = eigenvalues(cov)
    raw = eigenvalues(cov + jnp.outer(mean, mean))
    # float32 rounding leaves ~1e-7 of the largest eigenvalue in the null space, and the square
    # root in RankMe would turn that into visible mass: a point cloud collapsed to one point
    # would read 1.005 rather than 1.
    raw = jnp.where(raw >= RANK_REL_FLOOR * raw[0], raw, 0.0)
    return {
        f"{prefix}spectrum": eigs,
        f"{prefix}effective_rank": effective_rank(raw),
        f"{prefix}effective_rank_centered": effective_rank(eigs),
        f"{prefix}alpha": power_law_alpha(eigs),
        f"{prefix}dims_99": dims_for_variance(eigs, 0.99),
    }
