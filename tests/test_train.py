"""The trainer end to end at tiny sizes: exact sharded gradients, resume, every config runs."""

import importlib.util
import json
import os
import pathlib

import jax
import numpy as np
import pytest

from clipjax import trainer as train_lib
from clipjax.checkpoint import Checkpointer
from clipjax.config import apply_overrides
from clipjax.parallel import host_batch_to_global, make_mesh
from clipjax.trainer.state import init_train_state
from clipjax.trainer.step import make_grad_fn, make_loss_fn
from tests.helpers import rel_err, source_and_tokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.py"))


def load_config(name, arg="tiny"):
    spec = importlib.util.spec_from_file_location(name[:-3], ROOT / "configs" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture
def data_dir(tfds_dir):
    return tfds_dir


def tiny_demo(data_dir, **overrides):
    c = load_config("demo.py")
    c.data.data_dir = data_dir
    return apply_overrides(c, overrides)


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
    batch = {k: batch[k] for k in ("image", "text")}

    results = []
    for devices, shape in ((jax.devices()[:1], (1, 1, 1)), (jax.devices(), (4, 2, 1))):
        config.mesh.shape = shape
        mesh = make_mesh(config.mesh, devices=devices)
        setup = init_train_state(config, mesh, vocab_size=tokenizer.vocab_size)
        loss_fn = make_loss_fn(config, setup.graphdef, mesh)
        global_batch = host_batch_to_global(batch, mesh)
        (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
            setup.state["params"], global_batch
        )
        results.append((loss, jax.device_get(grads)))

    (loss_1, grads_1), (loss_8, grads_8) = results
    assert rel_err(loss_8, loss_1) <= 1e-5
    flat_1 = jax.tree_util.tree_flatten_with_path(grads_1)[0]
    flat_8 = jax.tree.leaves(grads_8)
    assert len(flat_1) == len(flat_8)
    # Relative to each leaf's own scale, floored at 1e-4 of the largest gradient: some leaves
    # (attention key biases) have an exactly-zero true gradient and hold only rounding noise.
    floor = 1e-4 * max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads_1))
    for (path, g1), g8 in zip(flat_1, flat_8):
        err = np.max(np.abs(np.asarray(g8, np.float64) - np.asarray(g1, np.float64)))
        assert err <= 1e-5 * max(float(np.max(np.abs(g1))), floor), jax.tree_util.keystr(path)
    assert abs(float(grads_1["logit_scale"])) > 0


def _final_params(workdir):
    ckpt = Checkpointer(workdir)
    step = ckpt.latest_step()
    restored = ckpt.manager.restore(step)
    ckpt.close()
    return step, restored["state"]["params"]


def test_resume_equals_uninterrupted_run(data_dir, tmp_path):
    config = tiny_demo(data_dir, **{"evals.at_end": False})
    config.steps = 6
    config.checkpoint_every = 100
    train_lib.train(config, str(tmp_path / "straight"))
    train_lib.train(config, str(tmp_path / "resumed"), stop_at=3)
    assert Checkpointer(str(tmp_path / "resumed")).latest_step() == 3
    train_lib.train(config, str(tmp_path / "resumed"))

    step_a, params_a = _final_params(str(tmp_path / "straight"))
    step_b, params_b = _final_params(str(tmp_path / "resumed"))
    assert step_a == step_b == 6
    for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # Both runs saw the same batches: the logged losses agree step by step.
    def losses(workdir):
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            return {r["step"]: r["loss"] for r in map(json.loads, f)}

    a, b = losses(str(tmp_path / "straight")), losses(str(tmp_path / "resumed"))
    for step in set(a) & set(b):
        assert a[step] == pytest.approx(b[step], rel=1e-6)


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
def test_every_config_runs_at_tiny_size(name, data_dir, tmp_path):
    config = load_config(name)
    config.data.data_dir = data_dir
    report = train_lib.train(config, str(tmp_path / "run"))
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert records[-1]["step"] == config.steps
    for key in ("loss", "temperature", "lr", "grad_norm", "param_norm", "samples_per_sec"):
        assert np.isfinite(records[-1][key]), key
    saved = json.load(open(tmp_path / "run" / "report.json"))
    assert saved["step"] == config.steps
    assert os.listdir(tmp_path / "run" / "tensorboard")
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


def test_ring_training_matches_gather_training(data_dir, tmp_path):
    """The demo trained with the ring loss follows the default (gather) run's loss curve."""
    runs = {}
    for impl in ("gather", "ring"):
        config = tiny_demo(
            data_dir, **{"evals.at_end": False, "log_every": 1, "loss.impl": impl, "metrics.every": 0}
        )
        config.steps = 6
        train_lib.train(config, str(tmp_path / impl))
        with open(tmp_path / impl / "metrics.jsonl") as f:
            runs[impl] = [json.loads(line)["loss"] for line in f]
    np.testing.assert_allclose(runs["ring"], runs["gather"], rtol=1e-5)


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
    floor = 1e-4 * max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads_1))
    for (path, g1), gk in zip(jax.tree_util.tree_flatten_with_path(grads_1)[0], jax.tree.leaves(grads_k)):
        err = np.max(np.abs(np.asarray(gk, np.float64) - np.asarray(g1, np.float64)))
        assert err <= 1e-5 * max(float(np.max(np.abs(g1))), floor), jax.tree_util.keystr(path)
    assert abs(float(grads_k["logit_scale"]) - float(grads_1["logit_scale"])) <= 1e-5 * abs(
        float(grads_1["logit_scale"])
    )


def test_microbatched_training_matches_default(data_dir, tmp_path):
    runs = {}
    for k in (1, 4):
        config = tiny_demo(
            data_dir, **{"evals.at_end": False, "log_every": 1, "microbatches": k, "metrics.every": 0}
        )
        config.steps = 6
        train_lib.train(config, str(tmp_path / str(k)))
        with open(tmp_path / str(k) / "metrics.jsonl") as f:
            runs[k] = [json.loads(line)["loss"] for line in f]
    np.testing.assert_allclose(runs[4], runs[1], rtol=1e-5)


def test_periodic_evaluation_during_training(data_dir, tmp_path):
    # Every 2 steps, except kNN, on its own cadence of 3.
    config = tiny_demo(data_dir, **{"evals.every": 2, "evals.knn.every": 3})
    report = train_lib.train(config, str(tmp_path))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    interim = [r for r in records if "eval/zero_shot/shape/top1" in r]
    assert [r["step"] for r in interim] == [2]  # step 4 is the end-of-run report
    assert 0.0 <= interim[0]["eval/retrieval/image_to_text/R@1"] <= 1.0
    assert not any(k.startswith("eval/knn/") for k in interim[0])
    knn = [r for r in records if "eval/knn/top1@k1" in r]
    assert [r["step"] for r in knn] == [3] and not any(k.startswith("eval/zero_shot/") for k in knn[0])
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


def test_profile_writes_a_trace_of_the_chosen_steps(data_dir, tmp_path):
    config = tiny_demo(data_dir, **{"evals.at_end": False, "profile.start_step": 2, "profile.steps": 2})
    lines = []
    train_lib.train(config, str(tmp_path), log=lines.append)
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert any("profile of steps 2-3" in line for line in lines), lines
