"""Eigen-spectrum of an embedding matrix: effective rank (RankMe), power-law decay, dims for 99%.

Everything past `covariance` takes the d x d centered covariance or its eigenvalues rather than
the [N, d] samples, so that the sharded path (which builds the covariance from per-device partial
sums, see `embedding.py`) and the single-device reference share the same code from there on.
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
    """RankMe: exp(entropy of p), p = sigma / sum(sigma) over the singular values of the centered X.

    sigma_k = sqrt(N * eig_k); the factor sqrt(N) cancels in p. It is k for k equal singular values
    and 0 elsewhere, and 1 for data that has collapsed to a point (all sigma = 0, p = 0).
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


def spectrum_metrics(cov: jax.Array, prefix: str = "") -> dict[str, jax.Array]:
    """`{prefix}spectrum` (the d eigenvalues) and the scalars derived from it."""
    eigs = eigenvalues(cov)
    return {
        f"{prefix}spectrum": eigs,
        f"{prefix}effective_rank": effective_rank(eigs),
        f"{prefix}alpha": power_law_alpha(eigs),
        f"{prefix}dims_99": dims_for_variance(eigs, 0.99),
    }
