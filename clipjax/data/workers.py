"""Worker processes: how many a pipeline starts, a pool of spawned ones, and how every worker
ends with the process that started it.

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

import concurrent.futures
import multiprocessing
import os
import select
import signal
import threading
import time
from typing import Any

POLL_S = 0.2  # the polling fallback's delay
_EXIT_STATUS = 1  # nobody collects it: the parent is gone


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_processes(worker_count: int, decoder=None) -> int:
    """`data.worker_count` as a number of worker processes (grain's, or the tar stream's pool).

    -1: one per available core, when there is work to spread: images to decode (JPEG, PNG),
    random crops or NaFlex resizes. Raw stored pixels (the shapes data) only need copying, which worker processes
    would slow down with the hand-over, so they stay in this process (0). 0: this process's
    prefetch threads. n > 0: n processes.
    """
    if worker_count >= 0:
        return int(worker_count)
    decodes = getattr(decoder, "encoded_images", True) or any(
        getattr(decoder, k, None) is not None for k in ("random_crop", "naflex")
    )
    return available_cores() if decodes else 0


def spawn_pool(workers: int, job: Any = None) -> concurrent.futures.ProcessPoolExecutor:
    """`workers` processes, spawned (not forked: the parent may run JAX's threads, and hold locks),
    each ending with this process (`init_worker`); `job` (picklable) is what `run_job` calls."""
    return concurrent.futures.ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_pool_worker,
        initargs=(os.getpid(), job),
    )


_JOB: Any = None


def _init_pool_worker(parent_pid: int, job: Any) -> None:
    global _JOB
    init_worker(parent_pid)
    _JOB = job


def run_job(*args):
    """In a worker of `spawn_pool`: its `job(*args)`."""
    return _JOB(*args)


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


def release_shared_memory() -> None:
    """Free the shared memory of worker batches nothing refers to any more, now.

    grain's prefetched arrays sit in reference cycles inside its iterators and are unlinked on
    a background thread when collected: a process that exits right after closing an iterator
    (a run stopped by bad data) would leave them to Python's resource tracker, which warns of
    leaked shared memory. So collect them, then wait for grain's deletion thread."""
    import gc

    gc.collect()
    try:
        from grain._src.python.ipc.shared_memory_array import SharedMemoryArray
    except ImportError:  # another grain layout: the arrays are still freed, only later
        return
    deleter = getattr(SharedMemoryArray, "_del_thread_pool", None)
    if deleter is not None:
        # One thread, first in first out: once this no-op ran, the deletions queued before it did.
        deleter.apply(int)
