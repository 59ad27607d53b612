"""One daemon per data directory: an exclusive flock on `<data_dir>/.ingestd-lock`.

A second `ingestd serve` on the same directory (an operator trying a config
by hand beside the service) would otherwise replay the live daemon's log and
cut "torn tails" off files it is appending to. The lock is taken before
anything else in the directory is read or written, and held until the sink
closes; the kernel drops it when the process dies, so kill -9 leaves no
stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

LOCK_NAME = ".ingestd-lock"


class DataDirLocked(OSError):
    """Another process holds the data directory."""


class DataDirLock:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock and write our PID into the file, or raise
        DataDirLocked naming the holder, having changed nothing."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise DataDirLocked(
                f"data_dir {self.path.parent} is in use by another ingestd "
                f"(pid {holder or 'unknown'}, lock file {self.path})"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # The PID is for people and for the refused instance's message; the
        # flock alone decides, so this need not be durable.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> str:
    with contextlib.suppress(OSError):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return text
    return ""
