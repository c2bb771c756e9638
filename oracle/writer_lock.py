"""One writer per dataset store: an exclusive lock file inside the store that names its holder.

``STORE.zarr/writer.lock`` is locked with ``flock`` (the kernel drops the lock when its holder exits, however it
dies) and, while held, holds one JSON line naming the holder: pid, host, command and start time. A second writer
is refused with one line naming the holder and what to do. The file is emptied when the writer closes; a file
still naming a holder means that holder was killed: a later writer on the same host takes the lock over (and
says so). A holder on another host cannot be checked from here, so its lock is taken over only after the file
is deleted by hand. The file is never deleted by layershap, so two writers can never lock two different files.
Within one process a later writer of the same store takes the lock over from the earlier one, whose appends
then fail (so an unclosed store, e.g. one a traceback keeps alive, never blocks a rerun). Readers never take
the lock.

Example:
    >>> lock = WriterLock.acquire(Path("runs/x/dataset.zarr"))   # StoreLockedError while another writer runs  # doctest: +SKIP
    >>> lock.release()  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

from layershap.core.errors import StoreLockedError

try:
    import fcntl
except ImportError:  # Windows: msvcrt byte-range locks, also released by the kernel when the holder exits
    fcntl = None
    import msvcrt

LOCK_FILE = "writer.lock"
# The locks this process holds, by lock file: a second writer of the same store in this process takes the lock
# over from the first (whose appends then fail), instead of being refused by its own process's lock.
_HELD: dict[str, WriterLock] = {}
_HELD_GUARD = threading.Lock()
# Windows locks this byte (far past the holder line) so that others can still read who holds the lock.
_WIN_LOCK_OFFSET = 1 << 20


def _try_lock(fd: int) -> bool:
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True
    os.lseek(fd, _WIN_LOCK_OFFSET, os.SEEK_SET)
    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def _unlock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)  # also for forked children that share this open file
    else:
        os.lseek(fd, _WIN_LOCK_OFFSET, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def _read_holder(fd: int) -> dict | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 64 * 1024).split(b"\0", 1)[0].strip()
    if not raw:
        return None
    try:
        holder = json.loads(raw)
    except ValueError:
        return {"unreadable": raw[:200].decode(errors="replace")}
    return holder if isinstance(holder, dict) else {"unreadable": str(holder)[:200]}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def describe_holder(holder: dict) -> str:
    """``pid 123 on host h ('layershap oracle ...', since 2025-01-02 10:11:12)`` for a lock file's holder.

    Example:
        >>> describe_holder({"pid": 7, "host": "h", "command": "layershap oracle", "started": "2025-01-02 10:11:12"})
        "pid 7 on host h ('layershap oracle', since 2025-01-02 10:11:12)"
    """
    if "unreadable" in holder:
        return f"an unreadable holder record ({holder['unreadable']!r})"
    command = str(holder.get("command", "?"))
    command = command if len(command) <= 120 else command[:117] + "..."
    return f"pid {holder.get('pid')} on host {holder.get('host')} ({command!r}, since {holder.get('started')})"


def _write_holder(fd: int) -> None:
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv) or "python",
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(holder) + "\n").encode())
    os.fsync(fd)


def _held_error(store_path: str | Path, fd: int) -> StoreLockedError:
    """The lock is held right now: name the holder, and what to do."""
    holder = _read_holder(fd) or {"pid": "?", "host": "?", "command": "?", "started": "?"}
    return StoreLockedError(
        f"the dataset store {store_path} is being written by {describe_holder(holder)}; two writers would mix "
        "their rows: wait for that run to finish (or stop it) and run again, or write to another --out (reading "
        "the store meanwhile is fine)"
    )


def _check_stale(path: Path, store_path: str | Path, previous: dict) -> None:
    """The lock is free but the file names a holder, which died without releasing it: refuse where that cannot
    be verified from this host (another host, or a pid that is alive)."""
    host, pid = previous.get("host"), previous.get("pid")
    if host != socket.gethostname():
        raise StoreLockedError(
            f"the dataset store {store_path} was locked for writing by {describe_holder(previous)}, which "
            f"cannot be checked from host {socket.gethostname()}; if that process is no longer running, delete "
            f"{path} and run again, else wait for it to finish or write to another --out"
        )
    if isinstance(pid, int) and pid != os.getpid() and _alive(pid):
        raise StoreLockedError(  # the lock is free: a file system without working locks, or the pid was reused
            f"the dataset store {store_path} names a live writer, {describe_holder(previous)}, although its "
            f"lock is free; if that pid is not a layershap run writing this store, delete {path} and run again"
        )


class WriterLock:
    """The held write lock of one store; :meth:`acquire` takes it, :meth:`release` (idempotent) gives it back."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, store_path: str | Path) -> WriterLock:
        """Lock ``store_path`` for writing, or raise :class:`StoreLockedError` naming the live holder.

        A lock left by a dead process of this host is taken over, with one line on stderr.

        Example:
            >>> WriterLock.acquire("runs/x/dataset.zarr").release()  # doctest: +SKIP
        """
        path = Path(store_path) / LOCK_FILE
        key = os.path.realpath(path)
        with _HELD_GUARD:
            earlier = _HELD.get(key)
            if earlier is not None and earlier.held:  # this process: the later writer takes the lock over
                fd, earlier._fd = earlier._fd, None
                lock = _HELD[key] = cls(path, fd)
                _write_holder(fd)
                return lock
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not _try_lock(fd):
                raise _held_error(store_path, fd)
            previous = _read_holder(fd)
            if previous is not None:
                _check_stale(path, store_path, previous)
                print(f"layershap: took over the write lock of {store_path} from {describe_holder(previous)}, "
                      "which is no longer running", file=sys.stderr, flush=True)
            _write_holder(fd)
        except BaseException:
            os.close(fd)  # closing drops a lock taken above
            raise
        with _HELD_GUARD:
            lock = _HELD[key] = cls(path, fd)
        return lock

    @staticmethod
    def check_free(store_path: str | Path) -> None:
        """Raise :class:`StoreLockedError` where :meth:`acquire` would (a live or unverifiable holder); writes
        nothing. A cheap check before loading a model for a store.

        Example:
            >>> WriterLock.check_free("runs/x/dataset.zarr")
        """
        path = Path(store_path) / LOCK_FILE
        with _HELD_GUARD:
            if (earlier := _HELD.get(os.path.realpath(path))) is not None and earlier.held:
                return  # held by this process: acquire hands it on
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return
        try:
            if not _try_lock(fd):
                raise _held_error(store_path, fd)
            try:
                previous = _read_holder(fd)
                if previous is not None:
                    _check_stale(path, store_path, previous)
            finally:
                _unlock(fd)
        finally:
            os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Empty the lock file and unlock it; safe to call twice (a lock handed on to a later writer of this
        process stays with that writer)."""
        with _HELD_GUARD:
            fd, self._fd = self._fd, None
            if _HELD.get(os.path.realpath(self.path)) is self:
                del _HELD[os.path.realpath(self.path)]
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
            _unlock(fd)
        finally:
            os.close(fd)
