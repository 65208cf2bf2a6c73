"""Logistic-regression probe and few-shot probes against direct computations."""

import numpy as np
import pytest

from clipjax.evals import linear_probe as lp
from clipjax.evals import logistic_probe as lg
from clipjax.evals.base import FrozenFeatures, SkipEvaluation, instance_section


def _clusters(rng, centres, per_class, noise):
    labels = np.repeat(np.arange(len(centres)), per_class)  # sorted by class, like many datasets
    features = centres[labels] + rng.normal(size=(len(labels), centres.shape[1])) * noise
    return features.astype(np.float32), labels


def _gaussian_problem(seed, num_classes=6, dim=32, per_class=60, spread=0.6):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim)) * spread
    x, y = _clusters(rng, centres, per_class, 1.0)
    xt, yt = _clusters(rng, centres, per_class, 1.0)
    return x, y, xt, yt


def _standardised(x, xt):
    mean, std = x.astype(np.float64).mean(axis=0), x.astype(np.float64).std(axis=0)
    return ((x - mean) / std).astype(np.float32), ((xt - mean) / std).astype(np.float32)


def _objective_and_grad(w, b, x, labels, regularizer):
    """Mean softmax cross-entropy + lambda/2 ||W||^2 and its gradient, in float64."""
    x, w, b = (np.asarray(a, np.float64) for a in (x, w, b))
    logits = x @ w + b
    logits -= logits.max(axis=1, keepdims=True)
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    n = len(x)
    value = -np.mean(log_p[np.arange(n), labels]) + 0.5 * regularizer * np.sum(w * w)
    residual = np.exp(log_p) - np.eye(w.shape[1])[labels]
    return value, (x.T @ residual / n + regularizer * w, residual.mean(axis=0))


def test_logistic_probe_at_least_as_good_as_ridge():
    # Gaussian clusters, 15% of the training examples pushed far out on the correct side of the
    # boundaries: least squares is pulled towards them (it penalises confident correct outputs),
    # the cross-entropy barely notices them.
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16)) * 0.7
    x, y = _clusters(rng, centres, 60, 1.0)
    xt, yt = _clusters(rng, centres, 60, 1.0)
    far = rng.random(len(y)) < 0.15
    x = x + (far[:, None] * 8.0 * (centres[y] - centres.mean(axis=0))).astype(np.float32)
    logistic = lg.logistic_probe(x, y, xt, yt, num_classes=5)
    ridge = lp.linear_probe(x, y, xt, yt, num_classes=5)
    assert set(logistic) >= {"top1", "regularizer", "validation_top1"}
    assert logistic["regularizer"] in lg.LOGISTIC_REGULARIZERS
    assert logistic["top1"] >= ridge["top1"] - 0.01
    assert logistic["top1"] > 0.8

    # Three classes on a line: regression to indicators masks the middle class (it is never the
    # largest output), logistic regression does not.
    rng = np.random.default_rng(1)
    centres = np.zeros((3, 16))
    centres[:, 0] = [0.0, 4.0, 8.0]
    x, y = _clusters(rng, centres, 100, 1.0)
    xt, yt = _clusters(rng, centres, 100, 1.0)
    logistic = lg.logistic_probe(x, y, xt, yt, num_classes=3)
    ridge = lp.linear_probe(x, y, xt, yt, num_classes=3)
    assert logistic["top1"] >= ridge["top1"] + 0.1
    assert logistic["top1"] > 0.9


@pytest.mark.parametrize("regularizer", [1e-3, 0.1])
def test_fit_is_an_optimum(regularizer):
    x, y, _, _ = _gaussian_problem(2, num_classes=5, dim=24, per_class=40)
    xs, _ = _standardised(x, x)
    fit = lg.fit_logistic(xs, y, num_classes=5, regularizer=regularizer)
    assert fit.iterations < 1000
    value, (grad_w, grad_b) = _objective_and_grad(fit.weights, fit.bias, xs, y, regularizer)
    assert np.sqrt(np.sum(grad_w**2) + np.sum(grad_b**2)) < 1e-4
    assert fit.grad_norm < 1e-4
    rng = np.random.default_rng(3)
    for scale in (1e-3, 1e-2, 1e-1):
        dw = rng.normal(size=fit.weights.shape) * scale
        db = rng.normal(size=fit.bias.shape) * scale
        perturbed, _ = _objective_and_grad(fit.weights + dw, fit.bias + db, xs, y, regularizer)
        assert perturbed > value
    # The optimum does not depend on the starting point (the objective is strictly convex in W).
    restart = lg.fit_logistic(
        xs, y, num_classes=5, regularizer=regularizer, init=(rng.normal(size=fit.weights.shape), fit.bias)
    )
    np.testing.assert_allclose(restart.weights, fit.weights, atol=1e-3)


def test_logistic_probe_matches_sklearn():
    linear_model = pytest.importorskip("sklearn.linear_model")
    x, y, xt, yt = _gaussian_problem(4)
    xs, xts = _standardised(x, xt)
    n = len(x)
    for regularizer in (1e-3, 1e-2, 0.1):
        ours = lg.fit_logistic(xs, y, num_classes=6, regularizer=regularizer)
        # sklearn minimises C sum_i CE_i + ||W||^2 / 2, i.e. ours times C n when C = 1 / (lambda n).
        theirs = linear_model.LogisticRegression(C=1 / (regularizer * n), tol=1e-10, max_iter=10_000)
        theirs.fit(xs, y)
        our_top1 = np.mean(lg._predict(ours, xts) == yt)
        assert abs(our_top1 - theirs.score(xts, yt)) <= 0.01
        np.testing.assert_allclose(ours.weights, theirs.coef_.T, atol=5e-3)

    # The full protocol with a one-value grid: fit on all train features, score the test ones.
    result = lg.logistic_probe(x, y, xt, yt, num_classes=6, regularizers=(1e-2,))
    sk = linear_model.LogisticRegression(C=1 / (1e-2 * n), tol=1e-10, max_iter=10_000).fit(xs, y)
    assert result["regularizer"] == 1e-2
    assert abs(result["top1"] - sk.score(xts, yt)) <= 0.01


def test_logistic_probe_chooses_regularizer_on_held_out_train_features():
    x, y, xt, yt = _gaussian_problem(5, num_classes=4, dim=48, per_class=30, spread=0.4)
    grid = (1e-4, 1e-2, 1.0)
    result = lg.logistic_probe(x, y, xt, yt, num_classes=4, regularizers=grid, seed=7)
    order = np.random.default_rng(7).permutation(len(x))
    num_val = round(0.2 * len(x))
    val, fit = np.sort(order[:num_val]), np.sort(order[num_val:])
    xs_fit, xs_val = _standardised(x[fit], x[val])
    accs = []
    for regularizer in grid:
        f = lg.fit_logistic(xs_fit, y[fit], num_classes=4, regularizer=regularizer)
        accs.append(np.mean(lg._predict(f, xs_val) == y[val]))
    best = max(range(len(grid)), key=lambda i: (accs[i], grid[i]))
    assert result["regularizer"] == grid[best]
    assert result["validation_top1"] == pytest.approx(accs[best])


def test_logistic_probe_rejects_bad_input():
    x = np.zeros((10, 3), np.float32)
    with pytest.raises(ValueError, match="labels must lie in"):
        lg.logistic_probe(x, np.full(10, 3), x, np.zeros(10), num_classes=3)
    with pytest.raises(ValueError, match="regularizers"):
        lg.logistic_probe(x, np.zeros(10), x, np.zeros(10), num_classes=3, regularizers=(0.0,))


def test_few_shot_indices_take_min_k_per_class_and_are_seeded():
    labels = np.array([0] * 30 + [1] * 3 + [2] * 12 + [3] * 1)
    np.random.default_rng(0).shuffle(labels)
    picks = lg.few_shot_indices(labels, (1, 5, 10, 25), num_classes=5, seed=3)
    assert sorted(picks) == [1, 5, 10, 25]
    counts = np.bincount(labels, minlength=5)
    for k, idx in picks.items():
        assert len(np.unique(idx)) == len(idx)
        np.testing.assert_array_equal(np.bincount(labels[idx], minlength=5), np.minimum(k, counts))
    assert set(picks[1]) <= set(picks[5]) <= set(picks[10]) <= set(picks[25])  # nested draws
    again = lg.few_shot_indices(labels, (1, 5, 10, 25), num_classes=5, seed=3)
    for k in picks:
        np.testing.assert_array_equal(again[k], picks[k])
    other = lg.few_shot_indices(labels, (5,), num_classes=5, seed=4)
    assert not np.array_equal(other[5], picks[5])


def test_few_shot_probes():
    rng = np.random.default_rng(6)
    centres = rng.normal(size=(5, 16)) * 1.5
    x, y = _clusters(rng, centres, 60, 1.0)
    xt, yt = _clusters(rng, centres, 40, 1.0)
    result = lg.few_shot_probes(x, y, xt, yt, num_classes=5, shots=(1, 5, 25))
    assert set(result) == {"1shot", "5shot", "25shot", *(f"{k}shot_regularizer" for k in (1, 5, 25))}
    assert all(result[f"{k}shot_regularizer"] in lg.FEW_SHOT_REGULARIZERS for k in (1, 5, 25))
    assert result["25shot"] >= result["1shot"]
    assert result["25shot"] > 0.9
    assert result == lg.few_shot_probes(x, y, xt, yt, num_classes=5, shots=(1, 5, 25))  # seeded

    # Mutation check: labels carrying no information about the features score near chance.
    shuffled = np.random.default_rng(7).permutation(y)
    assert lg.few_shot_probes(x, shuffled, xt, yt, num_classes=5, shots=(25,))["25shot"] < 0.2 + 0.15
    noise = lg.logistic_probe(x, shuffled, xt, yt, num_classes=5, regularizers=(1e-2, 1.0))
    assert noise["top1"] < 0.2 + 0.15


class _FakeData:
    """EvalData's `frozen_features`; the field `parity` labels each example by its label mod 2."""

    def __init__(self, features):
        self.features = features

    def frozen_features(self, encoders, train_examples, field="label"):
        if self.features is None:
            raise SkipEvaluation("no labels")  # as EvalData does
        f = self.features
        relabel = (lambda y: y % 2) if field == "parity" else (lambda y: y)
        return FrozenFeatures(
            f.train[:train_examples], relabel(f.train_labels[:train_examples]), f.test, relabel(f.test_labels)
        )


def test_evaluators():
    from clipjax.evals import EVALUATORS

    assert EVALUATORS["logistic_probe"] is lg.LogisticProbeEvaluator
    assert EVALUATORS["few_shot"] is lg.FewShotEvaluator
    x, y, xt, yt = _gaussian_problem(8, num_classes=4, dim=16, per_class=30)
    order = np.random.default_rng(0).permutation(len(x))  # frozen_features takes the first examples
    data = _FakeData(FrozenFeatures(x[order], y[order], xt, yt))

    settings = instance_section("logistic_probe").read({"max_iterations": 200}, "evals.lp")
    assert settings["train_examples"] == 5000
    report = lg.LogisticProbeEvaluator("lp", settings, data, None).run(None)
    assert set(report) == {"logistic_probe"}
    assert report["logistic_probe"]["num_examples"] == len(x)
    assert report["logistic_probe"]["top1"] > 0.8
    assert "fields" not in report["logistic_probe"]

    # More label fields: each its own probe, on that field's labels.
    settings = instance_section("logistic_probe").read(
        {"max_iterations": 200, "fields": ["parity"]}, "evals.lp"
    )
    fields = lg.LogisticProbeEvaluator("lp", settings, data, None).run(None)["logistic_probe"]["fields"]
    parity = data.frozen_features(None, 5000, "parity")
    assert fields == {"parity": lg.logistic_probe(*parity, num_classes=2, max_iterations=200)["top1"]}
    assert fields["parity"] != report["logistic_probe"]["top1"]

    settings = instance_section("few_shot").read({"shots": [2, 10], "train_examples": 100}, "evals.fs")
    assert settings["shots"] == (2, 10)
    report = lg.FewShotEvaluator("fs", settings, data, None).run(None)
    assert set(report["few_shot"]) == {
        "2shot",
        "2shot_regularizer",
        "10shot",
        "10shot_regularizer",
        "num_examples",
    }
    assert report["few_shot"]["num_examples"] == 100

    empty = _FakeData(None)
    for evaluator in (lg.LogisticProbeEvaluator, lg.FewShotEvaluator):
        with pytest.raises(SkipEvaluation, match="no labels"):
            evaluator("x", settings, empty, None).run(None)
