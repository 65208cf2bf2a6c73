"""Linear probe and kNN evaluators against direct computations."""

import numpy as np
import pytest

from clipjax.evals import knn
from clipjax.evals import linear_probe as lp

GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1, 10)


def _clusters(rng, num_classes, dim, per_class, spread, noise):
    centres = rng.normal(size=(num_classes, dim)) * spread
    labels = np.repeat(np.arange(num_classes), per_class)  # sorted by class, like many datasets
    features = centres[labels] + rng.normal(size=(len(labels), dim)) * noise
    return features.astype(np.float32), labels


def _lstsq_predict(x, labels, num_classes, regularizer, x_eval):
    """Ridge by least squares on the augmented system [X; sqrt(n lambda) I] W = [Y - mean Y; 0]."""
    x = x.astype(np.float64)
    n, d = x.shape
    mean, std = x.mean(axis=0), x.std(axis=0)
    xs = (x - mean) / std
    y = np.eye(num_classes)[labels]
    prior = y.mean(axis=0)
    a = np.concatenate([xs, np.sqrt(n * regularizer) * np.eye(d)])
    b = np.concatenate([y - prior, np.zeros((d, num_classes))])
    w = np.linalg.lstsq(a, b, rcond=None)[0]
    return np.argmax((x_eval.astype(np.float64) - mean) / std @ w + prior, axis=1), w


def test_linear_probe_separates_clusters():
    rng = np.random.default_rng(0)
    x, y = _clusters(rng, num_classes=5, dim=16, per_class=100, spread=5.0, noise=1.0)
    xt, yt = _clusters(np.random.default_rng(0), 5, 16, 40, 5.0, 1.0)  # same centres
    xt = xt + np.random.default_rng(1).normal(size=xt.shape).astype(np.float32) * 0.1
    result = lp.linear_probe(x, y, xt, yt, num_classes=5)
    assert set(result) == {"top1", "regularizer", "val_top1"}
    assert result["top1"] >= 0.99
    assert result["val_top1"] >= 0.99
    assert result["regularizer"] in GRID


@pytest.mark.parametrize("n, d", [(300, 20), (40, 90)])  # primal (n >= d) and dual (n < d) forms
def test_ridge_weights_match_lstsq(n, d, monkeypatch):
    monkeypatch.setattr(lp, "_CHUNK", 64)  # several accumulation chunks
    rng = np.random.default_rng(n)
    x = (rng.normal(size=(n, d)) * rng.uniform(0.1, 10, size=d) + 3).astype(np.float32)
    labels = rng.integers(0, 4, size=n)
    ridge = lp._Ridge(x, labels, 4)
    for regularizer in (1e-3, 0.1, 10.0):
        expected_pred, expected_w = _lstsq_predict(x, labels, 4, regularizer, x)
        np.testing.assert_allclose(ridge.weights(regularizer), expected_w, rtol=1e-6, atol=1e-9)
        np.testing.assert_array_equal(ridge.predict(x, [regularizer])[0], expected_pred)


def test_linear_probe_fixed_regularizer_matches_lstsq():
    rng = np.random.default_rng(2)
    x, y = _clusters(rng, num_classes=4, dim=12, per_class=60, spread=1.0, noise=1.0)
    xt, yt = x[::3] + rng.normal(size=x[::3].shape).astype(np.float32), y[::3]
    result = lp.linear_probe(x, y, xt, yt, num_classes=4, regularizers=(0.1,))
    pred, _ = _lstsq_predict(x, y, 4, 0.1, xt)
    assert result["regularizer"] == 0.1
    assert result["top1"] == pytest.approx(np.mean(pred == yt))
    assert 0.3 < result["top1"] < 1.0  # overlapping clusters: the comparison is not trivial


def test_linear_probe_chooses_regularizer_on_held_out_train_features():
    rng = np.random.default_rng(3)
    # Few noisy examples in many dimensions: the regulariser matters.
    x, y = _clusters(rng, num_classes=4, dim=60, per_class=30, spread=0.5, noise=1.0)
    xt, yt = _clusters(np.random.default_rng(3), 4, 60, 30, 0.5, 1.0)
    grid = (1e-4, 1e-2, 1, 100, 1e4)
    result = lp.linear_probe(x, y, xt, yt, num_classes=4, regularizers=grid, seed=5)

    order = np.random.default_rng(5).permutation(len(x))
    num_val = round(0.2 * len(x))
    val, fit = np.sort(order[:num_val]), np.sort(order[num_val:])
    accs = [np.mean(_lstsq_predict(x[fit], y[fit], 4, r, x[val])[0] == y[val]) for r in grid]
    best = max(range(len(grid)), key=lambda i: (accs[i], grid[i]))
    assert result["regularizer"] == grid[best]
    assert result["val_top1"] == pytest.approx(accs[best])
    test_pred, _ = _lstsq_predict(x, y, 4, grid[best], xt)
    assert result["top1"] == pytest.approx(np.mean(test_pred == yt))


def test_linear_probe_rejects_bad_labels():
    x = np.zeros((10, 3), np.float32)
    with pytest.raises(ValueError, match="labels must lie in"):
        lp.linear_probe(x, np.full(10, 3), x, np.zeros(10), num_classes=3)


def _brute_knn(train, labels, test, k, temperature, num_classes):
    preds = []
    for q in test:
        sims = []
        for j, t in enumerate(train):
            sims.append((float(np.dot(q, t) / (np.linalg.norm(q) * np.linalg.norm(t))), j))
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for sim, j in sims[:k]:
            votes[labels[j]] += np.exp(sim / temperature)
        preds.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    return np.array(preds)


def test_knn_matches_brute_force():
    rng = np.random.default_rng(4)
    x, y = _clusters(rng, num_classes=5, dim=8, per_class=12, spread=0.7, noise=1.0)
    xt = rng.normal(size=(23, 8)).astype(np.float32) * 3  # arbitrary scale: cosine ignores it
    yt = rng.integers(0, 5, size=23)
    ks = (1, 3, 10, 100)  # 100 > 60 train features: all of them vote
    preds = knn.knn_predictions(x, y, xt, k=ks, temperature=0.1, num_classes=5, batch_size=7)
    result = knn.knn_accuracy(x, y, xt, yt, k=ks, temperature=0.1, num_classes=5, batch_size=7)
    assert set(result) == {"top1@k1", "top1@k3", "top1@k10", "top1@k100"}
    for k in ks:
        expected = _brute_knn(x, y, xt, k, 0.1, 5)
        np.testing.assert_array_equal(preds[k], expected)
        assert result[f"top1@k{k}"] == pytest.approx(np.mean(expected == yt))
    # A k=1 classifier labels every train feature with its own class.
    assert knn.knn_accuracy(x, y, x, y, k=(1,), num_classes=5)["top1@k1"] == 1.0


def test_knn_separates_clusters_with_default_keys():
    rng = np.random.default_rng(5)
    x, y = _clusters(rng, num_classes=10, dim=32, per_class=30, spread=3.0, noise=1.0)
    xt, yt = _clusters(np.random.default_rng(5), 10, 32, 10, 3.0, 1.0)
    result = knn.knn_accuracy(x, y, xt, yt, num_classes=10)
    assert sorted(result) == ["top1@k1", "top1@k10", "top1@k20"]
    assert min(result.values()) >= 0.95
