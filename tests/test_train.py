"""The trainer end to end at tiny sizes: exact sharded gradients, every config runs (resume: test_resume.py)."""

import json
import os

import jax
import numpy as np
import pytest

from clipjax import trainer as train_lib
from clipjax.data.naflex import NaflexInputs
from clipjax.parallel import host_batch_to_global, make_mesh
from clipjax.trainer.state import init_train_state
from clipjax.trainer.step import make_grad_fn, make_loss_fn
from tests.helpers import ROOT, assert_gradients_equal, load_config, rel_err, source_and_tokenizer, tiny_demo

CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.py"))


@pytest.fixture
def data_dir(tfds_dir):
    return tfds_dir


@pytest.mark.parametrize(
    "loss_name,impl", [("softmax", "gather"), ("sigmoid", "gather"), ("softmax", "ring"), ("sigmoid", "ring")]
)
def test_sharded_grads_equal_single_device(data_dir, loss_name, impl):
    """Loss and every parameter's gradient on 8 devices (FSDP x data) equal one device's."""
    config = tiny_demo(data_dir, **{"loss.name": loss_name, "loss.impl": impl})
    if loss_name == "sigmoid":
        config.model.logit_bias_init = -10.0
        config.model.logit_scale_init = float(np.log(10.0))
    source, tokenizer = source_and_tokenizer(config.data)
    batch = next(source.train_iterator(tokenizer, seed=0))
    _assert_sharded_grads_equal_single_device(config, {k: batch[k] for k in ("image", "text")}, tokenizer)


def test_sharded_naflex_grads_equal_single_device(data_dir):
    """A NaFlex batch (random regions of several aspect ratios in 14 patches of 8 px, every one with
    padding) through the masked MAP head and the sigmoid loss: 8 devices in 2 micro-batches equal
    one device in one, with noise in the 8 devices' padded patches, which changes nothing."""
    overrides = {"model.image.kind": "vit", "model.image.patch_size": 8, "model.image.pool": "map"}
    config = tiny_demo(data_dir, **overrides, **{"model.image.naflex": True, "loss.name": "sigmoid"})
    config.model.logit_bias_init, config.model.logit_scale_init = -10.0, float(np.log(10.0))
    config.data.random_resized_crop = (0.3, 1.0)
    source, tokenizer = source_and_tokenizer(config.data)
    batch = next(source.train_iterator(tokenizer, seed=0, naflex=NaflexInputs(8, (14,))))
    rows, cols = batch["image_grid"].T
    assert batch["image"].shape[1] == 14 and (rows * cols < 14).all() and (rows != cols).any()
    batch = {k: batch[k] for k in ("image", "image_grid", "text")}
    padding = np.arange(14)[None, :] >= (rows * cols)[:, None]
    noise = np.random.default_rng(0).integers(0, 256, batch["image"].shape, dtype=np.uint8)
    noisy = {**batch, "image": np.where(padding[..., None], noise, batch["image"])}
    _assert_sharded_grads_equal_single_device(config, batch, tokenizer, sharded_batch=noisy, microbatches=2)


def _assert_sharded_grads_equal_single_device(config, batch, tokenizer, sharded_batch=None, microbatches=1):
    """`sharded_batch` and `microbatches`: what the 8 devices get instead."""
    results = []
    for devices, shape in ((jax.devices()[:1], (1, 1, 1)), (jax.devices(), (4, 2, 1))):
        config.mesh.shape = shape
        mesh = make_mesh(config.mesh, devices=devices)
        setup = init_train_state(config, mesh, vocab_size=tokenizer.vocab_size)
        loss_fn = make_loss_fn(config, setup.graphdef, mesh)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        sharded = len(devices) > 1 and sharded_batch is not None
        if sharded and microbatches > 1:
            config.microbatches = microbatches
            grad_fn = make_grad_fn(config, setup.graphdef, mesh)
        global_batch = host_batch_to_global(sharded_batch if sharded else batch, mesh)
        (loss, _), grads = jax.jit(grad_fn)(setup.state["params"], global_batch)
        results.append((loss, jax.device_get(grads)))

    (loss_1, grads_1), (loss_8, grads_8) = results
    assert rel_err(loss_8, loss_1) <= 1e-5
    # Relative to each leaf's own scale, floored at 1e-4 of the largest gradient: some leaves
    # (attention key biases) have an exactly-zero true gradient and hold only rounding noise.
    assert_gradients_equal(grads_8, grads_1)
    assert abs(float(grads_1["logit_scale"])) > 0


def _distinct_tiny_configs() -> list[str]:
    """The configs whose tiny variant no earlier config has (clip_vit_l14.py:tiny is
    clip_vit_b32.py:tiny): training one twice would test nothing new."""
    seen, names = [], []
    for name in CONFIGS:
        values = load_config(name).to_dict()
        if values not in seen:
            seen.append(values)
            names.append(name)
    return names


@pytest.mark.parametrize("name", _distinct_tiny_configs())
def test_every_config_runs_at_tiny_size(name, data_dir, tmp_path, request):
    if name == "demo.py":  # trained once for all the tests that need it (tests/conftest.py)
        run = request.getfixturevalue("tiny_run")
        config, workdir, report = run.config(), run.workdir, run.report
    else:
        config, workdir = load_config(name), tmp_path / "run"
        config.data.data_dir = data_dir
        report = train_lib.train(config, str(workdir))
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert records[-1]["step"] == config.steps
    for key in ("loss", "temperature", "lr", "grad_norm", "param_norm", "samples_per_sec"):
        assert np.isfinite(records[-1][key]), key
    saved = json.load(open(workdir / "report.json"))
    assert saved["step"] == config.steps
    assert os.listdir(workdir / "tensorboard")
    if config.task == "image_image":
        # SimCLR: the tower's features are probed (semantic and nuisance labels); nothing needs text.
        assert 0.0 <= saved["linear_probe"]["top1"] <= 1.0
        assert set(saved["linear_probe"].get("fields", {})) == set(config.evals.linear_probe.fields)
        assert report["knn"] == saved["knn"]
        assert "zero_shot" not in saved and "retrieval" not in saved
        return
    assert 0.0 <= saved["retrieval"]["image_to_text"]["R@1"] <= 1.0
    assert set(saved["zero_shot"]) >= {"shape", "color", "mean_top1"}
    assert report["retrieval"] == saved["retrieval"]


def _losses(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


@pytest.mark.parametrize("change", [{"loss.impl": "ring"}, {"microbatches": 4}], ids=["ring", "microbatches"])
def test_ring_loss_and_micro_batches_train_like_the_default(tiny_run, change, tmp_path):
    """The shared tiny run trained again with the ring loss, or in 4 micro-batches, follows its
    (gather, one batch) loss curve step by step."""
    train_lib.train(tiny_run.config(**{"evals.at_end": False, **change}), str(tmp_path), log=lambda _: None)
    assert len(_losses(tmp_path)) == 4
    np.testing.assert_allclose(_losses(tmp_path), _losses(tiny_run.workdir), rtol=1e-5)


@pytest.mark.parametrize("microbatches,loss_name", [(2, "softmax"), (4, "softmax"), (4, "sigmoid")])
def test_microbatched_grads_equal_full_batch(data_dir, microbatches, loss_name):
    """GradCache-style micro-batching gives the full-batch gradients, temperature counted once."""
    config = tiny_demo(data_dir, **{"loss.name": loss_name})
    if loss_name == "sigmoid":
        config.model.logit_bias_init = -10.0
        config.model.logit_scale_init = float(np.log(10.0))
    source, tokenizer = source_and_tokenizer(config.data)
    batch = next(source.train_iterator(tokenizer, seed=0))
    config.mesh.shape = (4, 2, 1)
    mesh = make_mesh(config.mesh)
    setup = init_train_state(config, mesh, vocab_size=tokenizer.vocab_size)
    global_batch = host_batch_to_global({k: batch[k] for k in ("image", "text")}, mesh)
    results = []
    for k in (1, microbatches):
        config.microbatches = k
        grad_fn = make_grad_fn(config, setup.graphdef, mesh)
        (loss, _), grads = jax.jit(grad_fn)(setup.state["params"], global_batch)
        results.append((float(loss), jax.device_get(grads)))
    (loss_1, grads_1), (loss_k, grads_k) = results
    assert abs(loss_k - loss_1) <= 1e-5 * abs(loss_1)
    assert_gradients_equal(grads_k, grads_1)
    assert abs(float(grads_k["logit_scale"]) - float(grads_1["logit_scale"])) <= 1e-5 * abs(
        float(grads_1["logit_scale"])
    )


def test_periodic_evaluation_during_training(tiny_run):
    # Every 2 steps, except kNN, on its own cadence of 3 (tests/conftest.py: TINY_RUN_EXTRAS).
    records = [json.loads(line) for line in open(tiny_run.workdir / "metrics.jsonl")]
    interim = [r for r in records if "eval/zero_shot/shape/top1" in r]
    assert [r["step"] for r in interim] == [2]  # step 4 is the end-of-run report
    assert 0.0 <= interim[0]["eval/retrieval/image_to_text/R@1"] <= 1.0
    assert not any(k.startswith("eval/knn/") for k in interim[0])
    knn = [r for r in records if "eval/knn/top1@k1" in r]
    assert [r["step"] for r in knn] == [3] and not any(k.startswith("eval/zero_shot/") for k in knn[0])
    report = tiny_run.report
    assert report["step"] == 4 and "knn" in report and "zero_shot" in report


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg", ["", "tiny"])
def test_weight_decay_reaches_every_kernel_and_no_bias_norm_or_vector(name, arg):
    from flax import nnx

    from clipjax import optim
    from clipjax.models import model_factory

    config = load_config(name, arg)
    model = nnx.eval_shape(model_factory(config, vocab_size=100))
    mask = jax.tree_util.tree_flatten_with_path(optim.weight_decay_mask(model))[0]
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert len(mask) == len(params)
    for path, decayed in mask:
        key = jax.tree_util.keystr(path)
        leaf = str(path[-1].key)
        if "bias" in leaf or leaf == "scale" or leaf in ("logit_scale", "probe", "cls"):
            assert not decayed, key
        if leaf in ("kernel", "query", "key", "value", "out", "embed"):
            assert decayed, key


def test_profile_writes_a_trace_of_the_chosen_steps(tiny_run):
    traces = list((tiny_run.workdir / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert any("profile of steps 2-3" in line for line in tiny_run.lines), tiny_run.lines
