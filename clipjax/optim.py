"""Optimizer chains: warmup + cosine schedule, AdamW with a weight-decay mask, gradient clipping."""

from __future__ import annotations

import jax
import optax
from flax import nnx

from clipjax.schema import Field, Section

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


def make_optimizer(
    optim_config, total_steps: int, decay_mask
) -> tuple[optax.GradientTransformation, optax.Schedule]:
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
    return optax.chain(*chain), schedule
