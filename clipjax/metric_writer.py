"""Run logs (not the standard library's logging): metrics.jsonl, TensorBoard event files (no TensorFlow
needed), optionally Weights & Biases (clipjax.wandb_writer), a progress line."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np

from clipjax import paths
from clipjax.metrics.plot import plot_spectrum_history
from clipjax.run_store import layout
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


# How often a bucket workdir's logs are uploaded (and at close). A bucket has no append: each
# upload rewrites the whole object, which keeps every reader's view whole (one PUT is atomic)
# and costs O(file size), small for these files (one record per logged step). One object per
# chunk would upload less but leave metrics.jsonl no longer one file for the tools that read it.
# A crash loses at most this much of the log, and the resumed run logs those steps again.
BUCKET_SYNC_S = 30.0


class _Lines:
    """A JSON-lines log that only grows: appended line by line to a local file; for a bucket,
    held in memory (with what the object already held) and uploaded whole by `sync`."""

    def __init__(self, path: str, *, keep_open: bool):
        self.path, self.keep_open = path, keep_open
        self.remote = paths.is_remote(path)
        self._file = None
        self._text: list[str] = []
        self._dirty = False
        if self.remote and paths.exists(path):
            text = paths.read_text(path)
            self._text = [text if not text or text.endswith("\n") else text + "\n"]
        elif not self.remote and keep_open:
            self._open()

    def _open(self) -> None:
        paths.makedirs(os.path.dirname(self.path))
        self._file = open(self.path, "a", buffering=1)

    def append(self, line: str) -> None:
        if self.remote:
            self._text.append(line + "\n")
            self._dirty = True
            return
        if self._file is None:
            self._open()
        self._file.write(line + "\n")
        if not self.keep_open:
            self.close()

    def records(self) -> list[dict]:
        if self.remote:
            text = "".join(self._text)
        elif os.path.exists(self.path):
            with open(self.path) as f:
                text = f.read()
        else:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def sync(self) -> None:
        if self.remote and self._dirty:
            self._text = ["".join(self._text)]
            paths.write_atomic(self.path, self._text[0])
            self._dirty = False

    def close(self) -> None:
        self.sync()
        if self._file is not None:
            self._file.close()
            self._file = None


class MetricWriter:
    """Writes each logged step to metrics.jsonl and TensorBoard (and W&B when `config.logging.wandb`
    is on); only the lead process writes.

    Several hooks may log at one step (training scalars, embedding metrics, evaluation): their
    scalars are merged into one record per step, written when a later step is logged or on
    `flush()` / `close()`.

    In a bucket workdir the logs are uploaded every `BUCKET_SYNC_S` seconds and at close; the
    TensorBoard event file is written to a local temporary folder and copied up with them
    (tensorboardX's own S3 writer reads only `S3_ENDPOINT`, its GCS one needs another client:
    one copy through `clipjax.paths` follows the settings every other file follows).
    """

    def __init__(
        self, workdir: str, *, enabled: bool = True, config=None, sync_every_s: float = BUCKET_SYNC_S
    ):
        self.enabled = enabled
        self.workdir = workdir
        self.remote = paths.is_remote(workdir)
        self.sync_every_s = sync_every_s
        self._last_sync = time.monotonic()
        self._tb = None
        self._tb_dir: str | None = None  # the local folder of a bucket workdir's event file
        self._jsonl: _Lines | None = None
        self._spectra: _Lines | None = None
        self._wandb = None
        self._pending_step: int | None = None
        self._pending: dict[str, Any] = {}
        self._pending_spectra: dict[str, np.ndarray] = {}
        if enabled:
            paths.makedirs(workdir)
            self._jsonl = _Lines(paths.join(workdir, layout.METRICS), keep_open=True)
            # Written a few times a run: opened for each record.
            self._spectra = _Lines(paths.join(workdir, layout.SPECTRA), keep_open=False)
            from tensorboardX import SummaryWriter

            if self.remote:
                self._tb_dir = tempfile.mkdtemp(prefix="clipjax-tensorboard-")
            self._tb = SummaryWriter(self._tb_dir or paths.join(workdir, layout.TENSORBOARD))
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
            self._jsonl.append(json.dumps(record))
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, int(step))
        if self._wandb is not None:
            self._wandb.log(step, record, spectra)
        if self.remote and time.monotonic() - self._last_sync >= self.sync_every_s:
            self.sync()

    def sync(self) -> None:
        """Upload a bucket workdir's logs now (nothing to do for a local one)."""
        if not (self.enabled and self.remote):
            return
        self._jsonl.sync()
        self._spectra.sync()
        self._tb.flush()
        paths.upload_tree(self._tb_dir, paths.join(self.workdir, layout.TENSORBOARD))
        self._last_sync = time.monotonic()

    def write_spectra(self, step: int, spectra: dict[str, np.ndarray], scalars: dict[str, Any]) -> None:
        """Eigenvalue spectra to spectra.jsonl (for the PNG) and as TensorBoard histograms."""
        if not self.enabled:
            return
        record = {
            "step": int(step),
            **{k: np.asarray(v).tolist() for k, v in spectra.items()},
            **{k: to_jsonable(v) for k, v in scalars.items() if k.endswith("effective_rank")},
        }
        self._spectra.append(json.dumps(record))
        for key, values in spectra.items():
            self._tb.add_histogram(f"{key}_log10", np.log10(np.maximum(np.asarray(values), 1e-12)), int(step))
        if self._wandb is not None:
            # Held for the step's one W&B record: a second log call at a step would commit it twice.
            self._start(step)
            self._pending_spectra.update({k: np.asarray(v) for k, v in spectra.items()})

    def plot_spectra(self) -> str | None:
        """Write spectrum.png (log spectrum over training, effective rank against step)."""
        if not self.enabled or not (records := self._spectra.records()):
            return None
        return plot_spectrum_history(records, paths.join(self.workdir, layout.SPECTRUM_PLOT))

    def close(self, *, failed: bool = False) -> None:
        """`failed`: the run ends with an error, and W&B marks it so."""
        self.flush()
        if self.enabled:
            self._tb.flush()
            self._tb.close()
            self.sync()
            self._jsonl.close()
            self._spectra.close()
            if self._tb_dir is not None:
                shutil.rmtree(self._tb_dir, ignore_errors=True)
        if self._wandb is not None:
            self._wandb.close(failed=failed)
            self._wandb = None


def read_metrics(workdir: str) -> list[dict]:
    text = paths.read_text(paths.join(workdir, layout.METRICS))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class Progress:
    """One progress line: step, loss, samples/s, ETA, and the records dropped so far (if any)."""

    def __init__(self, total_steps: int, *, enabled: bool = True, stream=None):
        self.total = total_steps
        self.enabled = enabled
        self._stream = stream  # None: sys.stderr as it is when a line is written
        self._last_time = time.perf_counter()
        self._last_step = None

    def update(self, step: int, loss: float, samples_per_sec: float, dropped: dict | None = None) -> None:
        """`dropped`: {reason: records} the input pipeline skipped so far (this process's)."""
        if not self.enabled:
            return
        remaining = (self.total - step) * (self._batch_time(step))
        eta = time.strftime("%H:%M:%S", time.gmtime(max(remaining, 0)))
        drops = ""
        if dropped and sum(dropped.values()):
            reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(dropped.items()) if n)
            drops = f"  dropped {sum(dropped.values())} ({reasons})"
        stream = self._stream or sys.stderr
        stream.write(
            f"step {step}/{self.total}  loss {loss:.4f}  {samples_per_sec:,.0f} samples/s  ETA {eta}{drops}\n"
        )
        stream.flush()

    def _batch_time(self, step: int) -> float:
        now = time.perf_counter()
        if self._last_step is None or step <= self._last_step:
            per_step = 0.0
        else:
            per_step = (now - self._last_time) / (step - self._last_step)
        self._last_time, self._last_step = now, step
        return per_step
