"""Weights & Biases as a third sink of the run log (`config.logging.*`), beside metrics.jsonl and
TensorBoard: the same merged record per step, at the same step.

wandb is an optional dependency, imported only when `logging.wandb` is on; `check_config` turns
its absence into one config error before anything compiles. The W&B run id is kept in
`<workdir>/wandb_run_id`, so a resumed run (same workdir) continues the same W&B run.
"""

from __future__ import annotations

import json
import os
import posixpath
import secrets
import string
import tempfile
from typing import Any

import numpy as np

from clipjax import paths
from clipjax.run_store import layout
from clipjax.schema import ConfigError, Field, Section

# `config.logging.*`.
SECTION = Section(
    {
        "wandb": Field(False, "also log every metrics.jsonl record to Weights & Biases (pip install wandb)"),
        "wandb_project": Field("clipjax", "W&B project"),
        "wandb_entity": Field("", "W&B user or team ('': your default entity)"),
        "wandb_name": Field("", "W&B run name ('': the workdir's name)"),
        "wandb_mode": Field(
            "",
            "W&B mode ('': WANDB_MODE, else wandb's default)",
            choices=("", "online", "offline", "disabled"),
        ),
    },
    doc="Weights & Biases logging (docs/metrics.md)",
)

MISSING_PACKAGE = "logging.wandb=True needs the wandb package: pip install wandb"


def check_config(logging_config) -> None:
    """Fail now, not after the model has compiled, when W&B is asked for but not installed."""
    if not logging_config.wandb:
        return
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise ConfigError(MISSING_PACKAGE) from None


def run_id(workdir: str) -> str:
    """The W&B run id of this workdir, created on first use."""
    path = paths.join(workdir, layout.WANDB_RUN_ID)
    if paths.exists(path):
        stored = paths.read_text(path).strip()
        if stored:
            return stored
    alphabet = string.ascii_lowercase + string.digits
    new = "".join(secrets.choice(alphabet) for _ in range(8))
    paths.write_atomic(path, new + "\n")
    return new


def _loggable(value: Any) -> float | int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    # metrics.jsonl spells non-finite numbers as strings; a diverging loss must still show in W&B.
    if value in ("nan", "inf", "-inf"):
        return float(value)
    return None


def _local_dir(workdir: str) -> str:
    """Where wandb keeps its files: the workdir, or for a bucket workdir (wandb writes local files
    only) WANDB_DIR if set, else a folder in the temporary directory, never the current one."""
    if not paths.is_remote(workdir):
        return workdir
    directory = os.environ.get("WANDB_DIR") or os.path.join(tempfile.gettempdir(), "clipjax-wandb")
    os.makedirs(directory, exist_ok=True)
    return directory


class WandbWriter:
    """One W&B run, fed the records MetricWriter flushes. Build it on the lead process only."""

    def __init__(self, workdir: str, config):
        try:
            import wandb
        except ImportError:
            raise ConfigError(MISSING_PACKAGE) from None
        self._wandb = wandb
        settings = config.logging
        # Through JSON as config.json is written, so W&B shows the same values.
        as_dict = json.loads(json.dumps(config.to_dict(), default=str))
        self.run = wandb.init(
            project=settings.wandb_project or None,
            entity=settings.wandb_entity or None,
            name=settings.wandb_name or posixpath.basename(paths.resolve(workdir)),
            mode=settings.wandb_mode or None,
            dir=_local_dir(workdir),
            config=as_dict,
            id=run_id(workdir),
            resume="allow",
            # Another run still open in this process (a caller's, or a test's) is not ours to reuse.
            reinit="create_new",
        )

    def log(self, step: int, record: dict[str, Any], spectra: dict[str, np.ndarray]) -> None:
        data: dict[str, Any] = {}
        for key, value in record.items():
            number = _loggable(value)
            if key != "step" and number is not None:
                data[key] = number
        for key, values in spectra.items():
            data[f"{key}_log10"] = self._wandb.Histogram(np.log10(np.maximum(np.asarray(values), 1e-12)))
        if data:
            # The record is complete for this step: commit now rather than when the next step comes.
            self.run.log(data, step=int(step), commit=True)

    def close(self, *, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)
