"""Inter-process file lock for one-time preparation steps.

Several processes of one job (and several jobs sharing a data dir) may try to
prepare the same dataset or train the same tokenizer at once; the first to take
the lock does the work and the others find it done when they get the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os


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
