"""One trainer per workdir: a lock file with a heartbeat, and a rule for locks left by the dead.

`<workdir>/LOCK` is created with exclusive-create semantics and holds who owns it (host, pid,
start time) and a heartbeat that a background thread rewrites every `heartbeat_s`. A second
trainer finds it and stops with one line naming the owner. A lock is stale, and is taken over,
when its owner's process is gone (same host) or its heartbeat is older than `stale_after_s`
(any host: a file system shared by many machines, or a bucket, cannot ask another host whether
a process lives). Only the lead process of a job takes the lock.

In a bucket (`gs://`, `s3://`) the lock is an object created with a precondition (S3
`If-None-Match: *`, GCS `ifGenerationMatch=0`), so of two trainers starting at once one fails,
as with O_EXCL locally; the heartbeat rewrites it. An S3-compatible store that ignores the
precondition makes the lock advisory only: a second trainer is still refused once the first
one's lock is there, but two started in the same instant may both proceed.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

from clipjax import paths
from clipjax.run_store import layout


class WorkdirLockedError(RuntimeError):
    """Another trainer holds the workdir; the message is one line."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WorkdirLock:
    def __init__(self, workdir: str, *, heartbeat_s: float = 30.0, stale_after_s: float = 600.0):
        self.path = paths.join(workdir, layout.LOCK)
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _write(self, mode: str) -> None:
        record = json.dumps(dict(self.owner, heartbeat=time.time()))
        if mode == "create":
            paths.create_exclusive(self.path, record)
        elif paths.is_remote(self.path):
            paths.write_atomic(self.path, record)  # one PUT: a reader sees the old beat or the new
        else:
            # In place, not renamed over: a rename would let a stale-lock remover delete our lock.
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(record)

    @staticmethod
    def _age(path: str) -> float:
        """Seconds since the lock file was last written (0 when that cannot be told)."""
        if not paths.is_remote(path):
            try:
                return time.time() - os.path.getmtime(path)
            except FileNotFoundError:
                return 0.0
        try:
            modified = paths.path(path).stat().mtime
        except OSError:
            return 0.0
        return time.time() - modified if modified else 0.0

    def _stale_reason(self, holder: dict) -> str | None:
        age = time.time() - float(holder.get("heartbeat", 0))
        if holder.get("host") == self.owner["host"] and not _alive(int(holder.get("pid", -1))):
            return f"its process {holder.get('pid')} is gone"
        if age > self.stale_after_s:
            return f"its last heartbeat was {age:.0f} s ago"
        return None

    def acquire(self, log=print) -> None:
        paths.makedirs(os.path.dirname(self.path))
        for _ in range(3):
            try:
                self._write("create")
                break
            except FileExistsError:
                try:
                    holder = json.loads(paths.read_text(self.path))
                except (OSError, ValueError):
                    holder = {}  # being written, or damaged: judged by its age below
                    if self._age(self.path) < self.stale_after_s:
                        time.sleep(0.2)
                        continue
                reason = self._stale_reason(holder)
                if reason is None:
                    since = time.strftime(
                        "%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0)))
                    )
                    raise WorkdirLockedError(
                        f"workdir {self.path.rsplit('/', 1)[0]} is in use by process {holder.get('pid')} on "
                        f"{holder.get('host')} since {since}; stop that trainer, or delete {self.path} if it is gone"
                    ) from None
                log(f"WARNING: taking over the stale lock {self.path} ({reason})")
                paths.remove(self.path)
        else:
            raise WorkdirLockedError(f"could not take the lock {self.path}")
        self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._write("update")
            except OSError:
                pass  # a missed heartbeat only makes the lock look older

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            paths.remove(self.path)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()
        return False
