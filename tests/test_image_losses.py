"""SigLIP 2's image-side losses: the EMA teacher's update, the two losses against their written-out
definitions, masked patches hidden from the student, and gradients on 8 devices equal to one's.
(The teacher resuming bit for bit: tests/test_resume.py's siglip2_image_losses case.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from clipjax.config import ConfigError, validate
from clipjax.losses import image_losses
from clipjax.models.two_towers import model_factory
from clipjax.trainer.step import TEACHER_MEANS, update_teacher
from tests.helpers import assert_gradients_equal, rel_err, source_and_tokenizer, tiny_demo

OVERRIDES = {
    "model.image.kind": "vit",
    "model.image.pool": "cls",
    "model.image.patch_size": 8,
    "model.image_heads.prototypes": 16,
    "image_losses.self_distillation": 1.0,
    "image_losses.masked_prediction": 0.5,
    "image_losses.start": 0.0,
    "image_losses.local_views": 2,
}


def _config(data_dir, **overrides):
    return tiny_demo(data_dir, **{**OVERRIDES, **overrides})


def _models(config, seed=0):
    """A student and a teacher of another initialisation (as after some EMA steps)."""
    student = model_factory(config, vocab_size=64)()
    config.seed = seed + 1
    teacher = model_factory(config, vocab_size=64)()
    config.seed = seed
    return student, teacher


def _images(b=6, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, 32, 32, 3), 0, 256).astype(jnp.uint8)


def test_the_teacher_is_the_ema_of_the_parameters_with_a_cosine_momentum(tfds_dir):
    config = _config(tfds_dir, **{"image_losses.start": 0.5})
    m0 = float(image_losses.teacher_momentum(config, 0, 100))
    m_end = float(image_losses.teacher_momentum(config, 99, 100))
    m_mid = float(image_losses.teacher_momentum(config, 49.5, 100))
    assert m0 == pytest.approx(0.996) and m_end == pytest.approx(1.0) and m_mid == pytest.approx(0.998)
    rng = np.random.default_rng(0)
    tree = lambda: {"image_tower": {"w": rng.normal(size=(3, 2))}, "image_heads": {"v": rng.normal(size=4)}}
    teacher, params = {**tree(), "centers": {"pooled": np.ones(4), "patch": np.ones(4)}}, tree()
    means = {"pooled": np.full(4, 3.0), "patch": np.full(4, 5.0)}
    for step, on in ((10, False), (60, True)):
        m = float(image_losses.teacher_momentum(config, step, 100))
        new = update_teacher(config, teacher, params, means, step, 100)
        for part in ("image_tower", "image_heads"):
            for key in teacher[part]:
                want = m * teacher[part][key] + (1 - m) * params[part][key]
                np.testing.assert_allclose(new[part][key], want, rtol=1e-6)
        # The centres move only once the losses are on (step 50 of 100).
        want = 0.9 * 1.0 + 0.1 * 3.0 if on else 1.0
        np.testing.assert_allclose(new["centers"]["pooled"], np.full(4, want), rtol=1e-6)


def test_prototype_cross_entropy_is_the_centred_sharpened_teacher_against_the_student():
    rng = np.random.default_rng(1)
    s, t, c = rng.normal(size=(5, 7)), rng.normal(size=(5, 7)), rng.normal(size=7)
    got = image_losses.prototype_cross_entropy(jnp.asarray(s), jnp.asarray(t), jnp.asarray(c), 0.1, 0.04)
    p = np.exp((t - c) / 0.04 - np.max((t - c) / 0.04, axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    log_q = s / 0.1 - np.log(np.sum(np.exp(s / 0.1), axis=1, keepdims=True))
    np.testing.assert_allclose(got, -(p * log_q).sum(axis=1), rtol=1e-5, atol=1e-6)


def test_both_losses_equal_their_written_out_definitions(tfds_dir):
    """Self-distillation: the mean over local views of the cross-entropy of the student's local
    view against the teacher's whole image; masked prediction: over the masked patches only."""
    config = _config(tfds_dir)
    student, teacher = _models(config)
    images, index = _images(), jnp.arange(6) + 10
    centers = {"pooled": jnp.full((16,), 0.1), "patch": jnp.full((16,), -0.2)}
    distill, masked, means = image_losses.image_losses(
        student, teacher, images, index, centers, config=config, step=7
    )
    ce = lambda s, t, c: image_losses.prototype_cross_entropy(s, t, c, 0.1, 0.04)
    t_pooled, t_tokens = teacher.image_tower.encode(teacher._standardize(images))
    t_global = teacher.image_heads.pooled(t_pooled)
    views = image_losses.local_views(images, index, seed=config.seed, step=7, count=2, scale=(0.1, 0.4))
    want = np.mean(
        [
            np.mean(
                ce(
                    student.image_heads.pooled(student.image_tower.encode(student._standardize(v))[0]),
                    t_global,
                    centers["pooled"],
                )
            )
            for v in views
        ]
    )
    assert rel_err(distill, want) < 1e-5
    mask = image_losses.patch_masks(index, seed=config.seed, step=7, patches=16, ratio=0.5)
    assert (np.asarray(mask).sum(axis=1) == 8).all()
    _, s_tokens = student.image_tower.encode(
        student._standardize(images), mask, student.image_heads.mask_token[...]
    )
    per_patch = np.asarray(
        ce(
            student.image_heads.patch(s_tokens[:, 1:]),
            teacher.image_heads.patch(t_tokens[:, 1:]),
            centers["patch"],
        )
    )
    assert rel_err(masked, per_patch[np.asarray(mask)].mean()) < 1e-5
    np.testing.assert_allclose(
        means["patch"], np.mean(teacher.image_heads.patch(t_tokens[:, 1:]), axis=(0, 1)), rtol=1e-5
    )


def test_masked_patches_never_reach_the_student():
    """No output of the student's masked pass depends on a masked patch's pixels."""
    model = model_factory(tiny_demo("unused", **OVERRIDES), vocab_size=64)()
    images = jax.random.uniform(jax.random.key(3), (2, 32, 32, 3))
    mask = image_losses.patch_masks(jnp.arange(2), seed=0, step=1, patches=16, ratio=0.5)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)  # nnx modules do not cross into jax.grad's trace

    def outputs(x):
        m = nnx.merge(graphdef, params)
        pooled, tokens = m.image_tower.encode(m._standardize(x), mask, m.image_heads.mask_token[...])
        return jnp.sum(pooled**2) + jnp.sum(jnp.sin(tokens))

    grad = np.asarray(jax.grad(outputs)(images))  # [2, 32, 32, 3]
    per_patch = np.abs(grad).reshape(2, 4, 8, 4, 8, 3).sum(axis=(2, 4, 5)).reshape(2, 16)
    assert (per_patch[np.asarray(mask)] == 0).all()
    assert (per_patch[~np.asarray(mask)] > 0).all()


def test_image_losses_and_gradients_on_8_devices_equal_one_device(tfds_dir):
    from clipjax.parallel import host_batch_to_global, make_mesh
    from clipjax.trainer.state import init_train_state
    from clipjax.trainer.step import make_grad_fn

    base = _config(tfds_dir)
    source, tokenizer = source_and_tokenizer(base.data)
    batch = next(source.train_iterator(tokenizer, seed=0))
    batch = {k: batch[k] for k in ("image", "text", "text_id", "index")}
    results = []
    for devices, shape, impl in (
        (jax.devices()[:1], (1, 1, 1), "gather"),
        (jax.devices(), (4, 2, 1), "ring"),
    ):
        config = _config(tfds_dir, **{"loss.impl": impl})
        config.mesh.shape = shape
        mesh = make_mesh(config.mesh, devices=devices)
        setup = init_train_state(config, mesh, vocab_size=tokenizer.vocab_size)
        teacher = dict(setup.state["teacher"])
        # A teacher apart from the student (as after EMA steps), and centres off zero.
        teacher["image_heads"] = jax.tree.map(lambda x: x * 1.3, teacher["image_heads"])
        teacher["centers"] = jax.tree.map(lambda x: x + 0.05, teacher["centers"])
        grad_fn = jax.jit(make_grad_fn(config, setup.graphdef, mesh))
        (loss, (_, _, _, parts)), grads = grad_fn(
            setup.state["params"], host_batch_to_global(batch, mesh), None, 5, teacher=teacher
        )
        results.append((loss, jax.device_get(parts), jax.device_get(grads)))
    (loss_1, parts_1, grads_1), (loss_8, parts_8, grads_8) = results
    assert parts_1["self_distillation_loss"] > 0 and parts_1["masked_prediction_loss"] > 0
    assert rel_err(loss_8, loss_1) <= 1e-5
    for key in ("self_distillation_loss", "masked_prediction_loss"):
        assert rel_err(parts_8[key], parts_1[key]) <= 1e-5, key
    np.testing.assert_allclose(
        parts_8[TEACHER_MEANS]["patch"], parts_1[TEACHER_MEANS]["patch"], rtol=1e-5, atol=1e-6
    )
    assert np.abs(grads_1["image_heads"]["mask_token"]).max() > 0
    assert_gradients_equal(grads_8, grads_1)


@pytest.mark.parametrize(
    "overrides,key",
    [
        ({"model.image_heads.prototypes": 0}, "image_losses.self_distillation"),
        ({"model.image.kind": "resnet", "model.image.pool": "mean"}, "model.image_heads.prototypes"),
        ({"image_losses.mask_ratio": 1.0}, "image_losses.mask_ratio"),
    ],
)
def test_an_image_losses_config_that_cannot_train_is_one_line_naming_the_key(tfds_dir, overrides, key):
    with pytest.raises(ConfigError) as error:
        validate(_config(tfds_dir, **overrides), num_devices=1, check_data=False)
    assert str(error.value).startswith(key) and "\n" not in str(error.value)


def test_patch_labels_and_the_binary_miou():
    from clipjax.evals.dense import binary_miou, patch_labels

    masks = np.zeros((1, 8, 8), bool)
    masks[0, 0:4, 4:8] = True  # the top right patch of a 2 x 2 grid
    masks[0, 4:6, 4:8] = True  # half of the bottom right one
    masks[0, 6:7, 0:4] = True  # a quarter of the bottom left one
    np.testing.assert_array_equal(patch_labels(masks, 4), [[False, True, False, True]])
    truth = np.array([True, True, False, False, False, False])
    assert binary_miou(truth, truth) == 1.0
    predicted = np.array([True, False, False, False, False, True])
    # object: 1 / 3; background: 3 / 5
    assert binary_miou(predicted, truth) == pytest.approx((1 / 3 + 3 / 5) / 2)


def test_the_shapes_source_renders_the_masks_of_its_held_out_records(tfds_dir):
    from clipjax.data.sources.shapes import procedural as shapes

    config = _config(tfds_dir, **{"data.shapes_boxes": True})
    source, tokenizer = source_and_tokenizer(config.data)
    arrays = source.eval_arrays(tokenizer, max_examples=40)
    masks = source.object_masks("test", arrays["index"])
    np.testing.assert_array_equal(shapes.object_boxes(masks), arrays["box"])
    # The masked pixels are the object's colour (up to the noise), the others are not.
    image = arrays["image"].astype(float)
    inside = np.array([image[i][masks[i]].mean(axis=0) for i in range(40)])
    outside = np.array([image[i][~masks[i]].mean(axis=0) for i in range(40)])
    assert np.mean(np.abs(inside - outside).max(axis=1) > 40) > 0.9
