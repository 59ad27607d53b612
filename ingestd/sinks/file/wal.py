"""Write-ahead log: one write and one fdatasync per batch, for all devices.

Every write to a device file is first framed here. After a crash, replaying
the frames puts each acknowledged block back at its offset; the device files
themselves are fsynced only at checkpoints, after which the log starts over.

The log file is recycled rather than truncated: it is zero-filled ahead of
use and overwritten from the start after each checkpoint, so an fdatasync
flushes data only, never the file's size or extents (no journal commit on
ext4/xfs), which makes the per-batch sync markedly cheaper.

Frame: 4-byte length of meta + data, 4-byte CRC32 of epoch + meta + data,
4-byte epoch, then `meta` (one ASCII line) and the data bytes. A log starts
with a marker frame naming its epoch; replay stops at the first frame of
another epoch (left from before the last checkpoint), a zeroed header, or a
bad CRC (cut short by a crash: never acknowledged).
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_HEAD = struct.Struct(">III")
_EPOCH = struct.Struct(">I")
WAL_NAME = ".ingestd-wal"
WAL_NAMES = (WAL_NAME, ".ingestd-wal.1")
# Every log file any run may have left: one process's pair, or a storage
# shard's (`.ingestd-wal.s<k>`, `.ingestd-wal.s<k>.1`) in worker mode.
_ANY_LOG = re.compile(r"\.ingestd-wal(\.s[0-9]{1,4})?(\.1)?")
MARKER_PATH = "."
GROW_BYTES = 1024 * 1024

# A write as `append_writes` takes it: (relpath, offset, meta tail, data, ...),
# where the meta tail is what follows the offset in a frame's meta line:
# "key-or-dash seconds.millis\n". Fields after the data are the caller's.
LogWrite = tuple[str, int, str, bytes, *tuple[object, ...]]


@dataclass(frozen=True, slots=True)
class Frame:
    relpath: str  # protocol/device/file, relative to the data directory
    offset: int
    key: str | None
    received_at: float
    data: bytes

    def encode(self, epoch: int) -> bytes:
        meta = f"{self.relpath} {self.offset} {self.key or '-'} {self.received_at:.3f}\n"
        body = meta.encode("ascii") + self.data
        crc = zlib.crc32(body, zlib.crc32(_EPOCH.pack(epoch)))
        return _HEAD.pack(len(body), crc, epoch) + body


def decode_frames(blob: bytes) -> tuple[int | None, list[Frame], int]:
    """The epoch, the whole frames of the log in `blob` (marker excluded), and
    where they end."""
    frames = []
    epoch = None
    pos = 0
    while pos + _HEAD.size <= len(blob):
        length, crc, frame_epoch = _HEAD.unpack_from(blob, pos)
        body = blob[pos + _HEAD.size : pos + _HEAD.size + length]
        if length == 0 or len(body) != length:
            break
        if zlib.crc32(body, zlib.crc32(_EPOCH.pack(frame_epoch))) != crc:
            break
        if epoch is not None and frame_epoch != epoch:
            break  # left from before the last checkpoint
        meta, _, data = body.partition(b"\n")
        try:
            relpath, offset, key, ts = meta.decode("ascii").split(" ")
            frame = Frame(relpath, int(offset), None if key == "-" else key, float(ts), data)
        except ValueError:
            break
        if epoch is None:
            if frame.relpath != MARKER_PATH:
                break  # a log always starts with its marker
            epoch = frame_epoch
        else:
            frames.append(frame)
        pos += _HEAD.size + length
    return epoch, frames, pos


class _Slot:
    """One recycled log file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        self.allocated = os.fstat(self.fd).st_size
        self.size = 0
        self.epoch = 0
        self.pending = False  # holds frames whose files are not synced yet


class WriteAheadLog:
    """Two recycled log files: one takes appends while the other's writes
    are being synced by a background checkpoint, so devices never wait for a
    checkpoint. Blocking: call from the writer thread."""

    def __init__(
        self, data_dir: Path, *, sync: bool, epoch: int, names: tuple[str, str] = WAL_NAMES
    ) -> None:
        self._sync = sync
        self._slots = [_Slot(data_dir / name) for name in names]
        self._epoch = epoch
        for slot in self._slots:
            self._reset(slot)
        self._active = 0

    @property
    def size(self) -> int:
        return self._slots[self._active].size

    def append(self, frames: list[Frame]) -> None:
        """Make `frames` durable (with sync on), or leave no trace of them."""
        self.append_writes(
            (f.relpath, f.offset, f"{f.key or '-'} {f.received_at:.3f}\n", f.data) for f in frames
        )

    def append_writes(self, writes: Iterable[LogWrite]) -> None:
        """`append` for writes in the tuple form, which framing a batch of
        them needs no object per write (the bytes are as `Frame.encode`'s)."""
        slot = self._slots[self._active]
        epoch = slot.epoch
        # The CRC covers epoch + meta + data: start from the epoch's CRC, and
        # take meta and data in turn rather than copying them together.
        seed = zlib.crc32(_EPOCH.pack(epoch))
        crc32, pack = zlib.crc32, _HEAD.pack
        parts = []
        for write in writes:
            meta = f"{write[0]} {write[1]} {write[2]}".encode("ascii")
            data = write[3]
            parts.append(pack(len(meta) + len(data), crc32(data, crc32(meta, seed)), epoch) + meta)
            parts.append(data)
        blob = b"".join(parts)
        try:
            self._reserve(slot, slot.size + len(blob))
            write_all_at(slot.fd, blob, slot.size)
            if self._sync:
                os.fdatasync(slot.fd)
        except OSError:
            # A replay must not find these frames: their writes were refused.
            with contextlib.suppress(OSError):
                os.pwrite(slot.fd, bytes(_HEAD.size), slot.size)
            raise
        slot.size += len(blob)
        slot.pending = True
        slot.allocated = max(slot.allocated, slot.size)

    def switch(self) -> int | None:
        """Send new appends to the other file; return the one to checkpoint,
        or None when the other still waits for its own checkpoint."""
        other = 1 - self._active
        if self._slots[other].pending:
            return None
        old, self._active = self._active, other
        return old

    def checkpointed(self, index: int) -> None:
        """Every write the file `index` describes is synced: forget them."""
        self._reset(self._slots[index])

    def _reserve(self, slot: _Slot, end: int) -> None:
        """Zero-fill ahead, so appends overwrite blocks that already exist."""
        if end <= slot.allocated:
            return
        grown = (end // GROW_BYTES + 1) * GROW_BYTES
        try:
            write_all_at(slot.fd, bytes(grown - slot.allocated), slot.allocated)
            os.fsync(slot.fd)
        except OSError:
            # No room to zero-fill (a full disk): give back what was filled
            # and append as a plain write, which finds out if there is room.
            os.ftruncate(slot.fd, slot.allocated)
            return
        slot.allocated = grown

    def _reset(self, slot: _Slot) -> None:
        """A fresh marker with a new, higher epoch: replay skips what follows."""
        self._epoch = (self._epoch + 1) & 0xFFFFFFFF
        slot.epoch = self._epoch
        marker = Frame(MARKER_PATH, 0, None, 0.0, b"").encode(slot.epoch)
        self._reserve(slot, len(marker))
        write_all_at(slot.fd, marker, 0)
        if self._sync:
            os.fdatasync(slot.fd)
        slot.size = len(marker)
        slot.pending = False
        slot.allocated = max(slot.allocated, slot.size)

    def close(self) -> None:
        for slot in self._slots:
            os.close(slot.fd)


def log_names(shard: int | None) -> tuple[str, str]:
    """The pair of log files of one process (None) or of one storage shard."""
    return WAL_NAMES if shard is None else (f"{WAL_NAME}.s{shard}", f"{WAL_NAME}.s{shard}.1")


def all_log_names(data_dir: Path) -> list[str]:
    """Every log file in the data dir, whichever mode and shard wrote it."""
    try:
        names = os.listdir(data_dir)
    except FileNotFoundError:
        return []
    return sorted(name for name in names if _ANY_LOG.fullmatch(name))


def read_log(data_dir: Path, names: Iterable[str] | None = None) -> tuple[int, list[Frame]]:
    """The newest epoch (0 when there is no log) and every frame to replay,
    oldest log file first; of the files `names`, by default every log file.

    Files of different shards hold different devices, so their order among
    each other does not matter; a shard's two files are in epoch order."""
    logs = []
    for name in all_log_names(data_dir) if names is None else names:
        try:
            blob = (data_dir / name).read_bytes()
        except FileNotFoundError:
            continue
        epoch, frames, _ = decode_frames(blob)
        if epoch is not None:
            logs.append((epoch, frames))
    logs.sort(key=lambda log: log[0])
    frames = [frame for _, log_frames in logs for frame in log_frames]
    return (logs[-1][0] if logs else 0), frames


def write_all(fd: int, data: bytes) -> None:
    # One call when the write is whole, as it nearly always is; a view (and
    # a loop) only for what a short write left.
    if not data:
        return
    written = os.write(fd, data)
    if written == len(data):
        return
    view = memoryview(data)[written:]
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_all_at(fd: int, data: bytes, offset: int) -> None:
    if not data:
        return
    written = os.pwrite(fd, data, offset)
    if written == len(data):
        return
    view = memoryview(data)[written:]
    offset += written
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
