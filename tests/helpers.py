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


def data_config(**overrides):
    """A complete `config.data` section (the schema's defaults) with dotted-key overrides.

    Decoding stays in the test's process unless `worker_count` is given: starting worker
    processes (the default, one per core) costs seconds per iterator on a test machine.
    """
    from clipjax.config import apply_overrides, default_config

    config = default_config()
    apply_overrides(config, {f"data.{k}": v for k, v in {"worker_count": 0, **overrides}.items()})
    return config.data


def source_and_tokenizer(data):
    """The prepared data source of a `config.data` section and its tokenizer."""
    from clipjax.data.sources import make_source

    source = make_source(data)
    source.prepare()
    return source, source.tokenizer()
