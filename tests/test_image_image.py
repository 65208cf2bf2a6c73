"""Image-image (SimCLR) mode through the one trainer: exact sharded gradients through the on-device
views and the projector, micro-batching, SogCLR's per-sample state sharded (its resume:
test_resume.py), and what the model offers evaluation."""

import jax
import numpy as np
import pytest

from clipjax.config import ConfigError, apply_overrides, validate
from clipjax.evals.runner import EvalRunner
from clipjax.losses import objective_loss
from clipjax.parallel import batch_axes, host_batch_to_global, make_mesh
from clipjax.trainer.state import init_train_state
from clipjax.trainer.step import make_grad_fn, make_loss_fn
from tests.helpers import assert_gradients_equal, load_config, rel_err, source_and_tokenizer


def simclr_tiny(data_dir, **overrides):
    return apply_overrides(load_config("simclr_demo.py"), {"data.data_dir": data_dir, **overrides})


def _step_inputs(batch):
    return {k: batch[k] for k in ("image", "text", "text_id", "label", "index")}


# The temperature's gradient is the difference of two averages over the batch's pairs (the
# positives' similarity and the softmax-weighted negatives'), which cancel to a fraction of either:
# float32 rounding is relative to those terms, not to their difference (SogCLR's logit_scale
# gradient, 0.21, differs by 2.6e-5 of it between 1 and 8 devices when the tests' XLA skips LLVM's
# optimisations). A temperature counted twice or not at all is off by its whole size.
TEMPERATURE_TOL = {"['logit_scale']": 1e-4}


@pytest.mark.parametrize("loss_name", ["softmax", "sogclr"])
def test_sharded_image_image_grads_equal_single_device(tfds_dir, loss_name):
    """NT-Xent (and SogCLR) through augment -> tower -> projector: 8 devices equal one device,
    and the loss equals `objective_loss` on the projections the model gives."""
    config = simclr_tiny(tfds_dir, **{"loss.name": loss_name})
    source, tokenizer = source_and_tokenizer(config.data)
    batch = _step_inputs(next(source.train_iterator(tokenizer, seed=0)))
    results = []
    for devices, shape in ((jax.devices()[:1], (1, 1, 1)), (jax.devices(), (4, 2, 1))):
        config.mesh.shape = shape
        mesh = make_mesh(config.mesh, devices=devices)
        setup = init_train_state(config, mesh, vocab_size=tokenizer.vocab_size)
        loss_fn = make_loss_fn(config, setup.graphdef, mesh)
        global_batch = host_batch_to_global(batch, mesh)
        loss_state = setup.state.get("loss_state", {})
        (loss, (a, b, new_state, _)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
            setup.state["params"], global_batch, loss_state, 3
        )
        # The same loss from the embeddings alone: the step adds nothing of its own.
        direct, _ = objective_loss(
            config.loss,
            a,
            b,
            setup.state["params"]["logit_scale"],
            None,
            ids=global_batch["index"],
            labels=global_batch["label"],
            index=global_batch["index"],
            loss_state=loss_state,
            mesh=mesh,
            batch_axes=batch_axes(mesh),
            intra=True,
        )
        assert rel_err(direct, loss) <= 1e-6
        # The two views differ (they are different augmentations of one image).
        assert float(np.mean(np.sum(np.asarray(a) * np.asarray(b), axis=1))) < 0.999
        results.append((loss, jax.device_get(grads), jax.device_get(new_state)))
    (loss_1, grads_1, state_1), (loss_8, grads_8, state_8) = results
    assert rel_err(loss_8, loss_1) <= 1e-5
    assert_gradients_equal(grads_8, grads_1, leaf_rtol=TEMPERATURE_TOL)
    assert abs(float(grads_1["projector"]["layers"][0]["kernel"].sum())) > 0
    if loss_name == "sogclr":
        visited = np.isfinite(state_1["log_u"])
        assert visited.sum() == 2 * len(batch["index"])  # one estimate per view-anchor of the batch
        # log u is the log of a sum of order one: float32 rounding is absolute there, and a
        # relative tolerance alone fails the entries that land near log u = 0.
        np.testing.assert_allclose(state_8["log_u"][visited], state_1["log_u"][visited], rtol=1e-5, atol=1e-5)


def test_microbatched_image_image_grads_equal_full_batch(tfds_dir):
    config = simclr_tiny(tfds_dir)
    source, tokenizer = source_and_tokenizer(config.data)
    batch = _step_inputs(next(source.train_iterator(tokenizer, seed=0)))
    config.mesh.shape = (4, 2, 1)
    mesh = make_mesh(config.mesh)
    setup = init_train_state(config, mesh, vocab_size=tokenizer.vocab_size)
    global_batch = host_batch_to_global(batch, mesh)
    results = []
    for k in (1, 2):
        config.microbatches = k
        (loss, _), grads = jax.jit(make_grad_fn(config, setup.graphdef, mesh))(
            setup.state["params"], global_batch, {}, 5
        )
        results.append((float(loss), jax.device_get(grads)))
    (loss_1, grads_1), (loss_2, grads_2) = results
    assert abs(loss_2 - loss_1) <= 1e-5 * abs(loss_1)
    assert_gradients_equal(grads_2, grads_1, leaf_rtol=TEMPERATURE_TOL)


def test_sogclr_state_is_sharded_over_the_batch_axes(tfds_dir):
    """SogCLR's per-sample estimates are stored sharded over the batch axes, never replicated
    (that they are checkpointed and resumed exactly: test_resume.py)."""
    config = simclr_tiny(tfds_dir, **{"loss.name": "sogclr", "mesh.shape": (4, 2, 1)})
    setup = init_train_state(config, make_mesh(config.mesh), vocab_size=300)
    log_u = setup.state["loss_state"]["log_u"]
    assert tuple(setup.shardings["loss_state"]["log_u"].spec) == (None, ("data", "fsdp"))
    assert {s.data.shape for s in log_u.addressable_shards} == {(2, log_u.shape[1] // 8)}


def test_image_image_model_offers_features_not_text(tfds_dir):
    """Evaluation reads the tower's features (before the projector); evaluators that need text
    report themselves skipped instead of failing the run."""
    config = simclr_tiny(tfds_dir, **{"evals.zero_shot.enabled": True})
    source, tokenizer = source_and_tokenizer(config.data)
    mesh = make_mesh(config.mesh)
    setup = init_train_state(config, mesh, vocab_size=tokenizer.vocab_size)
    from flax import nnx

    model = nnx.merge(setup.graphdef, setup.state["params"])
    images = next(source.train_iterator(tokenizer, seed=0))["image"][:4]
    features = np.asarray(model.encode_image(images))
    assert features.shape[1] == model.image_tower.out_dim != config.model.embed_dim
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)
    assert np.asarray(model.project_image(images)).shape[1] == config.model.embed_dim
    assert "text_tower" not in nnx.to_pure_dict(nnx.state(model, nnx.Param))
    report = EvalRunner(config, source, tokenizer).run(setup.graphdef, setup.state["params"], mesh, 0)
    assert "no text tower" in report["skipped"]["zero_shot"]
    assert set(report["linear_probe"]["fields"]) == set(config.evals.linear_probe.fields)


def test_image_image_config_mistakes_fail_before_compiling(tfds_dir):
    config = simclr_tiny(tfds_dir, **{"loss.name": "multi_positive"})
    with pytest.raises(ConfigError, match="loss.positives"):
        validate(config, num_devices=1)
    config = simclr_tiny(tfds_dir, **{"loss.name": "multi_positive", "loss.positives": "label"})
    validate(config, num_devices=1)
    config = simclr_tiny(tfds_dir, **{"task": "image_txt"})
    with pytest.raises(ConfigError, match="task"):
        validate(config, num_devices=1)
    config = simclr_tiny(tfds_dir, **{"augment.flip": 1.5})
    with pytest.raises(ConfigError, match="augment.flip"):
        validate(config, num_devices=1)
