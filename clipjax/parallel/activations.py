"""Activation sharding by logical axis: how the towers' intermediate tensors are laid out.

Why this exists. Parameters carry logical axis names and FSDP shards them over `fsdp`; the batch
arrives sharded over `('data', 'fsdp')`. Between the two, the compiler is free to choose the
layout of every activation, and with nothing to anchor it, XLA's sharding propagation carries
the parameters' FSDP layout (the embedding dimension split over `fsdp`) into the activations
that meet them. A chip then holds its slice of the width for *every* example of the global
batch instead of all of the width for its own examples, the batch is not spread at all, and
all-to-alls appear where the two layouts meet. The TPU compiler showed it: CLIP B/32 at a
global batch of 4,096 needed 34.5 GiB of temporaries per chip on 8 v5p chips and 37.8 GiB on 64.
MaxText's answer, and ours: constrain the activations at the boundaries that fix their layout
(every block's input and output, the attention heads, the MLP's hidden layer, the pooled
features and the embeddings), by logical names mapped through rules like the parameters'.

`activation_sharding(mesh, rules)` is entered while a step is traced (the train step, the
evaluation encoders); outside it `constrain` is the identity, so a model built and run without a
mesh (tests, notebooks, `nnx.eval_shape`) is unaffected. A mesh axis that a dimension's size
does not divide, or that the mesh lacks, is dropped for that tensor, as for parameters.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Logical activation axes. 'batch' is the global batch; 'length' the token (or patch) sequence;
# 'act_embed' the residual stream's width; 'act_heads' attention heads; 'act_mlp' the MLP's
# hidden width (and a conv map's channels). Names differ from the parameters' ('embed', 'mlp',
# ...) on purpose: FSDP shards a weight's 'embed' dimension, while the activations must stay
# whole along it and split along the batch instead.
ACTIVATION_AXES = ("batch", "length", "act_embed", "act_heads", "act_mlp")
# Data and FSDP split the batch; tensor parallelism (a 'model' axis > 1) splits heads and the
# MLP's hidden layer, Megatron-style, leaving the residual stream whole on each model shard.
DEFAULT_ACTIVATION_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "model"),
    ("act_mlp", "model"),
)

# (mesh, activation rules) while a step is traced.
_ACTIVE: contextvars.ContextVar[tuple[Mesh, dict[str, Any]] | None] = contextvars.ContextVar(
    "clipjax_activation_sharding", default=None
)


def check_rules(rules) -> str | None:
    """A config check: (logical activation axis, mesh axis or axes or None) pairs, known names."""
    try:
        pairs = [tuple(r) for r in rules]
    except TypeError:
        return "expected (logical axis, mesh axes) pairs"
    for pair in pairs:
        if len(pair) != 2:
            return f"expected (logical axis, mesh axes) pairs, got {pair!r}"
        if pair[0] not in ACTIVATION_AXES:
            return f"unknown logical activation axis {pair[0]!r} (known: {', '.join(ACTIVATION_AXES)})"
    return None


def logical_to_spec(names: Sequence[str | None], rules: dict[str, Any], shape, mesh: Mesh) -> P:
    """The PartitionSpec of a tensor of `shape` whose dimensions carry logical `names`: each name's
    mesh axes that exist in `mesh`, kept only where their product divides the dimension."""
    entries = []
    used: set[str] = set()
    for dim, name in zip(shape, tuple(names) + (None,) * (len(shape) - len(names))):
        target = rules.get(name) if name is not None else None
        axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        # A mesh axis can shard one dimension only; the first dimension to claim it keeps it.
        axes = tuple(a for a in axes if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
        size = 1
        for a in axes:
            size *= mesh.shape[a]
        if axes and dim % size == 0:
            used.update(axes)
            entries.append(axes[0] if len(axes) == 1 else axes)
        else:
            entries.append(None)
    return P(*entries)


def _as_dict(rules) -> dict[str, Any]:
    return {str(k): v for k, v in (tuple(r) for r in rules)}


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules=DEFAULT_ACTIVATION_RULES) -> Iterator[None]:
    """While active (during tracing), `constrain` pins activations to `rules` on `mesh`. Empty
    rules leave every layout to the compiler (what clipjax did before it had them)."""
    token = _ACTIVE.set((mesh, _as_dict(rules)) if rules else None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`x` laid out by its logical dimension `names` under the active rules; else `x` itself."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = logical_to_spec(names, rules, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
