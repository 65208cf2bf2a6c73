"""Logistic-regression linear probe (optax L-BFGS) and few-shot ridge probes on frozen features.

The logistic probe follows the protocol CLIP's paper reports for its linear probes (multinomial
logistic regression fitted with L-BFGS, the L2 strength chosen on held-out training data), step
by step:

  * Features are standardised per dimension (z-score) with the mean and standard deviation of
    the examples being fitted; validation and test features use those same statistics (the
    statistics code is the ridge probe's, clipjax/evals/linear_probe.py). With unit-variance
    features the regulariser grid has one meaning whatever the encoder's scale.
  * The model is logits = x W + b, W [d, C], b [C]. (W, b) minimise
        (1/n) sum_i CE(softmax(x_i W + b), y_i)  +  (lambda / 2) ||W||^2,
    softmax cross-entropy averaged over the examples, the weights shrunk and the bias not. For
    lambda > 0 the objective is strictly convex in W (b is unique up to a constant added to
    every class, which changes no prediction), so the optimum does not depend on where the
    optimiser starts.
  * The fit is full-batch `optax.lbfgs` (zoom line search, gradients reused through
    `optax.value_and_grad_from_state`) inside one `jax.lax.while_loop`, in float32. It stops when
    the gradient norm of the objective falls below `tolerance`, after `max_iterations`, or when
    the objective has not decreased by more than float32 noise for `_PATIENCE` iterations (the
    float32 floor of the gradient norm can lie above a tight tolerance on large problems). The
    fit is compiled once per (n, d, C) shape; lambda, the starting point and the stopping
    settings are traced arguments, so the whole grid reuses one compiled function.
  * lambda is chosen on a held-out 20% of the TRAIN features (a seeded random subset, since
    datasets are often stored sorted by class): fit on the other 80% for every lambda of the
    grid (largest first, each fit starting from the previous solution, which only saves
    iterations), keep the lambda with the best validation top-1 (ties: the larger lambda), then
    refit on all training features with that lambda and score the test features.
  * The prediction is the argmax of the logits (ties: the lower class index).

The few-shot probes follow big_vision's few-shot linear evaluation (fewshot_lsr): for each k of
`shots`, k training examples of each class are drawn with a seeded generator (a class with fewer
than k examples contributes all it has, so "k-shot" is at most k per class), and a closed-form
ridge regression to one-hot targets (the ridge probe's `_Ridge`: z-scored with the support
set's statistics, centred targets, unpenalised intercept) is fitted on them and scores the test
features. big_vision uses one fixed L2 strength; here lambda is picked from a small fixed grid
on a validation set that is never the test set: a seeded random `validation_fraction` of the
TRAIN examples is held out first and the k-shot support sets are drawn from the rest, so the
validation set is disjoint from every support set and the same for every k. The per-class
draws are nested: the 5-shot set contains the 1-shot set, and so on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from clipjax.evals.base import Evaluator, label_fields, register_evaluator
from clipjax.evals.linear_probe import _check, _moments, _Ridge, _standardise, validation_split
from clipjax.schema import Field, positive_ints

LOGISTIC_REGULARIZERS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
FEW_SHOT_REGULARIZERS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
_TOLERANCE = 1e-5
_PATIENCE = 20
_MEMORY = 10


class LogisticFit(NamedTuple):
    """A fitted multinomial logistic regression on standardised features."""

    weights: np.ndarray  # [d, C] float32
    bias: np.ndarray  # [C] float32
    iterations: int
    grad_norm: float  # of the objective at (weights, bias)


def _objective(params, x, labels, regularizer):
    w, b = params
    ce = optax.softmax_cross_entropy_with_integer_labels(x @ w + b, labels)
    return jnp.mean(ce) + 0.5 * regularizer * jnp.sum(jnp.square(w))


@jax.jit
def _lbfgs(x, labels, regularizer, w0, b0, max_iterations, tolerance):
    """L-BFGS on `_objective` from (w0, b0); compiled once per shape, the rest traced."""
    fun = lambda params: _objective(params, x, labels, regularizer)
    solver = optax.lbfgs(memory_size=_MEMORY)
    value_and_grad = optax.value_and_grad_from_state(fun)
    noise = 4 * jnp.finfo(jnp.float32).eps

    def step(carry):
        params, state, best, stalled = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=fun)
        params = optax.apply_updates(params, updates)
        new_value = otu.tree_get(state, "value")  # the line search's value at the new params
        progress = new_value < best - noise * jnp.abs(best)
        stalled = jnp.where(progress, 0, stalled + 1)
        return params, state, jnp.minimum(best, new_value), stalled

    def keep_going(carry):
        _, state, _, stalled = carry
        count = otu.tree_get(state, "count")
        grad_norm = otu.tree_norm(otu.tree_get(state, "grad"))
        return (count == 0) | ((count < max_iterations) & (grad_norm >= tolerance) & (stalled < _PATIENCE))

    params = (w0, b0)
    init = (params, solver.init(params), fun(params), jnp.asarray(0, jnp.int32))
    params, state, _, _ = jax.lax.while_loop(keep_going, step, init)
    grad = jax.grad(fun)(params)
    return params, otu.tree_get(state, "count"), otu.tree_norm(grad)


def fit_logistic(
    x,
    labels,
    *,
    num_classes: int,
    regularizer: float,
    max_iterations: int = 1000,
    tolerance: float = _TOLERANCE,
    init: tuple[np.ndarray, np.ndarray] | None = None,
) -> LogisticFit:
    """Minimise the objective of the module docstring on `x` as given (standardise it first).

    x [n, d], labels int [n] in [0, num_classes); `init` an optional (weights, bias) start.
    """
    x = jnp.asarray(x, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    if init is None:
        w0 = jnp.zeros((x.shape[1], num_classes), jnp.float32)
        b0 = jnp.zeros((num_classes,), jnp.float32)
    else:
        w0, b0 = (jnp.asarray(a, jnp.float32) for a in init)
    (w, b), iterations, grad_norm = _lbfgs(
        x,
        labels,
        jnp.float32(regularizer),
        w0,
        b0,
        jnp.int32(max_iterations),
        jnp.float32(tolerance),
    )
    return LogisticFit(np.asarray(w), np.asarray(b), int(iterations), float(grad_norm))


def _predict(fit: LogisticFit, x_standardised: np.ndarray) -> np.ndarray:
    logits = np.asarray(x_standardised, np.float32) @ fit.weights + fit.bias
    return np.argmax(logits, axis=1)  # first maximum: ties go to the lower class index


def _check_grid(regularizers: Sequence[float]) -> list[float]:
    grid = [float(r) for r in regularizers]
    if not grid or min(grid) <= 0:
        raise ValueError(f"regularizers must be a non-empty list of positive values, got {grid}")
    return grid


def _best(accuracies: Sequence[float], grid: Sequence[float]) -> int:
    """Index of the best accuracy; ties go to the larger regulariser."""
    return max(range(len(grid)), key=lambda i: (accuracies[i], grid[i]))


def _checked(train, train_labels, test, test_labels, num_classes):
    x, y = _check(train, train_labels, num_classes, "train")
    xt, yt = _check(test, test_labels, num_classes, "test")
    if xt.shape[1] != x.shape[1]:
        raise ValueError(f"train features have dimension {x.shape[1]}, test features {xt.shape[1]}")
    return x, y, xt, yt


def logistic_probe(
    train,
    train_labels,
    test,
    test_labels,
    *,
    num_classes: int,
    regularizers: Sequence[float] = LOGISTIC_REGULARIZERS,
    validation_fraction: float = 0.2,
    seed: int = 0,
    max_iterations: int = 1000,
) -> dict:
    """Logistic-regression linear probe; see the module docstring for the protocol.

    train [N, d], train_labels int [N] in [0, num_classes), likewise for test. Returns
    {'top1': test accuracy, 'regularizer': the chosen lambda (an element of `regularizers`),
    'validation_top1': its accuracy on the held-out part of the train features,
    'iterations': L-BFGS iterations of the final fit}.
    """
    x, y, xt, yt = _checked(train, train_labels, test, test_labels, num_classes)
    grid = _check_grid(regularizers)
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be positive, got {max_iterations}")
    val_idx, fit_idx = validation_split(len(x), validation_fraction, seed)

    mean, std = _moments(x[fit_idx])
    x_fit = _standardise(x[fit_idx], mean, std)
    x_val = _standardise(x[val_idx], mean, std)
    fits: dict[int, LogisticFit] = {}
    init = None
    for i in sorted(range(len(grid)), key=lambda i: -grid[i]):  # strongest first: warm starts
        fits[i] = fit_logistic(
            x_fit,
            y[fit_idx],
            num_classes=num_classes,
            regularizer=grid[i],
            max_iterations=max_iterations,
            init=init,
        )
        init = (fits[i].weights, fits[i].bias)
    val_acc = [float(np.mean(_predict(fits[i], x_val) == y[val_idx])) for i in range(len(grid))]
    best = _best(val_acc, grid)

    mean, std = _moments(x)
    final = fit_logistic(
        _standardise(x, mean, std),
        y,
        num_classes=num_classes,
        regularizer=grid[best],
        max_iterations=max_iterations,
        init=(fits[best].weights, fits[best].bias),
    )
    test_pred = _predict(final, _standardise(xt, mean, std))
    return {
        "top1": float(np.mean(test_pred == yt)) if len(yt) else float("nan"),
        "regularizer": grid[best],
        "validation_top1": val_acc[best],
        "iterations": final.iterations,
    }


def few_shot_indices(
    labels, shots: Sequence[int], *, num_classes: int, seed: int = 0
) -> dict[int, np.ndarray]:
    """{k: sorted indices into `labels`}: min(k, count) examples of each class, drawn with `seed`.

    Each class's examples are shuffled once, and k-shot takes the first k of them, so the
    support sets are nested (the 5-shot set contains the 1-shot set).
    """
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    ks = sorted({int(k) for k in shots})
    if not ks or ks[0] < 1:
        raise ValueError(f"shots must be positive integers, got {list(shots)}")
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    return {k: np.sort(np.concatenate([idx[:k] for idx in per_class])) for k in ks}


def few_shot_probes(
    train,
    train_labels,
    test,
    test_labels,
    *,
    num_classes: int,
    shots: Sequence[int] = (1, 5, 10, 25),
    seed: int = 0,
    regularizers: Sequence[float] = FEW_SHOT_REGULARIZERS,
    validation_fraction: float = 0.2,
) -> dict:
    """Few-shot ridge probes (big_vision-style); see the module docstring for the protocol.

    Returns, for each k of `shots`: '{k}shot' the test accuracy and '{k}shot_regularizer' the
    lambda chosen on the validation part of the train examples. A class with fewer than k
    support examples contributes all it has.
    """
    x, y, xt, yt = _checked(train, train_labels, test, test_labels, num_classes)
    grid = _check_grid(regularizers)
    val_idx, pool_idx = validation_split(len(x), validation_fraction, seed)
    support = few_shot_indices(y[pool_idx], shots, num_classes=num_classes, seed=seed + 1)
    x_val, y_val = x[val_idx], y[val_idx]
    out: dict = {}
    for k, idx in support.items():
        idx = pool_idx[idx]
        ridge = _Ridge(x[idx], y[idx], num_classes)
        val_acc = np.mean(ridge.predict(x_val, grid) == y_val, axis=1)
        best = _best(val_acc, grid)
        test_pred = ridge.predict(xt, [grid[best]])[0]
        out[f"{k}shot"] = float(np.mean(test_pred == yt)) if len(yt) else float("nan")
        out[f"{k}shot_regularizer"] = grid[best]
    return out


@register_evaluator
class LogisticProbeEvaluator(Evaluator):
    """Logistic-regression (L-BFGS) linear probe on frozen image features, fitted on the first train
    examples."""

    kind = "logistic_probe"
    FIELDS = {
        "train_examples": Field(5000, "train examples the probe is fitted on", minimum=1),
        "max_iterations": Field(1000, "L-BFGS iterations per fit at most", minimum=1),
        "fields": label_fields("probed"),
    }

    def run(self, encoders):
        f = self.data.frozen_features(encoders, self.settings["train_examples"])
        iterations = self.settings["max_iterations"]
        result = logistic_probe(*f, num_classes=f.num_classes, max_iterations=iterations)
        fields = self.per_field(
            encoders,
            lambda g: logistic_probe(*g, num_classes=g.num_classes, max_iterations=iterations)["top1"],
        )
        if fields:
            result["fields"] = fields
        return {"logistic_probe": {**result, "num_examples": len(f.train_labels)}}


@register_evaluator
class FewShotEvaluator(Evaluator):
    """Few-shot ridge linear probes (big_vision-style) on frozen image features."""

    kind = "few_shot"
    FIELDS = {
        "train_examples": Field(5000, "train examples the support and validation sets come from", minimum=1),
        "shots": Field((1, 5, 10, 25), "examples per class of each probe", type=tuple, check=positive_ints),
    }

    def run(self, encoders):
        f = self.data.frozen_features(encoders, self.settings["train_examples"])
        result = few_shot_probes(*f, num_classes=f.num_classes, shots=self.settings["shots"])
        return {"few_shot": {**result, "num_examples": len(f.train_labels)}}
