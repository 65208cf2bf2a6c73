"""Optimizer chains: warmup + cosine schedule, AdamW with a weight-decay mask, gradient clipping;
frozen parameters and per-parameter learning-rate multipliers.

Parameters are named by their '/'-joined path in the parameter tree: `image_tower/stem/conv/kernel`,
`text_tower/encoder/blocks/mlp/fc1/bias`, `image_proj/kernel`, `logit_scale`. A *pattern* is a
Python regular expression that matches a parameter when it matches (`re.fullmatch`) its whole
path or a leading part of it that ends at a '/': `image_tower` is the whole image tower,
`image_tower/stages/0` its first stage, `.*/bias` every bias, `text_.*` both text parts.

Frozen parameters (`optim.frozen`) are not differentiated at all (the train step splits the
parameters and takes the gradient of the trainable part only, `split_trainable`), the optimizer
is built over the trainable part only (no moments, no weight decay for the others), and the
step passes them through untouched.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import optax
from flax import nnx

from clipjax.schema import ConfigError, Field, Section


def _regex_problem(pattern) -> str | None:
    if not isinstance(pattern, str) or not pattern:
        return f"{pattern!r} is not a non-empty string"
    try:
        re.compile(pattern)
    except re.error as e:
        return f"{pattern!r} is not a regular expression ({e})"
    return None


def _check_patterns(value) -> str | None:
    for pattern in value:
        problem = _regex_problem(pattern)
        if problem:
            return problem
    return None


def parse_multiplier(entry) -> tuple[str, float]:
    """'pattern=factor' -> (pattern, factor); ValueError saying what is wrong."""
    if not isinstance(entry, str) or "=" not in entry:
        raise ValueError(f"{entry!r} is not a 'pattern=factor' string")
    pattern, _, text = entry.rpartition("=")
    problem = _regex_problem(pattern.strip())
    if problem:
        raise ValueError(problem)
    try:
        factor = float(text)
    except ValueError:
        raise ValueError(f"{entry!r}: the factor {text!r} is not a number") from None
    if not factor >= 0.0 or factor == float("inf"):
        raise ValueError(f"{entry!r}: the factor must be a finite number >= 0")
    return pattern.strip(), factor


def _check_multipliers(value) -> str | None:
    for entry in value:
        try:
            parse_multiplier(entry)
        except ValueError as e:
            return str(e)
    return None


# `config.optim.*`.
SECTION = Section(
    {
        "name": Field("adamw", "optimizer", choices=("adamw", "lars")),
        "lr": Field(2e-3, "peak learning rate", minimum=0.0),
        "b1": Field(0.9, "Adam beta1 (LARS momentum)", minimum=0.0),
        "b2": Field(0.98, "Adam beta2", minimum=0.0),
        "eps": Field(1e-6, "Adam epsilon", minimum=0.0),
        "weight_decay": Field(
            0.05, "decoupled weight decay, never on biases, norms or the temperature", minimum=0.0
        ),
        "clip_norm": Field(1.0, "clip the global gradient norm (0: no clipping)", minimum=0.0),
        "schedule": Field("cosine", "after the warm-up", choices=("cosine", "constant")),
        "warmup_steps": Field(0, "linear warm-up steps (when warmup_fraction is 0)", minimum=0),
        "warmup_fraction": Field(0.05, "warm-up as a share of the run (wins when > 0)", minimum=0.0),
        "end_lr_fraction": Field(0.0, "cosine ends at this share of the peak", minimum=0.0),
        "frozen": Field(
            (),
            "parameters that do not train: regular expressions, each matching a whole '/'-joined "
            "parameter path or a leading part of it (`image_tower`, `image_proj/kernel`, `.*/bias`); "
            "no gradient is computed for them, they have no optimizer state and no weight decay",
            type=tuple,
            check=_check_patterns,
        ),
        "lr_multipliers": Field(
            (),
            "'pattern=factor' strings (`('image_tower=0.1', 'text_.*=1.0')`, patterns as in "
            "`frozen`): a parameter's update is scaled by the factor of the first pattern that "
            "matches it (1.0 when none does); the logged `lr` is the base schedule",
            type=tuple,
            check=_check_multipliers,
        ),
    },
    doc="the optimizer and learning-rate schedule",
)


def warmup_steps(optim_config, total_steps: int) -> int:
    warmup = max(int(optim_config.warmup_steps), 0)
    if optim_config.warmup_fraction > 0:
        warmup = int(round(optim_config.warmup_fraction * total_steps))
    return min(warmup, max(total_steps - 1, 0))


def learning_rate_schedule(optim_config, total_steps: int) -> optax.Schedule:
    warmup = warmup_steps(optim_config, total_steps)
    peak = float(optim_config.lr)
    if optim_config.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)], [warmup]
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=peak * float(optim_config.end_lr_fraction),
    )


def weight_decay_mask(model: nnx.Module):
    """True for weight matrices, kernels and embedding tables; False for every bias (whatever its
    rank: attention biases are [heads, head_dim]), norm scales, 1-D tokens and the temperature.

    Rank is read from the logical axis names rather than the array shape, because blocks stacked
    for `scan` give a bias a leading 'layers' axis and would otherwise look like a matrix.
    """
    state = nnx.state(model, nnx.Param)
    names = nnx.to_pure_dict(nnx.get_partition_spec(state))

    def decayed(path, spec) -> bool:
        name = str(getattr(path[-1], "key", path[-1]))
        matrix = spec is not None and sum(n is not None and n != "layers" for n in spec) >= 2
        return matrix and "bias" not in name and name != "scale"

    return jax.tree_util.tree_map_with_path(
        decayed, names, is_leaf=lambda x: x is None or isinstance(x, jax.sharding.PartitionSpec)
    )


# ---------------------------------------------------------------- parameter paths and patterns


def path_name(path) -> str:
    """A jax key path as the '/'-joined name patterns match: `image_tower/stages/0/down/conv/kernel`."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def param_names(params) -> list[str]:
    """The '/'-joined path of every leaf of a parameter tree (of arrays, shapes or shardings)."""
    return [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def matches(pattern: str, name: str) -> bool:
    """Whether `pattern` matches the whole of `name` or a leading part of it that ends at a '/'."""
    parts = name.split("/")
    return any(re.fullmatch(pattern, "/".join(parts[:i])) for i in range(1, len(parts) + 1))


def _map_names(fn, tree):
    return jax.tree_util.tree_map_with_path(lambda path, _: fn(path_name(path)), tree)


def trainable_mask(params, frozen) -> Any:
    """A tree of bools shaped like `params`: False for the leaves a pattern of `frozen` matches."""
    return _map_names(lambda name: not any(matches(p, name) for p in frozen), params)


def _split(tree, mask, keep: bool):
    """The sub-tree of `tree` (nested dicts, as `nnx.to_pure_dict` gives) at the leaves where
    `mask` is `keep`; sub-dicts left empty are dropped. The mask's structure decides what is a
    leaf, so trees of arrays, shapes or shardings split alike."""
    if isinstance(mask, dict):
        out = {}
        for key, sub in mask.items():
            part = _split(tree[key], sub, keep)
            if part is not _EMPTY:
                out[key] = part
        return out if out else _EMPTY
    return tree if bool(mask) == keep else _EMPTY


_EMPTY = object()


def split_trainable(tree, frozen) -> tuple[dict, dict]:
    """(trainable, frozen) sub-trees of a parameter-shaped tree, by the `frozen` patterns.

    With no patterns the first is `tree` itself and the second is empty. `combine` undoes it.
    """
    if not frozen:
        return tree, {}
    mask = trainable_mask(tree, frozen)
    trainable, fixed = _split(tree, mask, True), _split(tree, mask, False)
    return ({} if trainable is _EMPTY else trainable), ({} if fixed is _EMPTY else fixed)


def combine(a: dict, b: dict) -> dict:
    """The union of two disjoint sub-trees of nested dicts (the inverse of `split_trainable`)."""
    if not b:
        return a
    out = dict(a)
    for key, value in b.items():
        out[key] = combine(out[key], value) if key in out and isinstance(value, dict) else value
    return out


def multiplier_factors(params, lr_multipliers) -> Any:
    """A tree of floats shaped like `params`: each leaf's factor (the first matching pattern's)."""
    rules = [parse_multiplier(entry) for entry in lr_multipliers]

    def factor(name):
        return next((f for pattern, f in rules if matches(pattern, name)), 1.0)

    return _map_names(factor, params)


def check_patterns(optim_config, names: list[str]) -> None:
    """ConfigError (one line) for a `frozen` or `lr_multipliers` pattern that matches no
    parameter of `names` (every '/'-joined parameter path), or `frozen` covering them all."""
    tops = sorted({n.split("/")[0] for n in names})
    for key, patterns in (
        ("frozen", list(optim_config.frozen)),
        ("lr_multipliers", [parse_multiplier(e)[0] for e in optim_config.lr_multipliers]),
    ):
        for pattern in patterns:
            if not any(matches(pattern, n) for n in names):
                hint = (
                    " (give several patterns as a tuple, not one comma-separated string)"
                    if "," in pattern
                    else ""
                )
                raise ConfigError(
                    f"optim.{key}: pattern {pattern!r} matches no parameter{hint}; parameter paths are "
                    f"'/'-joined, e.g. {names[0]!r}, under {', '.join(tops)}"
                )
    if optim_config.frozen and all(any(matches(p, n) for p in optim_config.frozen) for n in names):
        raise ConfigError(
            f"optim.frozen: {tuple(optim_config.frozen)!r} freezes every parameter; nothing would train"
        )


def _scale_updates(tx: optax.GradientTransformation, factors) -> optax.GradientTransformation:
    """`tx` with each leaf's update multiplied by its factor. The state is `tx`'s own, unchanged,
    so a run may resume with other multipliers."""

    def update(updates, state, params=None):
        updates, state = tx.update(updates, state, params)
        return jax.tree.map(lambda u, f: u if f == 1.0 else u * f, updates, factors), state

    return optax.GradientTransformation(tx.init, update)


def make_optimizer(
    optim_config, total_steps: int, decay_mask, factors=None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optimizer for the trainable parameters (`decay_mask` and `factors` are trees shaped
    like them; `factors`, from `multiplier_factors`, scales each leaf's update)."""
    schedule = learning_rate_schedule(optim_config, total_steps)
    if optim_config.name == "adamw":
        core = optax.adamw(
            schedule,
            b1=optim_config.b1,
            b2=optim_config.b2,
            eps=optim_config.eps,
            weight_decay=optim_config.weight_decay,
            mask=decay_mask,
        )
    elif optim_config.name == "lars":
        core = optax.lars(
            schedule,
            weight_decay=optim_config.weight_decay,
            weight_decay_mask=decay_mask,
            trust_ratio_mask=decay_mask,
            momentum=optim_config.b1,
        )
    else:
        raise ValueError(f"optim.name: unknown optimizer {optim_config.name!r} (expected 'adamw' or 'lars')")
    chain = [core]
    if optim_config.clip_norm and optim_config.clip_norm > 0:
        chain.insert(0, optax.clip_by_global_norm(optim_config.clip_norm))
    tx = optax.chain(*chain)
    if factors is not None and any(f != 1.0 for f in jax.tree.leaves(factors)):
        tx = _scale_updates(tx, factors)
    return tx, schedule
