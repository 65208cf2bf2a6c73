"""Parallelism: the device mesh, logical-axis shardings of parameters, host batches as global
arrays, and multi-process start-up."""

from clipjax.parallel.mesh import (  # noqa: F401
    BATCH_AXES,
    batch_axes,
    batch_parallelism,
    batch_sharding,
    eval_mesh,
    host_batch_to_global,
    make_mesh,
    param_shardings,
    resolve_mesh_shape,
)
