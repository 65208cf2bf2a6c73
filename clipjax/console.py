"""What a command prints: its own lines, and libraries' log records only with --verbose.

Orbax logs at INFO every step of every save, and a failed asynchronous save once from each
thread that saw it fail, with its traceback (a full disk: a dozen tracebacks and some 300 lines
before the command's own line). The failure itself reaches the command as an exception, which
it reports as one line naming the checkpoint (`CheckpointWriteError`). So Orbax's records,
asyncio's about the tasks Orbax left unawaited, and the tracebacks of the writes still in flight
when Orbax gave up (`_late_callback_of_a_closed_loop`) are left off the console; `--verbose` (or
CLIPJAX_VERBOSE=1) shows them again. Other libraries keep their warnings and errors (INFO is
left out).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

from absl import logging as absl_logging

# Libraries whose failures reach clipjax as exceptions that it reports itself.
_REPORTED_BY_CLIPJAX = (f"{os.sep}orbax{os.sep}",)
# What names a failed save's abandoned work in asyncio's records: Orbax's code (a task), or the
# save's temporary folder (a tensorstore write, whose error names the file it could not write).
_ORBAX_WORK = (*_REPORTED_BY_CLIPJAX, ".orbax-checkpoint-tmp")


# Notices that say nothing a user needs (path part of the logging module, start of the message):
# tfds names every dataset configuration it was not shipped with, and clipjax's own data sources
# (own CSVs and folders) are all such configurations.
_BENIGN_NOTICES = ((f"tensorflow_datasets{os.sep}", "Using custom data configuration"),)


class _LeaveOutReportedLibraries(logging.Filter):
    """Records logged from those libraries' code, and asyncio's about their work: the failure of
    a task or future nobody awaited, as Orbax leaves them when a save fails."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "asyncio":
            if any(p in record.pathname and str(record.msg).startswith(m) for p, m in _BENIGN_NOTICES):
                return False
            return not any(part in record.pathname for part in _REPORTED_BY_CLIPJAX)
        text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
        return not any(part in text for part in _ORBAX_WORK)


def quiet_libraries(verbose: bool) -> None:
    """Warnings and errors only; and, unless `verbose`, none of Orbax's records, nor the
    tracebacks of writes that finish after Orbax gave up on them."""
    absl_logging.set_verbosity(absl_logging.WARNING)
    if verbose:
        return
    for name in ("absl", "asyncio"):  # where absl.logging's records go, and asyncio's
        logger = logging.getLogger(name)
        if not any(isinstance(f, _LeaveOutReportedLibraries) for f in logger.filters):
            logger.addFilter(_LeaveOutReportedLibraries())
    # tensorstore reports a failing callback through either hook.
    if not getattr(sys.excepthook, "clipjax_quiet", False):
        sys.excepthook = _excepthook_without_closed_loops(sys.excepthook)
    if not getattr(sys.unraisablehook, "clipjax_quiet", False):
        sys.unraisablehook = _unraisablehook_without_closed_loops(sys.unraisablehook)


def _late_callback_of_a_closed_loop(error: BaseException | None) -> bool:
    """tensorstore's completion callback of a write whose asyncio loop is gone.

    Orbax awaits a save's tensorstore writes in an event loop it closes as soon as one of them
    fails; the others finish later (failing too, on a full disk), and tensorstore's callback for
    each one, `loop.call_soon_threadsafe`, raises this, which tensorstore prints through
    sys.excepthook or sys.unraisablehook: a traceback per pending write (56 on a full disk)."""
    if not isinstance(error, RuntimeError) or str(error) != "Event loop is closed":
        return False
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and frames[0].name == "call_soon_threadsafe"


def _excepthook_without_closed_loops(previous):
    def hook(kind, error, tb):
        if not _late_callback_of_a_closed_loop(error):
            previous(kind, error, tb)

    hook.clipjax_quiet = True
    return hook


def _unraisablehook_without_closed_loops(previous):
    def hook(unraisable):
        if not _late_callback_of_a_closed_loop(unraisable.exc_value):
            previous(unraisable)

    hook.clipjax_quiet = True
    return hook
