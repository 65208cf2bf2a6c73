"""Checks of a compiled TPU train step that only the real compiler's program can answer.

Each returns what it found wrong (an empty list: the program passes), so a test can assert on it
and `plan` can print it. They read the program's text (`hlo.Program`), nothing else:

  * `logit_buffers`: arrays as large as the b x B logits of one chip's rows against the whole
    global batch (the ring loss exists so that none is ever materialised);
  * `partial_ring_blocks`: ring `ppermute`s that move less than a whole block (each chip's b
    rows of embeddings, or per-row statistics), which would multiply the ring's steps;
  * `oversized_parameter_collectives`: all-gathers (or the all-reduces TPU programs also gather
    with) moving more than one layer's share of a parameter (FSDP must gather layer by layer,
    not the parameter tree up front);
  * `loss_precisions`: the operand precision of every matmul in the loss, to compare with
    `loss.precision` (a float32 matmul on TPU runs as bf16 passes unless told otherwise).
"""

from __future__ import annotations

import math
import re

import jax

from clipjax.planning.hlo import Array, Collective, Program

_PRECISION = re.compile(r"operand_precision=\{([^}]*)\}")


def logit_buffers(program: Program, rows: int, batch: int) -> list[Array]:
    """Arrays with a global-batch-sized dimension and at least `rows` x `batch` elements."""
    found = set()
    for instruction in program.instructions():
        for array in instruction.arrays():
            if batch in array.dims and math.prod(array.dims) >= rows * batch:
                found.add(array)
    return sorted(found, key=lambda a: -a.bytes)


def ring_permutes(program: Program) -> list[Collective]:
    """The collective-permutes of the loss's ring (`jax.lax.ppermute` in its shard_map)."""
    return [c for c in program.collectives() if c.kind == "collective-permute" and "ppermute" in c.op_name]


def partial_ring_blocks(program: Program, rows: int) -> list[tuple[str, tuple[int, ...]]]:
    """Ring transfers whose arrays do not span a chip's `rows` rows: (op name, shape) of each."""
    found = []
    by_name = {i.name: i for i in program.instructions()}
    for permute in ring_permutes(program):
        for array in by_name[permute.name].arrays():
            if array.dims and array.dims[0] != rows:
                found.append((permute.name, array.dims))
    return found


def layer_tensor_elements(abstract_params, stacked_name: str = "blocks") -> int:
    """The largest parameter tensor of one layer, in elements: a stacked (scanned) block's tensor
    divided by its layers, or an unstacked tensor whole. Elements, not bytes: XLA may gather a
    weight in the compute dtype (bf16) rather than as stored (float32)."""
    largest = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
        keys = [str(getattr(p, "key", p)) for p in path]
        layers = leaf.shape[0] if stacked_name in keys and leaf.shape else 1
        largest = max(largest, math.prod(leaf.shape) // layers)
    return largest


def oversized_parameter_collectives(program: Program, limit_elements: int) -> list[Collective]:
    """All-gathers and all-reduces producing an array of more than `limit_elements` (one layer's
    largest tensor). XLA combines small collectives into one tuple-shaped op, so each array is
    judged alone; TPU programs also gather weights with all-reduces, hence both kinds."""
    by_name = {i.name: i for i in program.instructions()}
    return [
        c
        for c in program.collectives()
        if c.kind in ("all-gather", "all-reduce")
        and any(math.prod(a.dims) > limit_elements for a in by_name[c.name].arrays())
    ]


def loss_precisions(program: Program) -> list[str]:
    """The operand precision of each matmul inside the loss's shard_map ('default' where unset)."""
    found = []
    for instruction in program.instructions():
        if instruction.opcode not in ("dot", "convolution") or "shard_map" not in instruction.rest:
            continue
        meta = re.search(r'op_name="([^"]*)"', instruction.rest)
        if not meta or "shard_map" not in meta.group(1):
            continue
        precision = _PRECISION.search(instruction.rest)
        found.append(precision.group(1).split(",")[0].strip() if precision else "default")
    return found
