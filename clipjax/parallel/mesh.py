"""The device mesh, parameter shardings from logical-axis rules, and global batch assembly."""

from __future__ import annotations

import math
import types
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def resolve_mesh_shape(axes: Sequence[str], shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fill in the single -1 entry so the product equals num_devices; errors name `mesh.shape`."""
    shape = [int(s) for s in shape]
    if len(shape) != len(axes):
        raise ValueError(
            f"mesh.shape {tuple(shape)} has {len(shape)} entries but mesh.axes {tuple(axes)} has {len(axes)}"
        )
    free = [i for i, s in enumerate(shape) if s == -1]
    if len(free) > 1:
        raise ValueError(f"mesh.shape {tuple(shape)}: at most one entry may be -1")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh.shape {tuple(shape)}: sizes must be positive or -1")
    fixed = math.prod(s for s in shape if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"mesh.shape {tuple(shape)}: fixed axes ({fixed} devices) do not divide the {num_devices} available devices"
            )
        shape[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(f"mesh.shape {tuple(shape)} needs {fixed} devices but {num_devices} are available")
    return tuple(shape)


def make_mesh(mesh_config, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    axes = tuple(mesh_config.axes)
    shape = resolve_mesh_shape(axes, mesh_config.shape, len(devices))
    return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def eval_mesh(devices=None) -> Mesh:
    """Pure data parallelism over the devices at hand, whatever mesh trained the model."""
    return make_mesh(types.SimpleNamespace(axes=("data", "fsdp", "model"), shape=(-1, 1, 1)), devices)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the batch is split over (data and fsdp; 'model' holds replicas of the batch)."""
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(batch_axes(mesh)))


def batch_parallelism(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drop mesh axes from dimensions they do not divide, so small or odd tensors stay replicated."""
    fitted = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        size = math.prod(mesh.shape[n] for n in names)
        fitted.append(entry if names and dim % size == 0 else None)
    return P(*fitted)


def param_shardings(model: nnx.Module, mesh: Mesh, rules: Sequence[tuple[str, Any]]):
    """NamedShardings (as a pure dict matching the model's Param state) from logical axis rules."""
    state = nnx.state(model, nnx.Param)
    with nnx.logical_axis_rules(tuple(tuple(r) for r in rules)):
        specs = nnx.get_partition_spec(state)
    pure_specs = nnx.to_pure_dict(specs)
    pure_values = nnx.to_pure_dict(state)
    return jax.tree.map(
        lambda spec, value: NamedSharding(
            mesh, _fit_spec(spec if isinstance(spec, P) else P(), value.shape, mesh)
        ),
        pure_specs,
        pure_values,
        is_leaf=lambda x: isinstance(x, P) or x is None,
    )


def host_batch_to_global(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Each process passes its own slice; the result is one global array per key, batch-sharded."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()
    }
