"""One writer per run directory: an exclusive advisory lock held for the whole run.

`RunLock(run_dir).acquire()` takes `<run_dir>/.lock` with `fcntl.flock` (the kernel drops it
when the process ends, SIGKILL included, so a crashed run never leaves a lock behind) and writes
the owner's pid, host and start time into it, so a second writer is refused in one line that
names the first. Where the filesystem has no flock (some network mounts), the lock file's pid
and host decide instead: an owner on this host whose process is gone is stale and taken over;
an owner on another host is trusted until its file is removed. Rank 0 holds the lock for every
rank of a torchrun job. Released by `release()` (and by the process ending).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

from braid.errors import BraidError

LOCK_FILE = ".lock"
RETRIES, RETRY_S = 4, 0.05  # acquire's retries past a probe's momentary shared lock


def _lock_exclusive(fd: int) -> None:
    """flock(LOCK_EX | LOCK_NB), retried for a moment: another job's `busy` probe may hold a
    shared lock on the file for microseconds. BlockingIOError if another writer holds it."""
    import fcntl

    for _ in range(RETRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(RETRY_S)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


class RunLock:
    def __init__(self, run_dir: str | os.PathLike[str]):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise a one-line BraidError naming the process that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock_exclusive(fd)
        except BlockingIOError:
            os.close(fd)
            raise BraidError(self._busy_message()) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            self._check_owner_without_flock()  # no flock here: the recorded owner decides
        self._fd = fd
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner).encode(), 0)
        return self

    def busy(self) -> BraidError | None:
        """The one-line error `acquire` would raise if another writer holds the lock now, else
        None; takes nothing. Lets a second job of a running run be refused before it spends
        minutes building its data and model; `acquire` still decides, later."""
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None  # no lock file (no run yet), or unreadable: acquire decides
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return BraidError(self._busy_message())
        except OSError:
            pass  # no flock on this filesystem: acquire's fallback decides
        finally:
            os.close(fd)  # drops the shared lock taken above
        return None

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self._fd, 0)  # no owner recorded: the lock-free fallback sees it free
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def owner(self) -> dict | None:
        """The recorded owner ({pid, host, since}), or None if none is recorded."""
        try:
            body = json.loads(self.path.read_bytes().decode("utf-8") or "null")
        except (OSError, ValueError):
            return None
        return body if isinstance(body, dict) else None

    def _busy_message(self) -> str:
        who = self.owner() or {}
        pid, host = who.get("pid", "?"), who.get("host", "?")
        since = who.get("since")
        ok = isinstance(since, (int, float)) and not isinstance(since, bool)
        when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if ok else ""
        return (
            f"run directory {self.path.parent} is in use by pid {pid} on {host}{when}: wait "
            "for that run to end, stop it, or choose another run.name"
        )

    def _check_owner_without_flock(self) -> None:
        from braid.metrics.experiments import pid_alive

        who = self.owner()
        if not who:
            return
        if who.get("host") == socket.gethostname() and isinstance(who.get("pid"), int):
            if who["pid"] == os.getpid() or not pid_alive(who["pid"]):
                return  # stale: its process is gone
        raise BraidError(self._busy_message())
