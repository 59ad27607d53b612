"""One device's folder: its current file, the open handle, its recent keys.

All methods block; only the writer thread calls them.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ingestd.records import Record
from ingestd.sinks.file.dedup import DedupWindow, key_bytes
from ingestd.sinks.file.rotation import FileName, OpenFile, next_file, parse_file_name
from ingestd.sinks.file.wal import write_all

KEYS_NAME = ".ingestd-keys"
# When the device's first block was stored ("seconds.millis\n", Unix time),
# written once with its first file: no data file tells it (a file's name
# gives only its period, its mtime the last write, and retention deletes the
# oldest files).
FIRST_SEEN_NAME = ".ingestd-first-seen"
# "32 hex digits, space, seconds.millis\n": 48 bytes for times since 2001.
_KEY_LINE_BYTES = 48
FILE_MODE = 0o644
RECHECK_SECS = 1.0


@dataclass(frozen=True, slots=True)
class Settings:
    rotate_period: str
    max_file_bytes: int
    dedup_window_blocks: int
    dedup_window_secs: float


# One record's planned append: (relpath, offset, meta tail, data, key line,
# file). The first four are what the write-ahead log frames (the meta tail is
# "key-or-dash seconds.millis\n"); the key line is what the key file gets,
# None for a record without a key. A plain tuple: one is made per record.
PlannedWrite = tuple[str, int, str, bytes, str | None, FileName]


class DeviceFiles:
    __slots__ = (
        "_created_file",
        "_fd",
        "_fd_ino",
        "_fd_name",
        "_first_seen",
        "_first_seen_due",
        "_header",
        "_keys_fd",
        "_name",
        "_pending_keys",
        "_relpath",
        "_size",
        "dirty",
        "ext",
        "folder",
        "recheck_at",
        "relpath",
        "settings",
        "unsynced",
        "window",
    )

    def __init__(self, folder: Path, relpath: str, ext: str, settings: Settings) -> None:
        self.folder = folder
        self.relpath = relpath  # protocol/device, as the log names files
        self.ext = ext
        self.settings = settings
        # The current file, as plain fields rather than an OpenFile, so
        # planning a record updates them in place.
        self._name: FileName | None = None
        self._size = 0
        self._header = b""
        self._relpath = ""  # of the current file, made once per file
        self.window = DedupWindow(settings.dedup_window_blocks, settings.dedup_window_secs)
        self.dirty = False
        self._created_file = False  # the folder's entries need an fsync too
        self.unsynced: list[str] = []  # files closed since the last checkpoint
        self._fd: int | None = None
        self._fd_name: FileName | None = None
        self._fd_ino = 0
        self.recheck_at = 0.0  # intact() looks at the disk from then on
        self._keys_fd: int | None = None
        # Keys of stored blocks not yet in the key file: the log holds them
        # until the next checkpoint, which writes them (one write a device).
        self._pending_keys: list[str] = []
        # A new device (no data file, no FIRST_SEEN_NAME) is due its
        # first-seen file: plan() notes the first record's time, apply()
        # writes it with the first file.
        self._first_seen_due = False
        self._first_seen: float | None = None

    # -- loading -------------------------------------------------------------

    @classmethod
    def load(cls, folder: Path, relpath: str, ext: str, settings: Settings) -> DeviceFiles:
        """Read the folder's state: newest file, its header and size, recent keys."""
        folder.mkdir(parents=True, exist_ok=True)
        device = cls(folder, relpath, ext, settings)
        names = [parse_file_name(n) for n in os.listdir(folder)]
        ours = [n for n in names if n is not None and n.ext == ext]
        if ours:
            newest = max(ours, key=lambda n: n.sort_key)
            path = folder / newest.name
            size = path.stat().st_size
            header = b""
            if ext == "csv" and size:
                with open(path, "rb") as fh:
                    header = fh.readline()
            device._start(newest, size, header)
        elif not (folder / FIRST_SEEN_NAME).exists():
            device._first_seen_due = True
        device._load_keys()
        return device

    @property
    def current(self) -> OpenFile | None:
        if self._name is None:
            return None
        return OpenFile(self._name, self._size, self._header)

    def _start(self, name: FileName, size: int, header: bytes) -> None:
        self._name = name
        self._size = size
        self._header = header
        self._relpath = f"{self.relpath}/{name.name}"

    def _load_keys(self) -> None:
        """The window from the key file's tail, kept as lines (see dedup)."""
        path = self.folder / KEYS_NAME
        try:
            with open(path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                # A line more than the window: the first one read may be cut.
                keep = (self.settings.dedup_window_blocks + 1) * _KEY_LINE_BYTES
                fh.seek(max(size - keep, 0))
                tail = fh.read()
        except FileNotFoundError:
            return
        whole = tail
        if size > keep:
            cut = tail.find(b"\n")  # the first line may be cut
            whole = tail[cut + 1 :] if cut >= 0 else b""
        # The window takes whole lines only: a torn last one is a block never
        # acknowledged (its key is in the write-ahead log, which a replay
        # appends again).
        self.window.load(whole)
        if size > 4 * keep:
            self._compact_keys(tail)

    def _compact_keys(self, tail: bytes) -> None:
        """Keep only the window's worth of keys; atomic replace."""
        tmp = self.folder / (KEYS_NAME + ".tmp")
        with open(tmp, "wb") as fh:
            fh.write(tail[tail.index(b"\n") + 1 :])
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.folder / KEYS_NAME)

    # -- planning (in memory) --------------------------------------------------

    def plan(self, record: Record, period: str) -> PlannedWrite | None:
        """Decide where `record` goes and advance the in-memory state to match;
        None when it is a resend of a block in the window (stored already).

        `period` is `period_of(record.received_at, settings.rotate_period)`.
        If applying the plan fails, the caller drops this object and loads the
        folder again: the disk, rolled back, is the truth.
        """
        key = record.dedup_key
        received_at = record.received_at
        if self._first_seen_due and self._first_seen is None:
            self._first_seen = received_at
        if key is not None:
            digest = key_bytes(key)
            if self.window.seen(digest, received_at):
                return None
        data = record.payload
        header = record.header
        size = self._size
        name = self._name
        # The common case, same file, decided here; anything else by the
        # policy (when this says "maybe", next_file has the last word).
        if (
            name is None
            or period != name.period
            or header != self._header
            or (size > len(self._header) and size + len(data) > self.settings.max_file_bytes)
        ):
            target = next_file(
                self.current,
                record_period=period,
                header=header,
                add_bytes=len(data),
                max_file_bytes=self.settings.max_file_bytes,
                ext=self.ext,
            )
            if target is not None:
                name = self._unused(target)
                self._start(name, 0, header)
                size = 0
        assert name is not None  # next_file names one when there is none
        if size == 0 and header:
            data = header + data
            self._header = header
        self._size = size + len(data)
        # The key file's line and the log's meta line end alike: format once.
        stamp = f" {received_at:.3f}\n"
        if key is None:
            return (self._relpath, size, "-" + stamp, data, None, name)
        self.window.add(digest, received_at)
        line = key + stamp
        return (self._relpath, size, line if key else "-" + stamp, data, line, name)

    def _unused(self, name: FileName) -> FileName:
        """Never append to a file that exists already (it was rotated away from)."""
        while (self.folder / name.name).exists() or (self.folder / (name.name + ".gz")).exists():
            name = FileName(name.period, name.seq + 1, name.ext)
        return name

    # -- applying (disk) -------------------------------------------------------

    def intact(self, now: float) -> bool:
        """False when the open file was moved, deleted or written by someone
        else under us (logrotate, an operator): then the folder is reloaded.

        Looked at most once a second per device: a device in a burst does not
        pay a stat per block, and a block written to a file just moved away
        is not lost, it is in the moved file (as nginx does until reopened).
        """
        if now < self.recheck_at:
            return True
        self.recheck_at = now + RECHECK_SECS
        if self._fd is None or self._fd_name is None or self._name is None:
            return os.path.isdir(self.folder)
        try:
            on_disk = os.stat(f"{self.folder}/{self._fd_name.name}")
        except FileNotFoundError:
            return False
        same_size = self._name != self._fd_name or on_disk.st_size == self._size
        return on_disk.st_ino == self._fd_ino and same_size

    def apply(self, writes: list[PlannedWrite]) -> None:
        """Append the planned bytes; on error leave no partial bytes and raise."""
        done: list[tuple[FileName, int]] = []
        try:
            start, count = 0, len(writes)
            while start < count:
                relpath, offset, _, data, _, name = writes[start]
                end = start + 1
                while end < count and writes[end][0] == relpath:
                    end += 1  # one write a file: its writes are consecutive
                fd = self._fd
                if fd is None or self._fd_name is not name:
                    fd = self._open(name)  # (or finds it open under an equal name)
                done.append((name, offset))
                if end > start + 1:
                    data = b"".join([w[3] for w in writes[start:end]])
                write_all(fd, data)
                start = end
            lines = [w[4] for w in writes if w[4] is not None]
            if lines:
                self._append_keys(lines)
            if self._first_seen is not None:
                self._write_first_seen(self._first_seen)
        except OSError:
            self._roll_back(done)
            raise
        self.dirty = True

    def _open(self, name: FileName) -> int:
        # `is` first: the same file's writes share one FileName object, and
        # a dataclass's == is a slow call.
        if self._fd is not None and (self._fd_name is name or self._fd_name == name):
            return self._fd
        if self._fd is not None and self._fd_name is not None:
            # Rotation: the old file is complete; the next checkpoint syncs it.
            os.close(self._fd)
            self._fd = None
            self.unsynced.append(f"{self.folder}/{self._fd_name.name}")
        self._fd = os.open(
            self.folder / name.name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE
        )
        self._fd_name = name
        self._fd_ino = os.fstat(self._fd).st_ino
        self._created_file = True
        return self._fd

    def _write_first_seen(self, ts: float) -> None:
        path = f"{self.folder}/{FIRST_SEEN_NAME}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            write_all(fd, f"{ts:.3f}\n".encode("ascii"))
        finally:
            os.close(fd)
        self._first_seen_due = False
        self._first_seen = None
        # Synced with the first file; the folder's entry too (_open set
        # _created_file).
        self.unsynced.append(path)

    def _append_keys(self, lines: list[str]) -> None:
        if self._keys_fd is None:
            # Create the key file with the device's first keyed write, not at
            # a checkpoint: a new fleet would otherwise create thousands at once
            # and hold up every batch behind them.
            self._keys_fd = os.open(
                self.folder / KEYS_NAME, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
            )
        self._pending_keys += lines

    def _flush_keys(self) -> None:
        if not self._pending_keys:
            return
        if self._keys_fd is None:
            self._keys_fd = os.open(
                self.folder / KEYS_NAME, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
            )
        write_all(self._keys_fd, "".join(self._pending_keys).encode("ascii"))
        self._pending_keys = []

    def _roll_back(self, done: list[tuple[FileName, int]]) -> None:
        # A first-seen file written already stays: the device was seen then.
        for name, offset in done:
            path = self.folder / name.name
            with contextlib.suppress(OSError):
                if offset == 0:
                    path.unlink()
                else:
                    os.truncate(path, offset)

    def checkpoint_paths(self) -> list[str]:
        """Write the pending keys and name every file (and the folder, for a
        created file) whose writes a checkpoint must sync; then count them
        as clean. The syncing happens elsewhere, off the writer thread."""
        paths, self.unsynced = self.unsynced, []
        if self.dirty:
            self._flush_keys()
            if self._fd_name is not None:
                paths.append(f"{self.folder}/{self._fd_name.name}")
            paths.append(f"{self.folder}/{KEYS_NAME}")
            if self._created_file:
                paths.append(f"{self.folder}/")  # a folder: its entries
                self._created_file = False
            self.dirty = False
        return paths

    def take_pending_keys(self) -> list[str]:
        keys, self._pending_keys = self._pending_keys, []
        return keys

    def close(self) -> list[str]:
        """Close the handles; return the paths the next checkpoint must sync.
        Safe to call twice, and after a failed write."""
        try:
            return self.checkpoint_paths()
        finally:
            for fd in (self._fd, self._keys_fd):
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._fd = self._keys_fd = None
            self._fd_name = None


def sync_paths(paths: list[str], spread_secs: float = 0.0) -> float:
    """fsync each file or folder by path; one moved or deleted meanwhile is
    skipped (an operator took it). Raises OSError for any other failure.
    Returns the seconds spent syncing, the pauses left out.

    `spread_secs` paces the fsyncs over that time, so the disk keeps serving
    the write-ahead log's syncs in between (a smoothed checkpoint, as
    PostgreSQL's checkpoint_completion_target does).
    """
    pause = spread_secs / len(paths) if paths else 0.0
    busy = 0.0
    for path in paths:
        if pause:
            time.sleep(pause)
        started = time.perf_counter()
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
            busy += time.perf_counter() - started
    return busy


def make_dirs_durably(path: Path) -> None:
    """`mkdir -p`, then fsync the parent of every folder it created: a new
    entry survives a power cut only once its parent folder is synced."""
    missing = []
    folder = path
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
    for folder in missing:
        fsync_dir(folder.parent)


def fsync_dir(path: Path) -> None:
    """Make a folder's new entries durable (a created file, a rename)."""
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read_first_seen(folder: str) -> float | None:
    """The device's FIRST_SEEN_NAME time, or None if missing or unreadable
    (a folder from before it existed, or one cut short by a power loss)."""
    try:
        with open(f"{folder}/{FIRST_SEEN_NAME}", "rb") as fh:
            text = fh.read(64)
    except OSError:
        return None
    try:
        ts = float(text)
    except ValueError:
        return None
    return ts if math.isfinite(ts) and ts >= 0 else None
