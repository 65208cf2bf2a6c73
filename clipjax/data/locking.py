"""Doing one-time preparation steps once: a file lock on one host, a barrier across hosts.

Several processes of one job (and several jobs sharing a data dir) may try to
prepare the same dataset or train the same tokenizer at once; the first to take
the lock does the work and the others find it done when they get the lock.
A file lock does not reach other hosts (flock on NFS or a bucket mount may hold
nothing), so across the hosts of a JAX job `run_once` has process 0 do the work
while the others wait at a barrier.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from typing import Callable


@contextlib.contextmanager
def file_lock(path: str):
    """Holds an exclusive flock on `path` (created if missing) for the block."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        # Closing the descriptor releases the flock, also if the process dies.
        os.close(fd)


def ensure_writable_dir(path: str, what: str) -> str:
    """Creates `path` if needed; one clear error if that is impossible."""
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise OSError(f"{what} {path!r} does not exist and cannot be created: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {path!r} is not writable")
    return path


def job_processes() -> tuple[int, int]:
    """(this process's index, the number of processes) of the JAX job; (0, 1) without JAX.

    Read only where JAX is already imported: data preparation alone (a converter, a test of
    the data layer) should neither import it nor start its backends.
    """
    jax = sys.modules.get("jax")
    if jax is None:
        return 0, 1
    return jax.process_index(), jax.process_count()


def run_once(work: Callable[[], None], lock_path: str, barrier: str) -> None:
    """Runs `work()`, which must do nothing when its result already exists, once for all.

    One process (or several on one host): under the file lock at `lock_path`. Several JAX
    processes: process 0 works (under the lock) while the others wait at the barrier named
    `barrier` (the same on every process), then each of the others runs `work()` under its
    host's lock, finding the result where the directory is shared and making this host's copy
    where it is not. So every process of the job must call this at the same point.
    """
    index, count = job_processes()
    if count > 1:
        from jax.experimental import multihost_utils

        if index == 0:
            with file_lock(lock_path):
                work()
        multihost_utils.sync_global_devices(barrier)
        if index == 0:
            return
    with file_lock(lock_path):
        work()
