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

import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

_HEAD = struct.Struct(">III")
_EPOCH = struct.Struct(">I")
WAL_NAME = ".ingestd-wal"
MARKER_PATH = "."
GROW_BYTES = 1024 * 1024


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


class WriteAheadLog:
    """The log file of one writer. Blocking: call from the writer thread."""

    def __init__(self, data_dir: Path, *, sync: bool, epoch: int) -> None:
        self.path = data_dir / WAL_NAME
        self._sync = sync
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self._allocated = os.fstat(self._fd).st_size
        self.epoch = epoch
        self.size = 0
        self.reset()

    def append(self, frames: list[Frame]) -> None:
        """Make `frames` durable (with sync on), or leave no trace of them."""
        blob = b"".join(frame.encode(self.epoch) for frame in frames)
        try:
            self._reserve(self.size + len(blob))
            write_all_at(self._fd, blob, self.size)
            if self._sync:
                os.fdatasync(self._fd)
        except OSError:
            # A replay must not find these frames: their writes were refused.
            try:
                os.pwrite(self._fd, bytes(_HEAD.size), self.size)
            except OSError:
                pass
            raise
        self.size += len(blob)
        self._allocated = max(self._allocated, self.size)

    def _reserve(self, end: int) -> None:
        """Zero-fill ahead, so appends overwrite blocks that already exist."""
        if end <= self._allocated:
            return
        grown = (end // GROW_BYTES + 1) * GROW_BYTES
        try:
            write_all_at(self._fd, bytes(grown - self._allocated), self._allocated)
            os.fsync(self._fd)
        except OSError:
            # No room to zero-fill (a full disk): give back what was filled
            # and append as a plain write, which finds out if there is room.
            os.ftruncate(self._fd, self._allocated)
            return
        self._allocated = grown

    def reset(self) -> None:
        """Start over: call once everything the frames describe is synced."""
        self.epoch = (self.epoch + 1) & 0xFFFFFFFF
        marker = Frame(MARKER_PATH, 0, None, 0.0, b"").encode(self.epoch)
        self._reserve(len(marker))
        write_all_at(self._fd, marker, 0)
        if self._sync:
            os.fdatasync(self._fd)
        self.size = len(marker)
        self._allocated = max(self._allocated, self.size)

    def close(self) -> None:
        os.close(self._fd)


def read_log(data_dir: Path) -> tuple[int, list[Frame]]:
    """The epoch (0 when there is no log) and the frames to replay."""
    try:
        blob = (data_dir / WAL_NAME).read_bytes()
    except FileNotFoundError:
        return 0, []
    epoch, frames, _ = decode_frames(blob)
    return epoch or 0, frames


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def write_all_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written

