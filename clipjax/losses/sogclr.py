"""SogCLR (Yuan et al. 2022): a small batch's negatives standing in for the whole dataset's.

InfoNCE's row loss log(1 + N g_i), with g_i = (1/N) sum_{j neg} exp(l_ij - l_ii), is a biased
estimate of the loss against all of the data unless N is large: log of a batch mean is not the
mean of the log. SogCLR keeps, for every example of the dataset, a moving average u_i of its
g_i across the steps that visit it,

    u_i <- (1 - gamma) u_i + gamma g_i        (u_i <- g_i on the first visit)

and follows the gradient of sum_i g_i / u_i, u_i held constant: grad log g_i with the batch's
noisy g_i in the denominator replaced by the smoother u_i. So batch 256 trains like a much
larger batch (the paper: 69.3 vs SimCLR's 66.5 linear eval at 8,192, ResNet-50 on ImageNet).

The state is one u per anchor direction (image and text anchors in image-text mode, the two
views in image-image mode): `log_u` [2, N_padded], float32, -inf where never visited. It is
kept in log space because l_ij - l_ii reaches 2 exp(logit_scale) = 200 at CLIP's temperature
cap, where exp overflows float32: log g_i = lse_j(l_ij) - l_ii - log N stays finite. N_padded
rounds the dataset size up to the batch parallelism so that the second axis shards evenly over
the batch axes: the state grows with the dataset, so it is sharded like the batch, never
replicated (at 400M examples it is 3.2 GB). The rows a step needs are gathered, and the new
values scattered back, outside the loss's shard_map: plain indexing that jit partitions, the
state a constant to autodiff.

The value reported is mean_i log(1 + N u_i) with the updated u: InfoNCE with the batch's
negative sum replaced by its moving average, so it reads like the softmax loss (on an example's
first visit it is that example's InfoNCE row loss exactly). Its gradient is SogCLR's, that of
mean_i g_i / u_i, which (as in the paper) leaves out the positive's own term in 1 + N g_i. An
index must appear at most once per batch (as a sampler without replacement gives).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clipjax.losses.objectives import Objective, objective_rows, settings_objective
from clipjax.losses.registry import register_objective
from clipjax.parallel.ring import ring_size as ring_size_of
from clipjax.schema import Field


def padded_size(num_examples: int, mesh: Mesh, batch_axes: Sequence[str]) -> int:
    """num_examples rounded up to a multiple of the batch parallelism."""
    parallel = ring_size_of(mesh, tuple(batch_axes))
    return -(-int(num_examples) // parallel) * parallel


def _log_u_sharding(mesh: Mesh, batch_axes: Sequence[str]) -> NamedSharding:
    return NamedSharding(mesh, P(None, tuple(batch_axes)))


def init_state(num_examples: int, mesh: Mesh, batch_axes: Sequence[str]) -> dict:
    """{"log_u": -inf [2, N_padded]}, created in its sharding (never whole on one device)."""
    shape = (2, padded_size(num_examples, mesh, batch_axes))
    sharding = _log_u_sharding(mesh, batch_axes)
    return {"log_u": jax.jit(lambda: jnp.full(shape, -jnp.inf, jnp.float32), out_shardings=sharding)()}


def moving_average(old_log_u, log_g, gamma: float):
    """log((1 - gamma) u + gamma g), or log g where u was never set (old_log_u = -inf)."""
    gamma = float(gamma)
    blended = jnp.logaddexp(
        math.log1p(-gamma) + old_log_u if gamma < 1 else -jnp.inf, math.log(gamma) + log_g
    )
    return jnp.where(jnp.isfinite(old_log_u), blended, log_g)


def sogclr_loss(
    obj: Objective,
    a,
    b,
    logit_scale,
    *,
    index,
    loss_state: dict,
    gamma: float,
    mesh: Mesh,
    batch_axes: Sequence[str],
    **forms,
):
    """(loss, new loss_state); `forms`: impl, chunk, precision of `objective_rows`."""
    axes = tuple(batch_axes)
    log_g = objective_rows(obj, a, b, logit_scale, mesh=mesh, batch_axes=axes, **forms)
    # The rows of this batch, [2, B], sharded like the batch (and like log g).
    rows_sharding = _log_u_sharding(mesh, axes)
    log_u = loss_state["log_u"]
    index = jnp.asarray(index, jnp.int32)
    old = jax.lax.with_sharding_constraint(log_u[:, index], rows_sharding)
    new = jax.lax.stop_gradient(moving_average(old, jax.lax.stop_gradient(log_g), gamma))
    new_log_u = jax.lax.with_sharding_constraint(log_u.at[:, index].set(new), _log_u_sharding(mesh, axes))
    negatives = obj.negatives(a.shape[0])
    value = jnp.mean(jax.nn.softplus(math.log(negatives) + new))
    # exp(log g - log u): the ratio g / u without forming either (both overflow at scale 100).
    surrogate = jnp.mean(jnp.exp(log_g - new))
    loss = jax.lax.stop_gradient(value) + (surrogate - jax.lax.stop_gradient(surrogate))
    return loss, {"log_u": new_log_u}


def _loss(c):
    obj, gamma = settings_objective(c), c.settings["sogclr_gamma"]
    return sogclr_loss(
        obj, c.a, c.b, c.logit_scale, index=c.index, loss_state=c.loss_state, gamma=gamma, **c.forms
    )


GAMMA = Field(
    0.9,
    "sogclr: weight of this step's negative sum in the per-example moving average",
    check=lambda v: None if 0 < v <= 1 else "must lie in (0, 1]",
)
register_objective("sogclr", _loss, fields={"sogclr_gamma": GAMMA}, uses=("index",), init_state=init_state)
