"""Run logs (not the standard library's logging): metrics.jsonl, TensorBoard event files (no TensorFlow
needed), optionally Weights & Biases (clipjax.wandb_writer), a progress line."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import numpy as np

from clipjax.metrics.plot import plot_spectrum_history
from clipjax.wandb_writer import WandbWriter


def to_jsonable(value: Any) -> Any:
    """numpy / jax scalars and arrays -> Python numbers and lists; non-finite floats -> strings."""
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "item") and np.ndim(value) == 0:
        value = value.item()
    elif isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricWriter:
    """Writes each logged step to metrics.jsonl and TensorBoard (and W&B when `config.logging.wandb`
    is on); only the lead process writes.

    Several hooks may log at one step (training scalars, embedding metrics, evaluation): their
    scalars are merged into one record per step, written when a later step is logged or on
    `flush()` / `close()`.
    """

    def __init__(self, workdir: str, *, enabled: bool = True, config=None):
        self.enabled = enabled
        self.workdir = workdir
        self._spectra_path = os.path.join(workdir, "spectra.jsonl")
        self._tb = None
        self._jsonl = None
        self._wandb = None
        self._pending_step: int | None = None
        self._pending: dict[str, Any] = {}
        self._pending_spectra: dict[str, np.ndarray] = {}
        if enabled:
            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            if config is not None and config.logging.wandb:
                self._wandb = WandbWriter(workdir, config)

    def _start(self, step: int) -> None:
        if self._pending_step is not None and int(step) != self._pending_step:
            self.flush()
        self._pending_step = int(step)

    def write(self, step: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._start(step)
        self._pending.update(to_jsonable(scalars))

    def flush(self) -> None:
        if not self.enabled or self._pending_step is None:
            return
        step, scalars, spectra = self._pending_step, self._pending, self._pending_spectra
        self._pending_step, self._pending, self._pending_spectra = None, {}, {}
        record = {"step": step, **scalars}
        if scalars or not spectra:
            self._jsonl.write(json.dumps(record) + "\n")
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, int(step))
        if self._wandb is not None:
            self._wandb.log(step, record, spectra)

    def write_spectra(self, step: int, spectra: dict[str, np.ndarray], scalars: dict[str, Any]) -> None:
        """Eigenvalue spectra to spectra.jsonl (for the PNG) and as TensorBoard histograms."""
        if not self.enabled:
            return
        record = {
            "step": int(step),
            **{k: np.asarray(v).tolist() for k, v in spectra.items()},
            **{k: to_jsonable(v) for k, v in scalars.items() if k.endswith("effective_rank")},
        }
        with open(self._spectra_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, values in spectra.items():
            self._tb.add_histogram(f"{key}_log10", np.log10(np.maximum(np.asarray(values), 1e-12)), int(step))
        if self._wandb is not None:
            # Held for the step's one W&B record: a second log call at a step would commit it twice.
            self._start(step)
            self._pending_spectra.update({k: np.asarray(v) for k, v in spectra.items()})

    def plot_spectra(self) -> str | None:
        """Write spectrum.png (log spectrum over training, effective rank against step)."""
        if not self.enabled or not os.path.exists(self._spectra_path):
            return None
        with open(self._spectra_path) as f:
            records = [json.loads(line) for line in f if line.strip()]
        return plot_spectrum_history(records, os.path.join(self.workdir, "spectrum.png")) if records else None

    def close(self, *, failed: bool = False) -> None:
        """`failed`: the run ends with an error, and W&B marks it so."""
        self.flush()
        if self.enabled:
            self._jsonl.close()
            self._tb.flush()
            self._tb.close()
        if self._wandb is not None:
            self._wandb.close(failed=failed)
            self._wandb = None


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """One progress line: step, loss, samples/s and ETA."""

    def __init__(self, total_steps: int, *, enabled: bool = True, stream=sys.stderr):
        self.total = total_steps
        self.enabled = enabled
        self.stream = stream
        self._last_time = time.perf_counter()
        self._last_step = None

    def update(self, step: int, loss: float, samples_per_sec: float) -> None:
        if not self.enabled:
            return
        remaining = (self.total - step) * (self._batch_time(step))
        eta = time.strftime("%H:%M:%S", time.gmtime(max(remaining, 0)))
        self.stream.write(
            f"step {step}/{self.total}  loss {loss:.4f}  {samples_per_sec:,.0f} samples/s  ETA {eta}\n"
        )
        self.stream.flush()

    def _batch_time(self, step: int) -> float:
        now = time.perf_counter()
        if self._last_step is None or step <= self._last_step:
            per_step = 0.0
        else:
            per_step = (now - self._last_time) / (step - self._last_step)
        self._last_time, self._last_step = now, step
        return per_step
