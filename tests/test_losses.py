"""Sharded losses equal the single-device full-batch computation, gradients included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from clipjax.losses import (
    global_infonce_loss,
    global_sigmoid_loss,
    reference_infonce_loss,
    reference_sigmoid_loss,
)
from tests.helpers import paired_unit_embeddings, rel_err

B, D = 64, 16


def _embeddings(seed):
    return paired_unit_embeddings(seed, B, D)


@pytest.mark.parametrize("shape", [(8, 1), (2, 4), (1, 8)])
@pytest.mark.parametrize("loss_name", ["softmax", "sigmoid"])
def test_sharded_loss_and_grads_equal_single_device(shape, loss_name):
    mesh = jax.make_mesh(shape, ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    img, txt = _embeddings(0)
    scale, bias = jnp.float32(2.3), jnp.float32(-3.7)
    batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
    img_s, txt_s = jax.device_put(img, batch_sharding), jax.device_put(txt, batch_sharding)

    if loss_name == "softmax":
        sharded = lambda i, t, s, b: global_infonce_loss(i, t, s, mesh=mesh, batch_axes=("data", "fsdp"))
        reference = lambda i, t, s, b: reference_infonce_loss(i, t, s)
    else:
        sharded = lambda i, t, s, b: global_sigmoid_loss(i, t, s, b, mesh=mesh, batch_axes=("data", "fsdp"))
        reference = reference_sigmoid_loss

    argnums = (0, 1, 2, 3)
    loss_s, grads_s = jax.jit(jax.value_and_grad(sharded, argnums))(img_s, txt_s, scale, bias)
    with jax.default_device(jax.devices()[0]):
        loss_r, grads_r = jax.jit(jax.value_and_grad(reference, argnums))(img, txt, scale, bias)

    assert rel_err(loss_s, loss_r) <= 1e-5
    for gs, gr in zip(grads_s, grads_r):
        if loss_name == "softmax" and gr.ndim == 0 and float(gr) == 0.0:
            continue  # the bias does not enter InfoNCE
        assert rel_err(gs, gr) <= 1e-5
    # The embedding gradients come back sharded like the embeddings: each device owns its rows.
    assert grads_s[0].sharding.is_equivalent_to(batch_sharding, 2)


def test_reference_infonce_matches_numpy():
    img, txt = _embeddings(1)
    scale = 1.5
    logits = np.exp(scale) * np.asarray(img, np.float64) @ np.asarray(txt, np.float64).T

    def ce(z):
        z = z - z.max(1, keepdims=True)
        return np.mean(np.log(np.exp(z).sum(1)) - np.diag(z))

    expected = 0.5 * (ce(logits) + ce(logits.T))
    np.testing.assert_allclose(float(reference_infonce_loss(img, txt, scale)), expected, rtol=1e-5)


def test_reference_sigmoid_matches_numpy():
    img, txt = _embeddings(2)
    scale, bias = 2.0, -5.0
    logits = np.exp(scale) * np.asarray(img, np.float64) @ np.asarray(txt, np.float64).T + bias
    z = 2 * np.eye(B) - 1
    expected = np.sum(np.log1p(np.exp(-z * logits))) / B
    np.testing.assert_allclose(float(reference_sigmoid_loss(img, txt, scale, bias)), expected, rtol=1e-5)
