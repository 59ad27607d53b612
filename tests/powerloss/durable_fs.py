"""A FUSE filesystem for power-cut tests: passes every operation through to a
live directory and tells `DurableImage` what became durable.

Run as its own process (`python durable_fs.py LIVE GRAVE MOUNT --mode ...`),
so that the code under test and this filesystem never share a GIL. It mounts,
prints `ready` on stdout, and then takes one command per line on stdin:

- `freeze`: from now on every operation fails with EIO (the power is gone);
  answers `frozen`.
- `cut TARGET SEED`: writes the durable image to TARGET (torn cuts choose
  their prefix with SEED); answers `cut {json report}`.
- `arm EVENT N`: freeze by itself right after the N-th next EVENT, `sync`
  (fsync of a file or folder), `datasync` (fdatasync) or `create`; prints
  `tripped` then; answers `armed`.
- `stats`: answers `stats {json}`.

It exits once unmounted (`fusermount3 -u`), or when stdin closes.

File locks (flock, fcntl) are not implemented here, so the kernel keeps them
itself for this mount, which is right for processes on one machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import random
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import mfusepy

sys.path.insert(0, str(Path(__file__).parent))
from durable_image import DIR, FILE, MODES, DurableImage


class DurableFS(mfusepy.Operations):  # type: ignore[misc]
    use_ns = True

    def __init__(self, live: Path, grave: Path, image: DurableImage) -> None:
        self.live = live
        self.grave = grave
        self.image = image
        # One lock around every operation that changes anything and around
        # the freeze, so the image is exactly the state at one instant.
        self.mutex = threading.Lock()
        self.frozen = False
        self.ready = threading.Event()
        self.handles: dict[int, tuple[int, bool]] = {}  # fh -> (inode, O_APPEND)
        self.ops = 0
        self.armed: tuple[str, int] | None = None  # freeze after the n-th such event
        self.out = threading.Lock()

    def say(self, line: str) -> None:
        with self.out:
            print(line, flush=True)

    def _event(self, event: str) -> None:
        """Count an armed event; the last one freezes (under the lock)."""
        if self.armed is None or self.armed[0] != event:
            return
        left = self.armed[1] - 1
        self.armed = (event, left) if left else None
        if not left:
            self.frozen = True
            self.say("tripped")

    # -- helpers ------------------------------------------------------------------

    def _path(self, path: str) -> Path:
        return self.live / path.lstrip("/")

    def _check(self) -> None:
        if self.frozen:
            raise mfusepy.FuseOSError(errno.EIO)
        self.ops += 1

    def _parent_and_name(self, path: str) -> tuple[int, str]:
        real = self._path(path)
        return os.lstat(real.parent).st_ino, real.name

    def _pin(self, real: Path, ino: int) -> None:
        """A second link outside the tree: the inode (and its number) lives
        as long as this process, whatever the client unlinks."""
        pin = self.grave / str(ino)
        if not pin.exists():
            os.link(real, pin)

    def _record_write(self, fd: int, ino: int, offset: int, length: int) -> None:
        size = os.fstat(fd).st_size
        old = os.pread(fd, length, offset) if offset < size else b""
        self.image.wrote(ino, offset, old, size)

    def _record_truncate(self, fd: int, ino: int, length: int) -> None:
        size = os.fstat(fd).st_size
        old = os.pread(fd, size - length, length) if length < size else b""
        self.image.wrote(ino, min(length, size), old, size)

    # -- lifecycle ------------------------------------------------------------------

    def init(self, path: str) -> None:
        self.ready.set()

    # -- reading ------------------------------------------------------------------

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        if self.frozen:
            raise mfusepy.FuseOSError(errno.EIO)
        st = os.fstat(fh) if fh is not None and fh in self.handles else os.lstat(self._path(path))
        attrs = {
            key: getattr(st, key)
            for key in ("st_mode", "st_ino", "st_uid", "st_gid", "st_size", "st_blocks")
        }
        # The graveyard's link is not the client's business.
        attrs["st_nlink"] = st.st_nlink - 1 if stat.S_ISREG(st.st_mode) else st.st_nlink
        attrs["st_atime"], attrs["st_mtime"] = st.st_atime_ns, st.st_mtime_ns
        attrs["st_ctime"] = st.st_ctime_ns
        return attrs

    def access(self, path: str, amode: int) -> int:
        if not os.access(self._path(path), amode):
            raise mfusepy.FuseOSError(errno.EACCES)
        return 0

    def readdir(self, path: str, fh: int) -> list[str]:
        if self.frozen:
            raise mfusepy.FuseOSError(errno.EIO)
        return [".", "..", *os.listdir(self._path(path))]

    def opendir(self, path: str) -> int:
        if self.frozen:
            raise mfusepy.FuseOSError(errno.EIO)
        return 0

    def releasedir(self, path: str, fh: int) -> int:
        return 0

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        if self.frozen:
            raise mfusepy.FuseOSError(errno.EIO)
        return os.pread(fh, size, offset)

    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self.live)
        return {
            key: getattr(st, key)
            for key in (
                "f_bavail",
                "f_bfree",
                "f_blocks",
                "f_bsize",
                "f_favail",
                "f_ffree",
                "f_files",
                "f_flag",
                "f_frsize",
                "f_namemax",
            )
        }

    # -- files ------------------------------------------------------------------

    def open(self, path: str, flags: int) -> int:
        with self.mutex:
            self._check()
            real = self._path(path)
            fd = os.open(real, _readable(flags & ~(os.O_TRUNC | os.O_CREAT | os.O_EXCL)))
            ino = os.fstat(fd).st_ino
            if flags & os.O_TRUNC and os.fstat(fd).st_size:
                self._record_truncate(fd, ino, 0)
                os.ftruncate(fd, 0)
            self.handles[fd] = (ino, bool(flags & os.O_APPEND))
            return fd

    def create(self, path: str, mode: int, flags: int) -> int:
        with self.mutex:
            self._check()
            real = self._path(path)
            parent, name = self._parent_and_name(path)
            fd = os.open(real, _readable(flags) | os.O_CREAT | os.O_EXCL, mode)
            ino = os.fstat(fd).st_ino
            self._pin(real, ino)
            self.image.created(ino, FILE)
            self.image.changed([(parent, name, ino)])
            self.handles[fd] = (ino, bool(flags & os.O_APPEND))
            self._event("create")
            return fd

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        with self.mutex:
            self._check()
            ino, append = self.handles[fh]
            if append:
                offset = os.fstat(fh).st_size
            self._record_write(fh, ino, offset, len(data))
            return os.pwrite(fh, data, offset)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        with self.mutex:
            self._check()
            if fh is not None and fh in self.handles:
                ino = self.handles[fh][0]
                self._record_truncate(fh, ino, length)
                os.ftruncate(fh, length)
                return 0
            fd = os.open(self._path(path), os.O_RDWR)
            try:
                self._record_truncate(fd, os.fstat(fd).st_ino, length)
                os.ftruncate(fd, length)
            finally:
                os.close(fd)
            return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        with self.mutex:
            self._check()
            ino = self.handles[fh][0]
            self.image.synced_file(ino, os.fstat(fh).st_size, datasync=bool(datasync))
            # fdatasync counts apart: armed "sync" counts stay as they were.
            self._event("datasync" if datasync else "sync")
            return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        with self.mutex:
            self._check()
            self.image.synced_dir(os.lstat(self._path(path)).st_ino)
            self._event("sync")
            return 0

    def flush(self, path: str, fh: int) -> int:
        return 0

    def release(self, path: str, fh: int) -> int:
        with self.mutex:
            self.handles.pop(fh, None)
            os.close(fh)
            return 0

    # -- metadata that is not modelled (durable as soon as done) -------------------

    def chmod(self, path: str, mode: int) -> int:
        self._check()
        os.chmod(self._path(path), mode)
        return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        self._check()
        os.chown(self._path(path), uid, gid)
        return 0

    def utimens(self, path: str, times: tuple[int, int] | None = None) -> int:
        self._check()
        if times is None:
            os.utime(self._path(path))
        else:
            os.utime(self._path(path), ns=times)
        return 0

    # -- the namespace ------------------------------------------------------------

    def mkdir(self, path: str, mode: int) -> int:
        with self.mutex:
            self._check()
            parent, name = self._parent_and_name(path)
            real = self._path(path)
            os.mkdir(real, mode)
            ino = os.lstat(real).st_ino
            self.image.created(ino, DIR)
            self.image.changed([(parent, name, ino)])
            return 0

    def rmdir(self, path: str) -> int:
        with self.mutex:
            self._check()
            parent, name = self._parent_and_name(path)
            real = self._path(path)
            ino = os.lstat(real).st_ino
            if os.listdir(real):
                raise mfusepy.FuseOSError(errno.ENOTEMPTY)
            # Moved, not removed: the number stays taken (see _pin).
            os.rename(real, self.grave / f"d{ino}")
            self.image.changed([(parent, name, None)])
            return 0

    def unlink(self, path: str) -> int:
        with self.mutex:
            self._check()
            parent, name = self._parent_and_name(path)
            os.unlink(self._path(path))
            self.image.changed([(parent, name, None)])
            return 0

    def rename(self, old: str, new: str) -> int:
        with self.mutex:
            self._check()
            old_parent, old_name = self._parent_and_name(old)
            new_parent, new_name = self._parent_and_name(new)
            real_old, real_new = self._path(old), self._path(new)
            ino = os.lstat(real_old).st_ino
            try:
                replaced = os.lstat(real_new)
            except FileNotFoundError:
                replaced = None
            if replaced is not None and stat.S_ISDIR(replaced.st_mode):
                if os.listdir(real_new):
                    raise mfusepy.FuseOSError(errno.ENOTEMPTY)
                os.rename(real_new, self.grave / f"d{replaced.st_ino}")
            os.rename(real_old, real_new)
            self.image.changed([(old_parent, old_name, None), (new_parent, new_name, ino)])
            return 0

    def link(self, target: str, source: str) -> int:
        with self.mutex:
            self._check()
            parent, name = self._parent_and_name(target)
            real = self._path(target)
            os.link(self._path(source), real)
            self.image.changed([(parent, name, os.lstat(real).st_ino)])
            return 0


def _readable(flags: int) -> int:
    """Write-only handles are opened read-write: the undo log reads what a
    write overwrites."""
    if flags & os.O_ACCMODE == os.O_WRONLY:
        return (flags & ~os.O_ACCMODE) | os.O_RDWR
    return flags


def scan(live: Path, grave: Path, image: DurableImage) -> None:
    """Everything already in `live` is durable; pin its files."""
    for folder, dirs, files in os.walk(live):
        parent = os.lstat(folder).st_ino
        for name in dirs:
            image.known(parent, name, os.lstat(Path(folder) / name).st_ino, DIR)
        for name in files:
            path = Path(folder) / name
            ino = os.lstat(path).st_ino
            image.known(parent, name, ino, FILE)
            if not (grave / str(ino)).exists():
                os.link(path, grave / str(ino))


def control(fs: DurableFS, mount: Path) -> None:
    """The commands on stdin (see the module's docstring)."""
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "freeze":
            with fs.mutex:
                fs.frozen = True
            answer = "frozen"
        elif words[0] == "cut":
            with fs.mutex:
                fs.frozen = True
                report = fs.image.materialise(
                    Path(words[1]), fs.grave, random.Random(int(words[2]))
                )
            answer = "cut " + json.dumps(dataclasses.asdict(report))
        elif words[0] == "arm":
            with fs.mutex:
                fs.armed = (words[1], int(words[2]))
            answer = "armed"
        elif words[0] == "stats":
            answer = "stats " + json.dumps(
                {"ops": fs.ops, "syncs": fs.image.syncs, "pending": len(fs.image.pending)}
            )
        else:
            answer = f"error unknown command {words[0]!r}"
        fs.say(answer)
    # stdin closed: the controller is gone, so go too.
    subprocess.run(["fusermount3", "-u", "-z", str(mount)], check=False, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("live", type=Path)
    parser.add_argument("grave", type=Path)
    parser.add_argument("mount", type=Path)
    parser.add_argument("--mode", choices=MODES, default="strict")
    parser.add_argument("--torn", action="store_true")
    args = parser.parse_args()
    args.grave.mkdir(parents=True, exist_ok=True)
    image = DurableImage(args.mode, os.lstat(args.live).st_ino, torn=args.torn)
    scan(args.live, args.grave, image)
    fs = DurableFS(args.live, args.grave, image)

    def announce() -> None:
        fs.ready.wait()
        fs.say("ready")
        control(fs, args.mount)

    threading.Thread(target=announce, daemon=True, name="control").start()
    mfusepy.FUSE(
        fs,
        str(args.mount),
        foreground=True,
        # Unlinks of open files reach us as unlinks, not renames to .fuse_hidden.
        hard_remove=True,
        default_permissions=True,
        max_threads=16,
    )


if __name__ == "__main__":
    main()
