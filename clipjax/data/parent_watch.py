"""Worker processes that end when the process that started them ends, however it ends.

A worker started by `multiprocessing` (grain's `mp_prefetch`, a `ProcessPoolExecutor`) outlives
a parent killed with SIGKILL: it is re-parented to init and goes on decoding or converting, or
waits forever on a queue nobody feeds, holding its memory. So every clipjax worker process calls
`init_worker(parent_pid)` first (grain's `worker_init_fn`, the pool's `initializer`): a daemon
thread waits for the parent to end and then ends the worker at once (`os._exit`: the work it
would finish has nobody to hand it to; the shared memory it made is unlinked by
multiprocessing's resource tracker, which ends with the last of them). And a worker ignores
Ctrl-C, which a terminal sends to every process of the group: the parent decides how the run
stops (it saves its step, then closes its workers), and N workers do not print N tracebacks.

Why a thread and not Linux's parent-death signal (prctl PR_SET_PDEATHSIG): that signal fires
when the *thread* that started the worker exits, not its process, and grain starts its workers
from threads of its own pools; a worker would be killed while its parent runs on.

On Linux the thread waits on a pidfd of the parent, which wakes it the moment the parent ends;
where that is missing (other systems, Linux before 5.3) it polls `os.getppid()`, which changes
when the worker is re-parented.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time

POLL_S = 0.2  # the polling fallback's delay
_EXIT_STATUS = 1  # nobody collects it: the parent is gone


def init_worker(parent_pid: int, *_worker_info) -> None:
    """End this process as soon as `parent_pid` (the process that started it) ends; ignore SIGINT.

    Extra arguments are ignored, so that it can serve as grain's `worker_init_fn(i, n)` through
    `functools.partial(init_worker, os.getpid())`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.getppid() != parent_pid:  # the parent ended before this worker got here
        os._exit(_EXIT_STATUS)
    threading.Thread(target=_watch, args=(parent_pid,), name="clipjax-parent-watch", daemon=True).start()


def _watch(parent_pid: int) -> None:
    try:
        pidfd = os.pidfd_open(parent_pid)
    except (AttributeError, OSError):
        pidfd = None
    # Checked again after pidfd_open: the parent may have ended (and its pid been taken) in between.
    if pidfd is not None and os.getppid() == parent_pid:
        select.select([pidfd], [], [])  # readable once the parent has ended
    else:
        while os.getppid() == parent_pid:
            time.sleep(POLL_S)
    os._exit(_EXIT_STATUS)
