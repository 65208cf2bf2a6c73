"""Logical partition specs of a model's parameters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flax import nnx

LOGICAL_AXES = (
    "layers",
    "embed",
    "mlp",
    "heads",
    "head_dim",
    "vocab",
    "patch",
    "conv_h",
    "conv_w",
    "conv_in",
    "conv_out",
    "proj",
    "pos",
)


def logical_partition_specs(
    model: nnx.Module,
    rules: Sequence[tuple[str, Any]] | None = None,
) -> nnx.State:
    """PartitionSpecs for ``nnx.state(model, nnx.Param)``, same tree structure.

    Without ``rules`` each spec holds the logical axis names (scalars get
    ``P()``). With ``rules`` (pairs ``(logical_name, mesh_axis_or_None)``, as for
    ``nnx.logical_axis_rules``) the names are mapped to mesh axes; every name the
    model uses must then appear in the rules. Works on abstract models.
    """
    state = nnx.state(model, nnx.Param)
    if rules is None:
        return nnx.get_partition_spec(state)
    with nnx.logical_axis_rules(tuple(rules)):
        return nnx.get_partition_spec(state)
