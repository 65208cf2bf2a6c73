"""The ring losses equal the gather form and the single-device reference, and stay within memory."""

import os
import subprocess
import sys

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
from clipjax.losses.blockwise import MAX_TILE_ELEMENTS, default_chunk, grad_temp_bytes
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


# (mesh shape, chunk): chunks equal to the per-device block (B / devices), smaller divisors, and
# widths that leave a narrower last tile (48 of 64, 5 of 32, 3 of 8).
CASES = [
    ((1,), 64),
    ((1,), 48),
    ((2,), 32),
    ((2,), 8),
    ((2,), 5),
    ((8,), 8),
    ((8,), 3),
    ((8,), 2),
    ((2, 4), None),
    ((2, 4), 4),
]


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


def test_chunk_must_be_positive():
    mesh, axes = _mesh((8,))
    img, txt = _embeddings(0)
    with pytest.raises(ValueError, match="chunk=0"):
        ring_infonce_loss(img, txt, 1.0, mesh=mesh, batch_axes=axes, chunk=0)


@pytest.mark.parametrize("dim", [64, 512])
def test_default_chunk_meets_its_documented_bounds(dim):
    for block in range(1, 5001):
        chunk = default_chunk(block, dim)
        limit = max(1, min(block, 4 * dim, MAX_TILE_ELEMENTS // block))
        tiles = -(-block // chunk)
        assert 1 <= chunk <= limit, (block, chunk)
        # The fewest tiles the caps allow, of equal width but for a last one short by < tiles columns.
        assert tiles == -(-block // limit), (block, chunk)
        assert tiles * chunk - block < tiles, (block, chunk)
    # A million examples on 8 devices: the 4M-logit cap holds (no floor overrides it).
    assert default_chunk(131_072, 512) * 131_072 <= MAX_TILE_ELEMENTS
    assert default_chunk(2_053, 512) == 2_053 // 2 + 1  # prime: two tiles, not 2,053 of one column


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


FOUR_MILLION_ON_32 = """
import jax
from jax.sharding import AxisType
from clipjax.losses import ring_infonce_loss, ring_sigmoid_loss
from clipjax.losses.blockwise import grad_temp_bytes

mesh = jax.make_mesh((32,), ("data",), axis_types=(AxisType.Auto,))
kw = dict(mesh=mesh, batch_axes=("data",))
losses = {
    "softmax": lambda i, t, s, b: ring_infonce_loss(i, t, s, **kw),
    "sigmoid": lambda i, t, s, b: ring_sigmoid_loss(i, t, s, b, **kw),
}
for name, loss in losses.items():
    print(name, grad_temp_bytes(loss, 4_194_304, 512, **kw))
"""


def test_ring_temp_memory_at_four_million_on_32_devices():
    """docs/large_batches.md's largest row: 2^22 examples, d 512, 32 devices, <= 1 GiB each.

    The device count is fixed when JAX starts, so this compiles in a fresh process."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=32", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", FOUR_MILLION_ON_32], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    temps = {name: int(n) for name, n in (line.split() for line in result.stdout.splitlines())}
    assert set(temps) == {"softmax", "sigmoid"}
    for name, temp in temps.items():
        assert temp <= 1024 * MiB, f"{name}: {temp / MiB:.0f} MiB"


@pytest.mark.parametrize("name", ["softmax", "sigmoid"])
def test_ring_sends_whole_blocks_not_tiles(name):
    """The travelling embeddings move a block per lap step (so the send can overlap the block's
    scoring), never a tile per tile: every collective_permute moves b rows."""
    mesh, axes = _mesh((8,))
    img, txt = _embeddings(0)
    block, chunk = B // 8, 3
    ring, _, _ = _losses(name, mesh, axes, chunk)
    text = jax.jit(jax.grad(ring, argnums=(0, 1, 2))).lower(img, txt, 2.0, -1.0).as_text()
    sends = [line for line in text.splitlines() if "collective_permute" in line]
    assert sends
    shapes = [line.rsplit("->", 1)[-1] for line in sends]
    assert all(f"tensor<{block}x" in s or f"tensor<{block}xf32>" in s for s in shapes), shapes
    assert not any(f"tensor<{chunk}x" in s for s in shapes), shapes
