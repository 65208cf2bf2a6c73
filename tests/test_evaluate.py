"""Evaluation from checkpoints on any mesh, and the Python API."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import clipjax
from clipjax.api import RestoreError
from clipjax.evals.retrieval import retrieval_metrics
from clipjax.api import evaluate_workdir as evaluate
from clipjax.config import apply_overrides
from clipjax.data.sources import make_source
from tests.helpers import ROOT


@pytest.fixture
def trained(tiny_run):
    """The shared tiny demo, trained on 8 devices with FSDP (4 data x 2 fsdp; tests/conftest.py)."""
    return tiny_run.workdir, tiny_run.report


def _numbers(report):
    return {k: v for k, v in report.items() if k not in ("timing",)}


def test_evaluate_on_one_and_two_devices_equals_training_report(trained, tmp_path):
    workdir, train_report = trained
    one = evaluate(str(workdir), out=str(tmp_path / "one"), devices=jax.devices()[:1])
    two = evaluate(str(workdir), out=str(tmp_path / "two"), devices=jax.devices()[:2])
    assert one["step"] == two["step"] == train_report["step"]
    for key in ("zero_shot", "retrieval"):
        assert one[key] == two[key] == train_report[key]
    np.testing.assert_allclose(
        one["embedding"]["img_spectrum"], train_report["embedding"]["img_spectrum"], rtol=1e-4, atol=1e-7
    )
    saved = json.load(open(tmp_path / "one" / "report.json"))
    assert saved["retrieval"] == one["retrieval"]
    markdown = (tmp_path / "one" / "report.md").read_text()
    assert "Zero-shot" in markdown and "Retrieval" in markdown and "probe_spectrum.png" in markdown
    assert (tmp_path / "one" / "probe_spectrum.png").stat().st_size > 0


def test_load_api_embeddings(trained):
    workdir, train_report = trained
    single = clipjax.load(str(workdir), devices=jax.devices()[:1])
    multi = clipjax.load(str(workdir), devices=jax.devices())
    arrays = make_source(single.config.data).eval_arrays(
        single.tokenizer, split="test", max_examples=single.config.evals.max_examples
    )
    img_1, img_8 = single.encode_image(arrays["image"]), multi.encode_image(arrays["image"])
    txt_1 = single.encode_text(list(arrays["caption"]))
    np.testing.assert_allclose(img_8, img_1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(img_1, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(
        single.tokenize(["a red circle"]), single.tokenizer.encode(["a red circle"])
    )
    # The embeddings are the ones training evaluated: they reproduce its retrieval numbers.
    assert retrieval_metrics(img_1, txt_1, arrays["label"]) == train_report["retrieval"]
    assert single.similarity(img_1[:2], txt_1[:3]).shape == (2, 3)


def test_restore_errors_are_one_line(trained, tmp_path):
    workdir, _ = trained
    with pytest.raises(RestoreError, match="does not exist"):
        clipjax.load(str(tmp_path / "missing"))
    with pytest.raises(RestoreError, match="no checkpoint at step 3 .*steps: \\[2, 4\\]"):
        clipjax.load(str(workdir), step=3)
    with pytest.raises(RestoreError, match="does not match the model config: .*shape"):
        clipjax.load(str(workdir), config_overrides={"model.embed_dim": 32})
    result = subprocess.run(
        [sys.executable, "-m", "clipjax.evaluate", "--workdir", str(tmp_path / "missing")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"clipjax.evaluate: workdir '{tmp_path / 'missing'}' does not exist"
    ]


def test_plain_orbax_reads_the_checkpoint(trained):
    """The snippet of docs/checkpoints.md, with no clipjax import in the restore itself."""
    import orbax.checkpoint as ocp

    workdir, _ = trained
    path = str(workdir / "checkpoints" / "4" / "state")
    checkpointer = ocp.PyTreeCheckpointer()
    saved = checkpointer.metadata(path).item_metadata["params"]
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), saved)
    params = checkpointer.restore(
        path,
        args=ocp.args.PyTreeRestore(
            item={"params": target},
            restore_args={"params": ocp.checkpoint_utils.construct_restore_args(target)},
            partial_restore=True,
        ),
    )["params"]
    reference = clipjax.load(str(workdir), devices=jax.devices()[:1]).params
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_evaluate_on_a_tfds_classification_dataset(trained, tmp_path):
    """A user's prepared tfds image-classification dataset is evaluated by changing one config line
    (here in its old spelling, `evals.classification=NAME`), and a second one by adding a section."""
    from tests.test_classification_data import _SKIP_STATS, TinyClasses, TinyTensorClasses

    TinyClasses(data_dir=str(tmp_path / "cls")).download_and_prepare(download_config=_SKIP_STATS)
    TinyTensorClasses(data_dir=str(tmp_path / "cls")).download_and_prepare(download_config=_SKIP_STATS)
    workdir, _ = trained
    from clipjax.api import load_run_config

    config = load_run_config(str(workdir))
    apply_overrides(
        config,
        {"evals.classification": "tiny_classes", "evals.classification_data_dir": str(tmp_path / "cls")},
    )
    apply_overrides(
        config,
        {
            "evals.second.kind": "classification",
            "evals.second.dataset": "tiny_tensor_classes",
            "evals.second.data_dir": str(tmp_path / "cls"),
            "evals.second.linear_probe": False,
        },
    )
    report = evaluate(str(workdir), out=str(tmp_path / "out"), config=config, devices=jax.devices()[:2])
    assert set(report["classification"]) == {"tiny_classes", "tiny_tensor_classes"}
    second = report["classification"]["tiny_tensor_classes"]
    assert "linear_probe" not in second and set(second["knn"]) == {"top1@k1", "top1@k10", "top1@k20"}
    result = report["classification"]["tiny_classes"]
    assert 0.0 <= result["zero_shot"]["top1"] <= 1.0
    assert result["num_examples"] > 0
    assert set(result["knn"]) == {"top1@k1", "top1@k10", "top1@k20"}
    assert "regularizer" in result["linear_probe"]
    # The probe sees the images' class structure (each class has its own colour): well above chance.
    assert result["linear_probe"]["top1"] > 0.6

    config.evals.classification.dataset = "not_a_dataset"
    from clipjax.config import ConfigError, validate

    with pytest.raises(ConfigError, match="evals.classification.dataset: .*not_a_dataset"):
        validate(config, num_devices=8)


def _evaluate_cli(workdir, out, *flags):
    return subprocess.run(
        [sys.executable, "-m", "clipjax.evaluate", "--workdir", str(workdir), "--out", str(out), *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def test_evaluate_cli_takes_old_and_new_evaluator_flags(trained, tmp_path):
    workdir, train_report = trained
    out = tmp_path / "cli"
    result = _evaluate_cli(
        workdir,
        out,
        "--config.evals.zero_shot=False",
        "--config.evals.knn.enabled=False",
        "--config.evals.probe_train_examples=64",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.load(open(out / "report.json"))
    assert "zero_shot" not in report and "knn" not in report
    assert report["retrieval"] == train_report["retrieval"]
    assert "linear_probe" in report


def test_one_evaluate_call_runs_two_classification_benchmarks_and_coco(trained, tmp_path):
    """The published benchmarks are config sections: one command line switches on CIFAR-10,
    ImageNet-V2 and COCO retrieval (stand-ins with the real features, tests/benchmark_data.py),
    and one report holds them all."""
    from tests.benchmark_data import write_captions_like, write_classification_like

    data = tmp_path / "benchmarks"
    write_classification_like(
        "cifar10",
        str(data),
        {"test": list(range(10)) * 2, "train": list(range(10))},
        scratch=str(tmp_path / "s"),
    )
    write_classification_like("imagenet_v2", str(data), {"test": [0, 5, 999]}, scratch=str(tmp_path / "s"))
    write_captions_like(str(data), {"test": [[f"a picture {i}", f"another picture {i}"] for i in range(6)]})
    workdir, _ = trained
    out = tmp_path / "out"
    flags = []
    for section in ("cifar10", "imagenet_v2", "coco"):
        flags += [f"--config.evals.{section}.enabled=True", f"--config.evals.{section}.data_dir={data}"]
    result = _evaluate_cli(
        workdir,
        out,
        *flags,
        "--config.evals.imagenet_v2.templates=stl10",  # 2 of the 80 prompts per class: faster
        "--config.evals.cifar10.max_examples=15",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.load(open(out / "report.json"))
    cifar, imagenet = report["classification"]["cifar10"], report["classification"]["imagenet_v2"]
    assert (cifar["split"], cifar["num_examples"]) == ("test", 15)
    assert (imagenet["split"], imagenet["num_examples"], imagenet["zero_shot"]["num_classes"]) == (
        "test",
        3,
        1000,
    )
    for r in (cifar, imagenet):
        assert 0.0 <= r["zero_shot"]["top1"] <= r["zero_shot"]["top5"] <= 1.0
    coco = report["caption_retrieval"]["coco_captions"]
    assert (coco["num_images"], coco["num_captions"]) == (6, 12)
    markdown = (out / "report.md").read_text()
    assert "| cifar10 | test | 15 |" in markdown and "| coco_captions | test | 6 | 12 |" in markdown
    assert "evals.cifar10: cifar10 test 15/15 images" in result.stdout + result.stderr


def test_logistic_probe_on_the_demo_features_matches_ridge_and_scikit_learn(trained, tmp_path):
    """On the trained demo's frozen image features: the logistic probe reaches at least the ridge
    probe's top-1, and scikit-learn's LogisticRegression with the chosen L2 weight (when
    installed) lands within a point of it."""
    from clipjax.api import load_run_config
    from clipjax.evals.linear_probe import _moments, _standardise

    workdir, _ = trained
    config = load_run_config(str(workdir))
    apply_overrides(
        config,
        {
            "evals.logistic_probe.enabled": True,
            "evals.logistic_probe.train_examples": 400,
            "evals.linear_probe.train_examples": 400,
            "evals.zero_shot.enabled": False,
            "evals.knn.enabled": False,
            "evals.retrieval.enabled": False,
            "evals.embedding.enabled": False,
        },
    )
    report = evaluate(str(workdir), out=str(tmp_path / "out"), config=config, devices=jax.devices()[:1])
    logistic, ridge = report["logistic_probe"], report["linear_probe"]
    assert logistic["top1"] >= ridge["top1"], (logistic, ridge)

    sklearn = pytest.importorskip("sklearn.linear_model")
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    model = clipjax.load(str(workdir), devices=jax.devices()[:1])
    source = make_source(config.data)
    train = source.eval_arrays(model.tokenizer, split="train", max_examples=400)
    test = source.eval_arrays(model.tokenizer, split="test", max_examples=config.evals.max_examples)
    x, xt = model.encode_image(train["image"]), model.encode_image(test["image"])
    mean, std = _moments(np.asarray(x))
    x, xt = _standardise(np.asarray(x), mean, std), _standardise(np.asarray(xt), mean, std)
    reference = sklearn.LogisticRegression(
        C=1.0 / (logistic["regularizer"] * len(x)), max_iter=10000, tol=1e-8
    )
    # One BLAS thread: its ~500 iterations of small products took 8 s on 2 threads of an idle
    # 2-core machine and over 100 s beside another test process, 1 s on one thread.
    with threadpool_limits(1):
        reference.fit(x, train["label"])
    sklearn_top1 = float(np.mean(reference.predict(xt) == test["label"]))
    assert abs(sklearn_top1 - logistic["top1"]) <= 0.01, (sklearn_top1, logistic)
