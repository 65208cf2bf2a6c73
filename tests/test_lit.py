"""LiT and fine-tuning: frozen parameters (`optim.frozen`), per-parameter learning-rate
multipliers (`optim.lr_multipliers`), and starting some towers from another run
(`init_from_towers`)."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clipjax import flops, optim
from clipjax import trainer as train_lib
from clipjax.api import RestoreError
from clipjax.checkpoint import Checkpointer
from clipjax.config import ConfigError, apply_overrides, validate
from clipjax.models import model_factory, model_spec
from clipjax.parallel import host_batch_to_global, make_mesh
from clipjax.run_store.resume import ResumeError, check_resume
from clipjax.trainer.state import init_train_state
from clipjax.trainer.step import make_grad_fn, make_train_step
from tests.test_flops import _sub_jaxprs, traced_matmul_flops
from tests.helpers import load_config, source_and_tokenizer, tiny_demo

QUIET = dict(log=lambda _: None)
LIT = ("image_tower", "image_proj")


def _outputs(jaxpr, acc=None) -> collections.Counter:
    """(primitive, output shape) -> how many equations of a jaxpr give it, nested jaxprs (jit,
    scan, shard_map) included."""
    acc = collections.Counter() if acc is None else acc
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            acc[eqn.primitive.name, tuple(var.aval.shape)] += 1
        for sub in _sub_jaxprs(eqn.params):
            _outputs(sub, acc)
    return acc


def _dots(outputs) -> int:
    return sum(n for (name, _), n in outputs.items() if name == "dot_general")


def _frozen_matrix_shapes(params, frozen) -> set:
    """Shapes of the frozen kernels (the gradient of one would have its shape)."""
    _, fixed = optim.split_trainable(params, frozen)
    return {tuple(x.shape) for x in jax.tree.leaves(fixed) if x.ndim >= 2}


# The demo's image side is 5 products (4 convolutions as patch matmuls, the projection); its
# gradient adds 9 (one per kernel, one per layer input except the first layer's).
IMAGE_BACKWARD_DOTS = 9


def _abstract(config):
    model = nnx.eval_shape(model_factory(config, vocab_size=300))
    b, size = config.data.batch_size, config.data.image_size
    batch = {
        "image": jax.ShapeDtypeStruct((b, size, size, 3), jnp.uint8),
        "text": jax.ShapeDtypeStruct((b, config.data.tokenizer.max_len), jnp.int32),
    }
    return nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model, nnx.Param)), batch


@pytest.fixture(scope="module")
def tiny(tfds_dir):
    """The tiny demo's config, a batch, and its train state on 8 devices."""
    config = tiny_demo(tfds_dir, **{"evals.at_end": False})
    source, tokenizer = source_and_tokenizer(config.data)
    batch = next(source.train_iterator(tokenizer, seed=0))
    mesh = make_mesh(config.mesh)
    batch = host_batch_to_global({k: batch[k] for k in ("image", "text", "text_id", "label")}, mesh)
    return config, tokenizer, mesh, batch


def _setup(tiny, **overrides):
    config, tokenizer, mesh, batch = tiny
    config = apply_overrides(config.copy_and_resolve_references(), overrides)
    setup = init_train_state(config, mesh, vocab_size=tokenizer.vocab_size)
    step = make_train_step(config, mesh, setup.graphdef, setup.shardings, setup.tx, setup.schedule)
    return config, setup, step, batch


def _leaves(tree):
    return {optim.path_name(p): np.array(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ------------------------------------------------------------------ no gradient for frozen ones


@pytest.mark.parametrize("microbatches", [1, 2])
def test_a_frozen_image_tower_has_no_backward_pass_in_the_program(microbatches):
    """The gradient program of a frozen image side has none of its backward products and no
    array shaped like one of its kernels (a kernel's gradient would be one), and its matmul
    FLOPs are exactly those of the image side forward (twice with micro-batches: the embedding
    pass and the re-run under the VJP) and the text side forward and backward."""
    base = apply_overrides(load_config("demo.py"), {"mesh.shape": (1, 1, 1), "microbatches": microbatches})
    mesh = make_mesh(base.mesh, devices=jax.devices()[:1])
    graphdef, params, batch = _abstract(base)
    outputs, traced = {}, {}
    for frozen in ((), ("image_tower",), LIT):
        config = apply_overrides(base.copy_and_resolve_references(), {"optim.frozen": frozen})
        jaxpr = jax.make_jaxpr(make_grad_fn(config, graphdef, mesh))(params, batch).jaxpr
        outputs[frozen], traced[frozen] = _outputs(jaxpr), traced_matmul_flops(jaxpr)
    assert _dots(outputs[()]) - _dots(outputs[LIT]) == IMAGE_BACKWARD_DOTS
    # The projection still trains: its kernel gradient stays, its input gradient goes.
    assert _dots(outputs[()]) - _dots(outputs[("image_tower",)]) == IMAGE_BACKWARD_DOTS - 1
    for frozen in (("image_tower",), LIT):
        kernels = _frozen_matrix_shapes(params, frozen)
        assert kernels <= {shape for _, shape in outputs[()]}  # the test can see a gradient
        # (The micro-batched embedding pass reads every parameter through a stop_gradient.)
        assert not kernels & {shape for name, shape in outputs[frozen] if name != "stop_gradient"}, frozen

    spec = model_spec(base.model, image_size=base.data.image_size)
    b, size = base.data.batch_size, base.data.image_size
    image_proj = flops.dense_flops(1, flops.resnet_out_dim(spec.image, size), spec.embed_dim)
    parts = flops.model_forward_flops(spec, image_size=size, text_len=base.data.tokenizer.max_len)
    text_side = parts["total"] - parts["image"] - image_proj
    passes = 4 if microbatches > 1 else 3
    loss = flops.loss_flops(base.loss.name, base.loss.impl, b, spec.embed_dim)
    image_forward = (2 if microbatches > 1 else 1) * b * (parts["image"] + image_proj)
    assert traced[LIT] == pytest.approx(image_forward + passes * b * text_side + loss, rel=1e-9)


def test_the_train_step_program_has_no_gradient_or_update_for_a_frozen_tower(tiny):
    """The whole jitted step (update, guards, norms), not only the gradient function: no
    backward product, and no gradient, Adam or guard arithmetic on a frozen kernel (only the
    reported parameter norm reads them)."""
    outputs = {}
    for frozen in ((), LIT):
        config, setup, step, batch = _setup(tiny, **{"optim.frozen": frozen})
        jaxpr = jax.make_jaxpr(step, static_argnums=(2,))(setup.state, batch, False).jaxpr
        outputs[frozen] = _outputs(jaxpr)
    assert _dots(outputs[()]) - _dots(outputs[LIT]) == IMAGE_BACKWARD_DOTS
    kernels = _frozen_matrix_shapes(setup.state["params"], LIT)
    update_ops = ("reshape", "transpose", "div", "sqrt", "select_n")
    seen = {(name, shape) for name, shape in outputs[()] if shape in kernels and name in update_ops}
    assert {name for name, _ in seen} == set(update_ops)  # the test can see them
    assert not {(n, s) for n, s in outputs[LIT] if s in kernels and n in update_ops}


def test_trainable_gradients_are_those_of_the_unfrozen_model(tiny):
    """With and without micro-batches: the same loss, and each trainable parameter's gradient."""
    config, tokenizer, mesh, batch = tiny
    setup = init_train_state(config, mesh, vocab_size=tokenizer.vocab_size)
    params = setup.state["params"]
    (loss_ref, _), ref = jax.jit(make_grad_fn(config, setup.graphdef, mesh))(params, batch)
    ref = _leaves(ref)
    for microbatches in (1, 2):
        frozen = apply_overrides(
            config.copy_and_resolve_references(), {"optim.frozen": LIT, "microbatches": microbatches}
        )
        (loss, _), grads = jax.jit(make_grad_fn(frozen, setup.graphdef, mesh))(params, batch)
        assert sorted(grads) == ["logit_scale", "text_proj", "text_tower"]
        assert float(loss) == pytest.approx(float(loss_ref), rel=1e-5)
        got = _leaves(grads)
        assert set(got) == {k for k in ref if not k.startswith(LIT)}
        for key, g in got.items():
            np.testing.assert_allclose(
                g, ref[key], rtol=1e-4, atol=1e-6 * np.abs(ref[key]).max(), err_msg=key
            )


# ------------------------------------------------------------ no optimizer state, no change


def test_frozen_parameters_have_no_optimizer_state_and_stay_bitwise_unchanged(tiny):
    _, full, _, _ = _setup(tiny)
    config, setup, step, batch = _setup(tiny, **{"optim.frozen": LIT})
    sizes = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
    params = _leaves(setup.state["params"])
    n_trainable = sum(x.size for k, x in params.items() if not k.startswith(LIT))
    # Adam's two moments of each trainable parameter, plus the step counters.
    counters = sum(x.size for x in jax.tree.leaves(setup.state["opt_state"]) if x.dtype == jnp.int32)
    assert (
        counters == sum(x.size for x in jax.tree.leaves(full.state["opt_state"]) if x.dtype == jnp.int32) > 0
    )
    assert sizes(setup.state["opt_state"]) == 2 * n_trainable + counters
    assert sizes(full.state["opt_state"]) == 2 * sizes(full.state["params"]) + counters
    opt_shapes = {x.shape for x in jax.tree.leaves(setup.state["opt_state"])}
    assert not opt_shapes & {params["image_proj/kernel"].shape, params["image_tower/norm/scale"].shape}

    state = setup.state
    for _ in range(3):
        state, metrics = step(state, batch, False)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["nonfinite_skipped"]) == 0
    after = _leaves(state["params"])
    for key, before in params.items():
        if key.startswith(LIT):
            assert after[key].tobytes() == before.tobytes(), key
        else:
            assert not np.array_equal(after[key], before), key


# ------------------------------------------------------------------------ lr multipliers


def test_lr_multipliers_scale_the_updates_of_what_they_match(tiny):
    settings = {"optim.schedule": "constant", "optim.warmup_fraction": 0.0, "optim.warmup_steps": 0}
    results = {}
    for multipliers in ((), ("image_tower=0.5", "text_tower/encoder=0.25", "text_.*=2")):
        config, setup, step, batch = _setup(tiny, **settings, **{"optim.lr_multipliers": multipliers})
        before = _leaves(setup.state["params"])
        state, metrics = step(setup.state, batch, False)
        results[multipliers] = ({k: _leaves(state["params"])[k] - x for k, x in before.items()}, metrics)
    (base, base_metrics), (scaled, metrics) = results.values()
    # An update is read back as new - old float32 parameter, exact to an ulp of the parameter
    # (4e-9 on a weight of 0.03, against deltas near 1e-6), not to a fraction of the delta.
    ulp = {k: np.finfo(np.float32).eps * np.abs(x).max() for k, x in before.items()}
    assert float(metrics["lr"]) == float(base_metrics["lr"]) == pytest.approx(config.optim.lr)
    for key, delta in base.items():
        # The first matching pattern wins: the encoder 0.25, the rest of the text tower 2.
        factor = {"image_tower": 0.5, "text_tower/encoder": 0.25, "text_tower": 2.0, "text_proj": 2.0}
        f = next((v for k, v in factor.items() if key.startswith(k)), 1.0)
        assert np.abs(delta).max() > 0, key
        np.testing.assert_allclose(
            scaled[key], f * delta, rtol=1e-3, atol=2 * max(ulp[key], 1e-6 * np.abs(delta).max()), err_msg=key
        )


# --------------------------------------------------------------------- config mistakes


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"optim.frozen": ("image_towr",)}, "optim.frozen: pattern 'image_towr' matches no parameter"),
        (
            {"optim.frozen": ("image_tower,text_proj",)},
            "optim.frozen: pattern 'image_tower,text_proj' .*tuple",
        ),
        ({"optim.frozen": ("tower",)}, "optim.frozen: pattern 'tower' matches no parameter"),
        ({"optim.frozen": (".*",)}, "optim.frozen: .* freezes every parameter"),
        ({"optim.frozen": ("image_(",)}, "optim.frozen: 'image_\\(' is not a regular expression"),
        (
            {"optim.lr_multipliers": ("text=0.5",)},
            "optim.lr_multipliers: pattern 'text' matches no parameter",
        ),
        (
            {"optim.lr_multipliers": ("text_tower",)},
            "optim.lr_multipliers: 'text_tower' is not a 'pattern=factor'",
        ),
        ({"optim.lr_multipliers": ("text_tower=-1",)}, "optim.lr_multipliers: .* >= 0"),
        ({"init_from_towers": ("image",), "init_from": "x"}, "init_from_towers: 'image' is not a part"),
        ({"init_from_towers": ("image_tower",)}, "init_from_towers: .*`init_from`, which is not set"),
    ],
)
def test_a_pattern_or_part_that_matches_nothing_is_one_line_before_anything_runs(
    tmp_path, overrides, message
):
    config = apply_overrides(load_config("demo.py"), overrides)
    with pytest.raises(ConfigError, match=message) as info:
        validate(config, num_devices=8)
    assert "\n" not in str(info.value)
    # The trainer checks it first: no workdir, no compilation.
    with pytest.raises(ConfigError, match=message):
        train_lib.train(config, str(tmp_path / "run"), **QUIET)
    assert not (tmp_path / "run").exists()


def test_patterns_match_whole_paths_or_leading_parts():
    assert optim.matches("image_tower", "image_tower/stem/conv/kernel")
    assert optim.matches("image_tower/stages/0", "image_tower/stages/0/down/conv/kernel")
    assert not optim.matches("image_tower/stages/0", "image_tower/stages/01/x")
    assert not optim.matches("image", "image_tower/stem/conv/kernel")
    assert optim.matches(".*/bias", "text_tower/norm/bias") and not optim.matches(
        ".*/bias", "text_tower/norm"
    )
    assert optim.matches("logit_scale", "logit_scale")


def test_which_changes_a_resume_allows():
    stored = load_config("lit_demo.py")
    stored.init_from = "runs/demo"
    for key, value in (("init_from_towers", ("image_tower",)), ("init_from", "runs/other")):
        assert key in check_resume(
            stored, apply_overrides(stored.copy_and_resolve_references(), {key: value}), "w"
        )
    changed = apply_overrides(
        stored.copy_and_resolve_references(), {"optim.lr_multipliers": ("text_tower=0.5",)}
    )
    with pytest.raises(ResumeError, match="optim.lr_multipliers"):
        check_resume(stored, changed, "w")
    changed.resume.allow_changes = "optim.lr_multipliers"
    assert "optim.lr_multipliers" in check_resume(stored, changed, "w")
    # Which parameters have optimizer state is part of the checkpoint: never changed in a run.
    changed = apply_overrides(stored.copy_and_resolve_references(), {"optim.frozen": ("image_tower",)})
    changed.resume.allow_changes = "optim.frozen"
    with pytest.raises(ResumeError, match="optim.frozen=.*cannot change.*init_from=w") as info:
        check_resume(stored, changed, "w")
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------ init_from_towers


@pytest.fixture
def demo_run(tiny_run):
    """The shared tiny demo run (tests/conftest.py), to start from."""
    return str(tiny_run.workdir)


def _final_params(workdir):
    ckpt = Checkpointer(workdir)
    params = ckpt.manager.restore(ckpt.latest_step())["state"]["params"]
    ckpt.close()
    return _leaves(params)


def test_init_from_towers_copies_exactly_the_named_parts(tiny, demo_run, tmp_path):
    """LiT from the demo with a text tower of another size, learning rate 0 so that the step
    changes nothing: the image parts are the demo's, the rest is this config's fresh start."""
    config, tokenizer, mesh, _ = tiny
    lit = apply_overrides(
        config.copy_and_resolve_references(),
        {"init_from": demo_run, "init_from_towers": LIT, "optim.frozen": LIT, "optim.lr": 0.0, "steps": 1},
    )
    lit.model.text.depth = 1  # the demo's has 2: parts not copied are not compared
    lines = []
    train_lib.train(lit, str(tmp_path / "lit"), log=lines.append)
    assert any(
        f"initialised image_tower, image_proj from the weights of {demo_run}" in line for line in lines
    )
    demo, got = _final_params(demo_run), _final_params(str(tmp_path / "lit"))
    fresh = _leaves(init_train_state(lit, mesh, vocab_size=tokenizer.vocab_size).state["params"])
    assert set(got) == set(fresh)
    for key, value in got.items():
        expected = demo[key] if key.startswith(LIT) else fresh[key]
        assert value.tobytes() == expected.tobytes(), key
        if not key.startswith(LIT) and key in demo and demo[key].shape == value.shape:
            assert not np.array_equal(value, demo[key]), key  # the demo trained these: not copied

    # Another image tower: the first parameter whose shape differs, both shapes, in one line.
    other = apply_overrides(lit.copy_and_resolve_references(), {"model.image.stem_width": 16})
    with pytest.raises(RestoreError) as info:
        train_lib.train(other, str(tmp_path / "other"), **QUIET)
    message = str(info.value)
    assert "\n" not in message
    assert (
        "params[image_tower][stages][0][down][conv][kernel] has shape (3, 3, 32, 64) in the checkpoint"
        in message
    )
    assert "(3, 3, 16, 64) in the config" in message
