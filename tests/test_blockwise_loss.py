"""The ring losses equal the gather form and the single-device reference, and stay within memory."""

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
    ring_infonce_loss,
    ring_sigmoid_loss,
)
from clipjax.losses.blockwise import default_chunk, grad_temp_bytes
from tests.helpers import paired_unit_embeddings, rel_err

B, D = 64, 16
# Neither value is a round number, so a temperature or bias gradient that is off by a factor
# (the scale instead of its log, a missing bias term) cannot pass by accident.
LOGIT_SCALE, LOGIT_BIAS = 2.7, -6.3
MiB = 2**20


def _embeddings(seed):
    return paired_unit_embeddings(seed, B, D)


def _mesh(shape):
    names = ("data", "fsdp")[: len(shape)]
    devices = jax.devices()[: int(np.prod(shape))]
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape), devices=devices), names


def _losses(loss_name, mesh, axes, chunk):
    """(ring, gather, reference), all as f(img, txt, logit_scale, logit_bias)."""
    if loss_name == "softmax":
        ring = lambda i, t, s, b: ring_infonce_loss(i, t, s, mesh=mesh, batch_axes=axes, chunk=chunk)
        gather = lambda i, t, s, b: global_infonce_loss(i, t, s, mesh=mesh, batch_axes=axes)
        return ring, gather, lambda i, t, s, b: reference_infonce_loss(i, t, s)
    ring = lambda i, t, s, b: ring_sigmoid_loss(i, t, s, b, mesh=mesh, batch_axes=axes, chunk=chunk)
    gather = lambda i, t, s, b: global_sigmoid_loss(i, t, s, b, mesh=mesh, batch_axes=axes)
    return ring, gather, reference_sigmoid_loss


# (mesh shape, chunk): chunks equal to the per-device block (B / devices) and smaller ones.
CASES = [((1,), 64), ((2,), 32), ((2,), 8), ((8,), 8), ((8,), 2), ((2, 4), None), ((2, 4), 4)]


def _check_against_gather_and_reference(loss_name, mesh, axes, chunk, logit_scale, logit_bias):
    img, txt = _embeddings(0)
    scale, bias = jnp.float32(logit_scale), jnp.float32(logit_bias)
    rows = NamedSharding(mesh, P(axes))
    img_s, txt_s = jax.device_put(img, rows), jax.device_put(txt, rows)
    ring, gather, reference = _losses(loss_name, mesh, axes, chunk)

    argnums = (0, 1, 2, 3)
    loss_ring, grads_ring = jax.jit(jax.value_and_grad(ring, argnums))(img_s, txt_s, scale, bias)
    loss_gather, grads_gather = jax.jit(jax.value_and_grad(gather, argnums))(img_s, txt_s, scale, bias)
    with jax.default_device(jax.devices()[0]):
        loss_ref, grads_ref = jax.jit(jax.value_and_grad(reference, argnums))(img, txt, scale, bias)

    for expected in (loss_gather, loss_ref):
        assert rel_err(loss_ring, expected) <= 1e-5
    names = ("img", "txt", "logit_scale", "logit_bias")
    for name, g_ring, g_gather, g_ref in zip(names, grads_ring, grads_gather, grads_ref):
        if loss_name == "softmax" and name == "logit_bias":
            assert float(g_ring) == 0.0  # the bias does not enter InfoNCE
            continue
        assert rel_err(g_ring, g_gather) <= 1e-5, name
        assert rel_err(g_ring, g_ref) <= 1e-5, name
    # Gradients of remote blocks made it home: each device owns its rows' gradients.
    assert grads_ring[0].sharding.is_equivalent_to(rows, 2)
    assert grads_ring[1].sharding.is_equivalent_to(rows, 2)


@pytest.mark.parametrize("shape,chunk", CASES)
@pytest.mark.parametrize("loss_name", ["softmax", "sigmoid"])
def test_ring_equals_gather_and_reference(shape, chunk, loss_name):
    mesh, axes = _mesh(shape)
    _check_against_gather_and_reference(loss_name, mesh, axes, chunk, LOGIT_SCALE, LOGIT_BIAS)


@pytest.mark.parametrize("loss_name", ["softmax", "sigmoid"])
def test_ring_at_the_temperature_cap_with_a_model_axis(loss_name):
    # Scale 100 (CLIP's cap) puts logits near 100, where float32 rounding is largest; the
    # embeddings are replicated over 'model', which the ring must leave alone.
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    _check_against_gather_and_reference(loss_name, mesh, ("data",), 4, np.log(100.0), 3.1)


def test_ring_loss_without_gradient_and_in_bfloat16():
    mesh, axes = _mesh((8,))
    img, txt = _embeddings(3)
    rows = NamedSharding(mesh, P(axes))
    img_s, txt_s = (jax.device_put(x.astype(jnp.bfloat16), rows) for x in (img, txt))
    loss = lambda i, t: ring_infonce_loss(i, t, LOGIT_SCALE, mesh=mesh, batch_axes=axes)
    value = jax.jit(loss)(img_s, txt_s)
    expected = reference_infonce_loss(
        img.astype(jnp.bfloat16).astype(jnp.float32),
        txt.astype(jnp.bfloat16).astype(jnp.float32),
        LOGIT_SCALE,
    )
    assert rel_err(value, expected) <= 1e-5


def test_chunk_must_divide_the_local_block():
    mesh, axes = _mesh((8,))
    img, txt = _embeddings(0)
    with pytest.raises(ValueError, match="chunk=3"):
        ring_infonce_loss(img, txt, 1.0, mesh=mesh, batch_axes=axes, chunk=3)
    assert default_chunk(8192, 512) == 512 and default_chunk(131072, 512) == 128
    assert default_chunk(1024, 256) == 1024 and default_chunk(8, 16) == 8 and default_chunk(96, 512) == 96


@pytest.mark.parametrize("global_batch,limit", [(65_536, 128 * MiB), (1_048_576, 1024 * MiB)])
def test_ring_temp_memory_at_scale(global_batch, limit):
    # Compiled only: the gather form needs about 6 GiB per device at 65,536 already.
    mesh, axes = _mesh((8,))
    for loss_name in ("softmax", "sigmoid"):
        ring, _, _ = _losses(loss_name, mesh, axes, None)
        temp = grad_temp_bytes(ring, global_batch, 512, mesh=mesh, batch_axes=axes)
        assert temp <= limit, f"{loss_name}: {temp / MiB:.0f} MiB"


@pytest.mark.parametrize("impl", ["gather", "ring"])
@pytest.mark.parametrize("name", ["softmax", "sigmoid"])
def test_loss_matmuls_carry_the_configured_precision(impl, name):
    """Forward and backward logit matmuls are HIGHEST by default (on TPU/GPU the default would be
    bf16/TF32 passes); `default` leaves them to the backend. CPUs compute float32 exactly either
    way, so what is checked is the compiled program's request, in the lowered StableHLO."""
    from clipjax.losses import contrastive_loss

    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    img, txt = paired_unit_embeddings(0, 64, 16)

    def program(precision):
        def loss(i, t, s, b):
            return contrastive_loss(
                name, i, t, s, b, mesh=mesh, batch_axes=("data",), impl=impl, precision=precision
            )

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
        return grad.lower(img, txt, jnp.float32(2.0), jnp.float32(-1.0)).as_text()

    highest, default = program("highest"), program("default")
    dots = [line for line in highest.splitlines() if "stablehlo.dot_general" in line]
    assert len(dots) >= 3  # the forward logits and both gradient products
    assert all("HIGHEST" in line for line in dots), [line for line in dots if "HIGHEST" not in line]
    assert "HIGHEST" not in default
