"""Small helpers shared by the tests."""
import jax
import jax.numpy as jnp
import numpy as np


def paired_unit_embeddings(seed, n, d):
    """[n, d] image and text embeddings, unit norm, correlated pair by pair so the loss is informative."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    img = jax.random.normal(k1, (n, d))
    txt = img + 0.7 * jax.random.normal(k2, (n, d))
    norm = lambda x: x / jnp.linalg.norm(x, axis=1, keepdims=True)
    return norm(img), norm(txt)


def rel_err(a, b):
    """Largest absolute difference relative to the largest magnitude of the reference b."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)
