"""The train step as the TPU compiler builds it (libtpu's deviceless topologies, no TPU needed):
pod scale and an audit of the program, on small v5e slices with a tiny config.

What the CPU backend compiles differently from the TPU one (fusions, layouts, bf16, collective
decompositions) is what these tests exist to catch. Each audit is shown failing on a plausible
wrong program: the gather loss in place of the ring, the loss's matmuls at default precision,
and FSDP parameters gathered whole before the step.
"""

import functools
import pathlib

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from clipjax.cli import load_config_file
from clipjax.config import apply_overrides
from clipjax.planning import audit
from clipjax.planning.compile import compile_train_steps, plan_mesh, topology_devices
from clipjax.planning.hlo import Program
from clipjax.trainer import step as step_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
VOCAB = 300
# Activations must dominate the per-chip memory for "proportional" to mean anything: a batch of
# 4,096 of 16 px images (17 tokens) and 8-token texts, two layers per tower.
POD_SCALE = {"data.batch_size": 4096, "data.image_size": 16, "data.tokenizer.max_len": 8}
SMALL, LARGE = "v5e:2x2", "v5e:4x4"  # 4 and 16 chips


def _config(**overrides):
    config = load_config_file(str(ROOT / "configs" / "clip_vit_b16.py") + ":tiny")
    apply_overrides(config, {"mesh.shape": (1, -1, 1), **overrides})
    return config


@functools.lru_cache(maxsize=None)
def _compiled(topology: str, overrides: tuple):
    config = _config(**dict(overrides))
    _, devices = topology_devices(topology)
    mesh = plan_mesh(config, devices)
    return config, mesh, compile_train_steps(config, mesh, vocab_size=VOCAB, metrics=(False,))[False]


def test_per_chip_temporaries_fall_in_proportion_to_the_chips():
    # The rolled layer loop (compiles in half the time of the unrolled one); tests/test_pod_scale.py
    # checks both on CPU devices, docs/scaling.md both for CLIP B/32 on v5p.
    overrides = tuple({**POD_SCALE, "model.unroll": 1}.items())
    _, _, small = _compiled(SMALL, overrides)
    _, _, large = _compiled(LARGE, overrides)
    small_t, large_t = small.memory.temporaries, large.memory.temporaries
    print(f"{small_t / 2**20:.1f} MiB per chip on 4 chips, {large_t / 2**20:.1f} MiB on 16")
    # 4x the chips: at most a quarter of the temporaries, within 20%.
    assert large_t <= 1.2 * small_t / 4, (small_t / 2**20, large_t / 2**20)


# The audits read a small program: a batch of 384 compiles in a third of the time (and 384 is no
# size of the tiny towers, so a [rows, 384] array can only be logits).
AUDITED = {"data.batch_size": 384, "data.image_size": 16, "data.tokenizer.max_len": 8, "model.unroll": 1}


def _ring_program(**overrides):
    return _compiled(SMALL, tuple({**AUDITED, **overrides}.items()))


def _wrong_loss_program():
    # One wrong program for two audits: the gather loss (b x B logits) at default precision.
    return _ring_program(**{"loss.impl": "gather", "loss.precision": "default"})


def test_ring_step_holds_no_b_by_B_buffer():
    config, mesh, step = _ring_program()
    rows = config.data.batch_size // mesh.size
    assert not audit.logit_buffers(step.program, rows, config.data.batch_size)


def test_the_logit_buffer_audit_catches_the_gather_loss():
    config, mesh, step = _wrong_loss_program()
    rows = config.data.batch_size // mesh.size
    found = audit.logit_buffers(step.program, rows, config.data.batch_size)
    assert any(set(a.dims) == {rows, config.data.batch_size} for a in found), found


def test_ring_permutes_move_whole_blocks():
    config, mesh, step = _ring_program()
    rows = config.data.batch_size // mesh.size
    permutes = audit.ring_permutes(step.program)
    # One lap: every other chip's block visits each chip once, in the forward and the backward.
    assert permutes and max(p.runs for p in permutes) == mesh.size - 1
    assert not audit.partial_ring_blocks(step.program, rows)


def test_the_block_audit_catches_a_ring_of_half_blocks():
    _, devices = topology_devices(SMALL)
    mesh = jax.sharding.Mesh(devices, ("fsdp",))
    rows = 8
    shift = [(i, (i + 1) % mesh.size) for i in range(mesh.size)]

    def half_block_ring(x):
        # The wrong ring: each step passes half a block, so a lap takes twice the steps.
        return jax.lax.ppermute(x[: rows // 2], "fsdp", shift)

    program = jax.jit(
        jax.shard_map(half_block_ring, mesh=mesh, in_specs=P("fsdp"), out_specs=P("fsdp"))
    ).lower(
        jax.ShapeDtypeStruct((rows * mesh.size, 16), jnp.float32, sharding=NamedSharding(mesh, P("fsdp")))
    )
    found = audit.partial_ring_blocks(Program(program.compile().as_text()), rows)
    assert found and all(shape[0] == rows // 2 for _, shape in found), found


def _layer_limit(config, mesh):
    from clipjax.trainer.state import init_train_state

    setup = init_train_state(config, mesh, vocab_size=VOCAB, abstract=True)
    return audit.layer_tensor_elements(setup.state["params"])


def test_fsdp_gathers_one_layer_at_a_time():
    config, mesh, step = _ring_program()
    assert not audit.oversized_parameter_collectives(step.program, _layer_limit(config, mesh))


def test_the_gather_audit_catches_parameters_gathered_whole(monkeypatch):
    make_loss_fn = step_lib.make_loss_fn

    def gathered_whole(config, graphdef, mesh):
        loss_fn = make_loss_fn(config, graphdef, mesh)
        replicated = NamedSharding(mesh, P())
        # The wrong program: every parameter gathered to every chip before the towers run.
        return lambda params, *args: loss_fn(jax.lax.with_sharding_constraint(params, replicated), *args)

    monkeypatch.setattr(step_lib, "make_loss_fn", gathered_whole)
    config = _config(**AUDITED)
    _, devices = topology_devices(SMALL)
    mesh = plan_mesh(config, devices)
    wrong = compile_train_steps(config, mesh, vocab_size=VOCAB, metrics=(False,))[False]
    found = audit.oversized_parameter_collectives(wrong.program, _layer_limit(config, mesh))
    assert found, [(c.kind, c.bytes) for c in wrong.program.collectives() if c.kind == "all-gather"]


def test_loss_precision_reaches_the_tpu_program():
    _, _, highest = _ring_program()
    assert highest.program and set(audit.loss_precisions(highest.program)) == {"highest"}
    _, _, default = _wrong_loss_program()
    precisions = audit.loss_precisions(default.program)
    assert precisions and "highest" not in precisions
