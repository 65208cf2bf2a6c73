"""The run's real programs compiled for a TPU topology this host does not own.

The train step is `clipjax.trainer.step.make_train_step` on the abstract state of
`init_train_state(..., abstract=True)` (nothing is allocated: parameters, optimizer state and
batch are `jax.ShapeDtypeStruct`s with their shardings), over a mesh built from the topology's
devices with the config's mesh axes: the program `clipjax.train` would run on that pod.
The evaluation encoders are those of `clipjax.evals.encoders` on the evaluation mesh (pure data
parallelism over the same chips). A NaFlex model's train step is compiled at its longest
sequence length (`data.naflex_seq_lens`), the largest of its programs; evaluation embeds squares.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from clipjax.config import ConfigError
from clipjax.models.spec import config_model_spec, naflex_seq_lens
from clipjax.parallel import batch_axes, batch_parallelism, make_mesh
from clipjax.planning.chips import Chip, TopologyError, parse_topology
from clipjax.planning.hlo import Program


class LibtpuMissing(ConfigError):
    """The TPU compiler is not installed; the message says how to install it."""


@dataclasses.dataclass
class MemoryParts:
    """Per-chip bytes of a compiled step, parts that add up to `total`."""

    params: int
    opt_state: int
    batch: int
    other_state: int  # step counters, per-sample loss state
    layout_padding: int  # what XLA reports for the arguments beyond their logical size (tiling)
    temporaries: int
    outputs: int  # outputs not written in place of a donated argument (the metrics)

    @property
    def total(self) -> int:
        return sum(dataclasses.asdict(self).values())


@dataclasses.dataclass
class CompiledStep:
    """One compiled program: how long it took, its memory per chip, XLA's counts, its text."""

    name: str
    seconds: float
    memory: MemoryParts | None  # None: the compiler refused it (`refusal` says why)
    flops: float  # XLA's count per chip (a loop body counted once)
    bytes_accessed: float  # XLA's count per chip (a loop body counted once)
    program: Program | None
    refusal: str = ""
    required_bytes: int = 0  # what a refusing compiler said the program needs

    @property
    def fits(self) -> bool:
        return self.memory is not None and not self.refusal


def require_libtpu() -> None:
    if importlib.util.find_spec("libtpu") is None:
        raise LibtpuMissing(
            f"the TPU compiler (libtpu) is not installed: pip install 'jax[tpu]=={jax.__version__}' "
            "(or pip install -e '.[tpu]')"
        )


def quiet_libtpu_environment() -> None:
    """libtpu on a host without a TPU warns about unset TPU variables and takes a process-wide
    lock file; neither matters for compiling only."""
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def topology_devices(name: str) -> tuple[Chip, list]:
    """(chip, devices) of a TPU topology such as 'v5p:4x4x4', from the deviceless compiler."""
    chip, _ = parse_topology(name)
    require_libtpu()
    quiet_libtpu_environment()
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(topology_name=name, platform="tpu")
    except Exception as e:  # noqa: BLE001 - libtpu's message, on one line
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TopologyError(f"--topology {name!r}: the TPU compiler refused it: {message}") from None
    return chip, list(topology.devices)


def plan_mesh(config, devices) -> jax.sharding.Mesh:
    """The config's mesh over `devices`; a mesh that does not match them is one line naming it."""
    try:
        return make_mesh(config.mesh, devices)
    except ValueError as e:
        raise ConfigError(f"{e} (on {len(devices)} chips of the topology)") from None


def abstract_batch(
    config, mesh, batch_size: int | None = None, seq_len: int = 0
) -> dict[str, jax.ShapeDtypeStruct]:
    """A global batch of `batch_size` (default `data.batch_size`) as the step receives it;
    `seq_len`: a NaFlex model's, patch sequences that long and their grids."""
    rows = NamedSharding(mesh, P(batch_axes(mesh)))
    b = int(batch_size or config.data.batch_size)
    size, length = int(config.data.image_size), int(config.data.tokenizer.max_len)
    batch = {
        "image": jax.ShapeDtypeStruct((b, size, size, 3), jnp.uint8, sharding=rows),
        "text_id": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=rows),
        "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=rows),
        "index": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=rows),
    }
    if config.task != "image_image":
        batch["text"] = jax.ShapeDtypeStruct((b, length), jnp.int32, sharding=rows)
    if seq_len:
        p = config_model_spec(config).image.patch_size
        batch["image"] = jax.ShapeDtypeStruct((b, seq_len, p * p * 3), jnp.uint8, sharding=rows)
        batch["image_grid"] = jax.ShapeDtypeStruct((b, 2), jnp.int32, sharding=rows)
    return batch


def per_chip_bytes(tree) -> int:
    """Bytes one chip holds of a tree of sharded abstract arrays (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) else leaf.shape
        total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
    return total


_HBM_REFUSAL = re.compile(r"\(([\d.]+)([KMGT]?)\)\s*exceeds available HBM\s*\(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _refusal(error: Exception) -> tuple[str, int] | None:
    """(one line, bytes required) if `error` is the compiler refusing a program for want of HBM."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text and "exceeds available HBM" not in text:
        return None
    found = _HBM_REFUSAL.search(text)
    required = int(float(found.group(1)) * _UNITS[found.group(2)]) if found else 0
    line = next((s.strip() for s in text.splitlines() if "exceeds" in s), text.strip().splitlines()[0])
    return line[:300], required


def deviceless(mesh) -> bool:
    """Whether `mesh` holds devices of a topology description (no backend of this process)."""
    return next(iter(mesh.devices.flat)).platform != jax.default_backend()


def compile_program(name: str, lowered_fn, argument_parts: dict[str, int], *, mesh) -> CompiledStep:
    """Compile `lowered_fn()` (a `jax.stages.Lowered`) for `mesh` and measure it; a refusal for
    want of memory is a result (the program does not fit), not an error."""
    start = time.perf_counter()
    # A deviceless executable cannot be read back from JAX's persistent cache (it needs a TPU
    # client, and a later read warns), so it is never written there; CPU programs are.
    min_time = jax.config.jax_persistent_cache_min_compile_time_secs
    if deviceless(mesh):
        jax.config.update("jax_persistent_cache_min_compile_time_secs", float("inf"))
    try:
        compiled = lowered_fn().compile()
    except Exception as e:  # noqa: BLE001 - only the HBM refusal is expected; others re-raise
        refused = _refusal(e)
        if refused is None:
            raise
        return CompiledStep(name, time.perf_counter() - start, None, 0.0, 0.0, None, refused[0], refused[1])
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    logical = sum(argument_parts.values())
    memory = MemoryParts(
        params=argument_parts.get("params", 0),
        opt_state=argument_parts.get("opt_state", 0),
        batch=argument_parts.get("batch", 0),
        other_state=argument_parts.get("other_state", 0),
        layout_padding=int(stats.argument_size_in_bytes) - logical,
        temporaries=int(stats.temp_size_in_bytes),
        outputs=int(stats.output_size_in_bytes) - int(stats.alias_size_in_bytes),
    )
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return CompiledStep(
        name,
        seconds,
        memory,
        float(cost.get("flops", 0.0)),
        float(cost.get("bytes accessed", 0.0)),
        Program(compiled.as_text()),
    )


def compile_train_steps(
    config, mesh, *, vocab_size: int, batch_size: int | None = None, metrics=(False, True)
):
    """{False: the train step, True: the metrics step} compiled for `mesh`'s devices."""
    from clipjax.trainer.state import init_train_state
    from clipjax.trainer.step import make_train_step

    setup = init_train_state(config, mesh, vocab_size=vocab_size, abstract=True)
    step = make_train_step(config, mesh, setup.graphdef, setup.shardings, setup.tx, setup.schedule)
    batch = abstract_batch(config, mesh, batch_size, max(naflex_seq_lens(config), default=0))
    state = setup.state
    parts = {
        "params": per_chip_bytes(state["params"]),
        "opt_state": per_chip_bytes(state["opt_state"]),
        "batch": per_chip_bytes(batch),
        "other_state": per_chip_bytes({k: v for k, v in state.items() if k not in ("params", "opt_state")}),
    }
    return {
        flag: compile_program(
            "metrics step" if flag else "train step",
            lambda flag=flag: step.lower(state, batch, flag),
            parts,
            mesh=mesh,
        )
        for flag in metrics
    }


def compile_embed_steps(config, devices, *, vocab_size: int) -> dict[str, CompiledStep]:
    """The evaluation encoders (image and text) at `evals.batch_size`, on the evaluation mesh:
    data parallelism over all the chips, parameters replicated (`clipjax.parallel.eval_mesh`)."""
    from clipjax.evals.encoders import jitted_encoders
    from clipjax.models import model_factory
    from clipjax.parallel import eval_mesh, param_shardings

    mesh = eval_mesh(devices)
    abstract_model = nnx.eval_shape(model_factory(config, vocab_size=vocab_size))
    graphdef, _ = nnx.split(abstract_model)
    shardings = param_shardings(abstract_model, mesh, config.sharding_rules)
    params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param)),
        shardings,
    )
    encode_image, encode_text = jitted_encoders(graphdef, mesh)
    parallel = batch_parallelism(mesh)
    b = max(parallel, int(config.evals.batch_size) // parallel * parallel)
    batch = abstract_batch(config, mesh, b)
    # jit drops the parameters an encoder never reads (the other tower) from its arguments.
    text_side = {k: v for k, v in params.items() if k.startswith("text_")}
    image_side = {k: v for k, v in params.items() if k.startswith("image_")}
    steps = {
        "image": compile_program(
            "embed images",
            lambda: encode_image.lower(params, batch["image"]),
            {"params": per_chip_bytes(image_side), "batch": per_chip_bytes(batch["image"])},
            mesh=mesh,
        )
    }
    if config.task != "image_image":
        steps["text"] = compile_program(
            "embed texts",
            lambda: encode_text.lower(params, batch["text"]),
            {"params": per_chip_bytes(text_side), "batch": per_chip_bytes(batch["text"])},
            mesh=mesh,
        )
    return steps


def planned_vocab_size(config, override: int = 0) -> int:
    """The vocabulary the run's text tower will have, without reading the data: the tokenizer's
    own size where it has one (byte, CLIP's BPE), the trained sentencepiece bound, or the file."""
    if override:
        return int(override)
    tokenizer = config.data.tokenizer
    if tokenizer.kind == "byte":
        from clipjax.data.tokenizers import ByteTokenizer

        return ByteTokenizer(max(3, int(tokenizer.max_len))).vocab_size
    if tokenizer.kind == "clip_bpe":
        from clipjax.data.clip_bpe import NUM_MERGES

        return 2 * 256 + NUM_MERGES + 2  # bytes, bytes ending a word, the merges, two specials: 49,408
    if tokenizer.kind == "sentencepiece" and not tokenizer.model_file:
        return int(tokenizer.vocab_size)  # trained on the captions: at most this many pieces
    from clipjax.data.tokenizers import make_tokenizer
    from clipjax import paths

    key = "model_file" if tokenizer.kind == "sentencepiece" else "tokenizer_file"
    if not paths.exists(tokenizer.get(key, "")):
        raise ConfigError(
            f"data.tokenizer.{key}: {tokenizer.get(key, '')!r} is not readable here; give --vocab_size=N "
            "(the tokenizer's vocabulary size) to plan without it"
        )
    return make_tokenizer(tokenizer).vocab_size
