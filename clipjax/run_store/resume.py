"""Whether a workdir's run may go on under a given config, and what a checkpoint records about it.

A workdir belongs to one run. Restarting it with the same config resumes exactly. A config that
differs only in how the run is carried out (logging, evaluation, the mesh, data-loading
threads, the loss implementation: `RUN_CONTROL`) resumes too. Any other difference is refused
with one line that names the keys and the three ways forward: a new workdir; `init_from` (a new
run that starts from the old run's weights); or `resume.allow_changes` naming the keys that may
change (the learning rate, the step count, `optim.lr_multipliers`, ...). `optim.frozen` never
changes within a run (`FIXED`): which parameters have optimizer state is part of the checkpoint.
Checkpoints of a run are never deleted or overwritten by a run with another config.

A changed global batch (`data.batch_size` in `resume.allow_changes`) continues from the same
number of examples seen: the data order is the same endless stream, read from that position on.
"""

from __future__ import annotations

import json
from typing import Any

from clipjax.config import ConfigError, default_config, flatten, total_steps

# Keys (or prefixes ending in '.') whose change leaves what is trained unchanged.
RUN_CONTROL = (
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "max_nonfinite_streak",
    "mesh.",
    "sharding_rules",
    "activation_rules",
    "microbatches",
    "loss.impl",
    "loss.chunk",
    # How the towers compute (what is kept for the backward pass, which attention kernel), not
    # what they compute; an old run's stored `remat: true` also reads as today's "full".
    "model.remat",
    "model.attention",
    "model.unroll",
    "peak_tflops",
    "profile.",
    "evals.",
    "metrics.",
    "logging.",
    "data.data_dir",
    "data.worker_count",
    "data.read_threads",
    "data.prefetch",
    "data.max_bad_fraction",
    "resume.",
    # Read only when a run starts: a resumed run takes its weights from its own checkpoint.
    "init_from",
    "init_from_towers",
)
# Keys that a run can never change, `resume.allow_changes` or not: the optimizer state holds
# moments only for the parameters that train, so another `optim.frozen` would not restore. (The
# learning-rate multipliers leave that state as it is: `optim.lr_multipliers` may be allowed.)
FIXED = ("optim.frozen",)


class ResumeError(ConfigError):
    """The workdir holds a run that this config cannot continue; the message is one line."""


def _normalised(values: Any) -> dict[str, Any]:
    return flatten(
        json.loads(json.dumps(values.to_dict() if hasattr(values, "to_dict") else values, default=str))
    )


def config_changes(stored: Any, config: Any) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (stored value, new value)} for every field that differs.

    A key that the stored config lacks was added after the run started; it reads as its default,
    which keeps what the code did before it existed (model.image_mean: CLIP's statistics).
    """
    old, new = _normalised(stored), _normalised(config)
    old = {**_normalised(default_config()), **old}
    missing = object()
    return {
        k: (old.get(k), new.get(k))
        for k in sorted(set(old) | set(new))
        if old.get(k, missing) != new.get(k, missing)
    }


def _is_run_control(key: str) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in RUN_CONTROL)


def allowed_changes(config) -> set[str]:
    return {k.strip() for k in config.resume.allow_changes.split(",") if k.strip()}


def check_resume(
    stored: Any, config: Any, workdir: str, *, saved_step: int | None = None
) -> dict[str, tuple[Any, Any]]:
    """Raise ResumeError unless `config` may continue the run whose config was `stored` and
    whose newest checkpoint is at `saved_step`; return the accepted changes."""
    changes = config_changes(stored, config)
    fixed = [k for k in FIXED if k in changes]
    if fixed:
        old, new = changes[fixed[0]]
        raise ResumeError(
            f"workdir {workdir} holds a run with {fixed[0]}={old!r}, which cannot change when resuming "
            f"(to {new!r}): the optimizer state is that of the parameters that trained; use a new --workdir "
            f"with --config.init_from={workdir} to start a new run from its weights"
        )
    allowed = allowed_changes(config)
    refused = {k: v for k, v in changes.items() if not _is_run_control(k) and k not in allowed}
    if refused:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(refused.items())[:4])
        more = f" and {len(refused) - 4} more" if len(refused) > 4 else ""
        raise ResumeError(
            f"workdir {workdir} holds a run with another config ({shown}{more}); use a new --workdir, "
            f"or --config.init_from={workdir} to start a new run from its weights, or "
            f"--config.resume.allow_changes={','.join(refused)} to continue this run with the change"
        )
    _check_length(config, saved_step, workdir)
    return changes


def _check_length(config, saved_step: int | None, workdir: str) -> None:
    """A run cannot be made shorter than it already is: its checkpoint would stay ahead of the
    schedule's end, and config.json would describe a run that never existed."""
    total = total_steps(config)
    if saved_step is None or saved_step <= total:
        return
    length = f"steps={total}" if config.steps else f"steps={total} (epochs={config.epochs})"
    raise ResumeError(
        f"steps: workdir {workdir} holds a checkpoint at step {saved_step}, past the new {length}; "
        f"give --config.steps={saved_step} or more, or use a new --workdir with "
        f"--config.init_from={workdir}"
    )
