"""Train state: parameters and optimizer state created directly in their shardings."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from clipjax import optim
from clipjax.config import total_steps
from clipjax.losses import image_losses, init_loss_state
from clipjax.models import model_factory
from clipjax.parallel import batch_axes, param_shardings

# state = {'step', 'params', 'opt_state', 'nonfinite_total', 'nonfinite_streak'}, plus
# 'loss_state' when the loss keeps per-sample estimates (`loss.name = 'sogclr'`) and 'teacher'
# with SigLIP 2's image-side losses (`image_losses`: an EMA of the image tower and its heads)
COUNTERS = ("step", "nonfinite_total", "nonfinite_streak")


def create_train_state(
    make_model: Callable[[], nnx.Module],
    abstract_model: nnx.Module,
    tx,
    mesh,
    sharding_rules,
    frozen=(),
    *,
    abstract: bool = False,
) -> tuple[Any, dict, dict]:
    """(graphdef, state, state_shardings): the model is never whole on one device.

    `abstract_model` is `nnx.eval_shape(make_model)` (the caller has it for the optimizer).

    Parameters are initialised inside `jax.jit` with their FSDP shardings as outputs; the
    optimizer moments take the parameters' shardings, counters are replicated. The optimizer
    state covers only the parameters that train: those the `frozen` patterns leave out.
    `abstract=True` gives the same tree as `jax.ShapeDtypeStruct`s carrying those shardings and
    allocates nothing: what `clipjax.plan` compiles against a TPU topology it does not own.
    """
    # The same jitted initialisers either way, so the abstract state cannot drift from the real.
    build = jax.eval_shape if abstract else (lambda f, *args: f(*args))
    graphdef, _ = nnx.split(abstract_model)
    p_shardings = param_shardings(abstract_model, mesh, sharding_rules)
    params = build(
        jax.jit(lambda: nnx.to_pure_dict(nnx.state(make_model(), nnx.Param)), out_shardings=p_shardings)
    )
    replicated = NamedSharding(mesh, P())
    trainable, _ = optim.split_trainable(params, frozen)
    t_shardings, _ = optim.split_trainable(p_shardings, frozen)
    opt_shardings = _opt_shardings(jax.eval_shape(tx.init, trainable), trainable, t_shardings, replicated)
    opt_state = build(jax.jit(tx.init, out_shardings=opt_shardings), trainable)
    state = {"params": params, "opt_state": opt_state}
    shardings = {"params": p_shardings, "opt_state": opt_shardings}
    for name in COUNTERS:
        zero = jnp.int32(0)
        state[name] = (
            jax.ShapeDtypeStruct((), zero.dtype, sharding=replicated)
            if abstract
            else jax.device_put(zero, replicated)
        )
        shardings[name] = replicated
    return graphdef, state, shardings


def _opt_shardings(abstract_opt, params, p_shardings, replicated):
    """Shard every sub-tree of the optimizer state that has the parameters' structure like them."""
    params_def = jax.tree.structure(params)

    def assign(node):
        if jax.tree.structure(node) == params_def:
            return p_shardings
        return jax.tree.map(lambda _: replicated, node)

    return jax.tree.map(assign, abstract_opt, is_leaf=lambda n: jax.tree.structure(n) == params_def)


@dataclasses.dataclass
class TrainState:
    """A run's model structure, its sharded state, and the optimizer that updates it."""

    graphdef: Any
    state: dict  # see COUNTERS, plus 'params' and 'opt_state'
    shardings: dict
    tx: Any  # optax.GradientTransformation
    schedule: Any  # optax.Schedule


def init_train_state(config, mesh, *, vocab_size: int, abstract: bool = False) -> TrainState:
    """The model of `config.model` and the optimizer of `config.optim`, initialised on `mesh`;
    with `abstract=True`, their shapes, dtypes and shardings only (`create_train_state`)."""
    make_model = model_factory(config, vocab_size=vocab_size)
    abstract_model = nnx.eval_shape(make_model)
    frozen = tuple(config.optim.frozen)
    if frozen or config.optim.lr_multipliers:
        names = optim.param_names(nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param)))
        optim.check_patterns(config.optim, names)
    decay_mask, _ = optim.split_trainable(optim.weight_decay_mask(abstract_model), frozen)
    factors = optim.multiplier_factors(decay_mask, config.optim.lr_multipliers)
    tx, schedule = optim.make_optimizer(config.optim, total_steps(config), decay_mask, factors)
    graphdef, state, shardings = create_train_state(
        make_model, abstract_model, tx, mesh, config.sharding_rules, frozen, abstract=abstract
    )
    # Per-sample loss estimates (SogCLR's moving averages), sharded over the batch axes like
    # the data, and saved in every checkpoint with the rest of the state.
    make_loss_state = lambda: init_loss_state(config.loss, int(config.data.num_train), mesh, batch_axes(mesh))
    loss_state = jax.eval_shape(make_loss_state) if abstract else make_loss_state()
    if loss_state:
        state["loss_state"] = loss_state
        shardings["loss_state"] = jax.tree.map(lambda x: x.sharding, loss_state)
    if image_losses.active(config):
        state["teacher"], shardings["teacher"] = init_teacher(
            state["params"], shardings["params"], mesh, abstract
        )
    return TrainState(graphdef, state, shardings, tx, schedule)


def init_teacher(params, p_shardings, mesh, abstract: bool = False) -> tuple[dict, dict]:
    """(teacher, its shardings): a copy of the image tower and heads, sharded like them, and the
    running means of its prototype scores (replicated zeros)."""
    replicated = NamedSharding(mesh, P())
    parts = {k: params[k] for k in image_losses.TEACHER_PARTS}
    prototypes = params["image_heads"]["pooled"]["prototypes"]["kernel"].shape[-1]
    shardings = {
        **{k: p_shardings[k] for k in image_losses.TEACHER_PARTS},
        "centers": {"pooled": replicated, "patch": replicated},
    }

    def make(parts):
        zeros = jnp.zeros((prototypes,), jnp.float32)
        return {**jax.tree.map(jnp.copy, parts), "centers": {"pooled": zeros, "patch": zeros}}

    build = jax.jit(make, out_shardings=shardings)
    return (jax.eval_shape(build, parts) if abstract else build(parts)), shardings
