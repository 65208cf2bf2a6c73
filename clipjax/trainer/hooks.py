"""The trainer's side work, each a hook for `Trainer.add_hook`: logging and throughput,
embedding metrics and the collapse alarm, the non-finite guard, preemption, checkpoints,
periodic evaluation, profiling."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from typing import Callable

import jax
from jax.experimental import multihost_utils

from clipjax import paths
from clipjax.evals.report import flatten_report, summary_lines
from clipjax.run_store import layout
from clipjax.trainer.loop import StepInfo


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss, gradient or update."""


def data_drop_metrics(drop_counts: dict[str, int]) -> dict[str, int]:
    """Records the input pipeline skipped as undecodable so far, in total and by reason."""
    return {
        "data_dropped": int(sum(drop_counts.values())),
        **{f"data_dropped/{reason}": int(n) for reason, n in sorted(drop_counts.items())},
    }


class LogHook:
    """Train scalars, samples/s since the last call, and data drops to the writer; a progress line.

    With `flops_per_step` (the model FLOPs of one step, `clipjax.flops.train_flops_per_step`, or
    a function of the step where they change) it
    also writes the achieved `tflops_per_device` over the same interval, and `mfu` against
    `peak_flops` (FLOP/s per device) where that is known.
    """

    def __init__(
        self,
        writer,
        progress,
        *,
        global_batch: int,
        data_iterator,
        start_step: int,
        flops_per_step: float = 0.0,
        peak_flops: float | None = None,
        num_devices: int = 1,
    ):
        self.writer, self.progress, self.global_batch = writer, progress, global_batch
        self.data_iterator = data_iterator
        self.flops_per_step, self.peak_flops, self.num_devices = flops_per_step, peak_flops, num_devices
        self._time, self._step = time.perf_counter(), start_step

    def _flops(self, first: int, last: int) -> float:
        """Model FLOPs of steps first..last - 1 (`flops_per_step`: a number, or a function of
        the step where they change, as with SigLIP 2's image-side losses)."""
        if callable(self.flops_per_step):
            return float(sum(self.flops_per_step(s) for s in range(first, last)))
        return self.flops_per_step * (last - first)

    def __call__(self, info: StepInfo) -> None:
        scalars, _ = info.host_metrics()
        now = time.perf_counter()
        scalars = dict(scalars)
        steps_per_sec = (info.step - self._step) / max(now - self._time, 1e-9)
        scalars["samples_per_sec"] = steps_per_sec * self.global_batch
        flops = self._flops(self._step, info.step)
        if flops > 0:  # steps_per_sec * flops per step, over the same interval
            flops_per_device = flops / max(now - self._time, 1e-9) / self.num_devices
            scalars["tflops_per_device"] = flops_per_device / 1e12
            if self.peak_flops:
                scalars["mfu"] = flops_per_device / self.peak_flops
        drop_counts = self.data_iterator.drop_counts
        scalars.update(data_drop_metrics(drop_counts))
        self.writer.write(info.step, scalars)
        self.progress.update(info.step, float(scalars["loss"]), scalars["samples_per_sec"], drop_counts)
        self._time, self._step = time.perf_counter(), info.step


class EmbeddingMetricsHook:
    """Embedding metrics of the step's global batch, spectra, and the collapse alarm."""

    def __init__(self, writer, alarm, *, start_step: int, halt: bool, log: Callable[[str], None]):
        self.writer, self.alarm, self.start_step, self.halt, self.log = writer, alarm, start_step, halt, log

    def __call__(self, info: StepInfo) -> str | None:
        if not info.with_embedding_metrics:
            return None
        scalars, spectra = info.host_metrics()
        reason = None
        if info.step >= self.start_step:
            for line in self.alarm.update(info.step, scalars):
                self.log(f"WARNING: {line}")
            if self.halt and self.alarm.fired:
                reason = f"embedding collapse ({', '.join(sorted(self.alarm.fired))}); metrics.halt_on_collapse is set"
        scalars = {**scalars, "collapse_alarm": int(bool(self.alarm.fired))}
        self.writer.write_spectra(info.step, spectra, scalars)
        self.writer.write(info.step, scalars)
        return reason


def nonfinite_hook(max_streak: int) -> Callable[[StepInfo], str | None]:
    """Stop after `max_streak` consecutive skipped (non-finite) steps.

    Checked only where the hook runs (no per-step host sync); skipped steps leave the state
    untouched, so stopping a few steps late loses nothing.
    """

    def check(info: StepInfo) -> str | None:
        streak = int(info.host_metrics()[0]["nonfinite_streak"])
        if streak >= max_streak > 0:
            return (
                f"{streak} consecutive steps had a non-finite loss, gradient or updated parameters "
                f"(max_nonfinite_streak={max_streak}); the last good state is checkpointed"
            )
        return None

    return check


class StoppedEarly(Exception):
    """The run was asked to stop (SIGTERM, SIGINT) before its last step, and saved the step it
    stopped at: the same command resumes it. Command lines exit with `cli.RESUME_EXIT_STATUS`."""


class PreemptionWatch:
    """Turns a preemption notice (SIGTERM) or Ctrl-C (SIGINT) into a request to checkpoint and
    stop after the current step.

    One process: a handler sets a flag, read after each step. A second Ctrl-C stops at once
    (KeyboardInterrupt), finishing only the save in progress. Several processes must all stop
    at the same step (a checkpoint is a collective), but agreeing on it with a collective every
    step would stall a pod's asynchronous dispatch. JAX's coordination service already catches
    SIGTERM on every host and, in the background, picks the first step all hosts can still
    reach; `multihost_utils.reached_preemption_sync_point(step)` is a local check that turns
    true on every host at that step, and a Ctrl-C is passed on to it as a SIGTERM. Use as a
    context manager; the instance is the hook (it must run every step, as the sync point asks).
    """

    def __enter__(self):
        self.received: str | None = None  # the stop request's reason, once there is one
        self._previous: dict[int, object] = {}
        self._multi_process = jax.process_count() > 1
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may set handlers; the caller keeps its own
        # With several processes the coordination service owns SIGTERM; a Python handler here
        # would take the notice away from it.
        if not self._multi_process:
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)
        # SIGINT only where Python's own handler is in place: a process started in the
        # background by a shell ignores it, and must go on ignoring it.
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            handler = self._pass_on_as_sigterm if self._multi_process else self._handle
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, handler)
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.received is not None and "SIGINT" in self.received:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.received is None:
            self.received = (
                "SIGINT received (Ctrl-C)" if signum == signal.SIGINT else "SIGTERM received (preemption)"
            )

    def _pass_on_as_sigterm(self, signum, frame):
        os.kill(os.getpid(), signal.SIGTERM)

    def requested(self, step: int) -> bool:
        if self._multi_process and multihost_utils.reached_preemption_sync_point(step):
            self.received = self.received or "SIGTERM received (preemption)"
        return self.received is not None

    def __call__(self, info: StepInfo) -> str | None:
        return self.received if self.requested(info.step) else None

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        return False


def checkpoint_hook(
    checkpointer, data_iterator, meta_at: Callable[[int], dict]
) -> Callable[[StepInfo], None]:
    """Save the train state, the data position and the checkpoint's meta (asynchronously).

    A failed write (this one or the previous, asynchronous one) raises CheckpointWriteError: the
    run stops at once rather than train on without checkpoints."""

    def save(info: StepInfo) -> None:
        checkpointer.save(info.step, info.state, data_iterator.get_state(), meta_at(info.step))

    return save


def eval_hook(runner, writer, *, graphdef, mesh, total_steps: int, log: Callable[[str], None]):
    """The evaluators due at an intermediate step (`EvalRunner.due`), logged as eval/... scalars."""

    def evaluate(info: StepInfo) -> None:
        if info.step >= total_steps:
            return  # the final evaluation is the run's report
        due = runner.due(info.step)
        if not due:
            return
        report = runner.run(graphdef, info.state["params"], mesh, info.step, evaluators=due)
        writer.write(info.step, flatten_report(report, prefix="eval/"))
        for line in summary_lines(report):
            log(line)

    return evaluate


class ProfileHook:
    """A `jax.profiler` trace of steps [start, start + steps) in <workdir>/profile (TensorBoard's
    profile plugin and Perfetto open it). Runs every step; only the two edges do anything."""

    def __init__(self, workdir: str, *, start: int, steps: int, log: Callable[[str], None]):
        self.directory = paths.join(workdir, layout.PROFILE)
        self.start, self.stop, self.log = start, start + steps - 1, log
        self.active = False
        # The profiler writes local files only: a bucket workdir gets them copied up at the end.
        self._local = tempfile.mkdtemp(prefix="clipjax-profile-") if paths.is_remote(workdir) else None

    def __call__(self, info: StepInfo) -> None:
        if info.step == self.start - 1 and not self.active:
            jax.block_until_ready(info.state["params"])  # the trace starts with the next step
            jax.profiler.start_trace(self._local or self.directory)
            self.active = True
        elif info.step >= self.stop and self.active:
            jax.block_until_ready(info.metrics)
            self.close()
            self.log(f"profile of steps {self.start}-{self.stop} written to {self.directory}")

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            if self._local is not None:
                paths.upload_tree(self._local, self.directory)
        if self._local is not None:
            shutil.rmtree(self._local, ignore_errors=True)
