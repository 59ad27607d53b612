"""Write-ahead log: one append and one fdatasync per batch, for all devices.

Every write to a device file is first framed here. After a crash, replaying
the frames puts each acknowledged block back at its offset; the device files
themselves are fsynced only at checkpoints, after which the log starts empty.

Frame: 4-byte big-endian length of meta + data, 4-byte CRC32 of them, then
`meta` (one ASCII line) and the data bytes. A frame cut short by a crash
fails its length or CRC check and ends the replay: it was never acknowledged.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_HEAD = struct.Struct(">II")
WAL_NAME = ".ingestd-wal"


@dataclass(frozen=True, slots=True)
class Frame:
    relpath: str  # protocol/device/file, relative to the data directory
    offset: int
    key: str | None
    received_at: float
    data: bytes

    def encode(self) -> bytes:
        meta = f"{self.relpath} {self.offset} {self.key or '-'} {self.received_at:.3f}\n"
        body = meta.encode("ascii") + self.data
        return _HEAD.pack(len(body), zlib.crc32(body)) + body


def decode_frames(blob: bytes) -> tuple[list[Frame], int]:
    """Whole frames from the start of `blob`, and the length they span."""
    frames = []
    pos = 0
    while pos + _HEAD.size <= len(blob):
        length, crc = _HEAD.unpack_from(blob, pos)
        body = blob[pos + _HEAD.size : pos + _HEAD.size + length]
        if len(body) != length or zlib.crc32(body) != crc:
            break
        meta, _, data = body.partition(b"\n")
        try:
            relpath, offset, key, ts = meta.decode("ascii").split(" ")
            frame = Frame(relpath, int(offset), None if key == "-" else key, float(ts), data)
        except ValueError:
            break
        frames.append(frame)
        pos += _HEAD.size + length
    return frames, pos


class WriteAheadLog:
    """The log file of one writer. Blocking: call from the writer thread."""

    def __init__(self, data_dir: Path, *, sync: bool) -> None:
        self.path = data_dir / WAL_NAME
        self._sync = sync
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.size = os.fstat(self._fd).st_size

    def append(self, frames: list[Frame]) -> None:
        """Make `frames` durable (with sync on), or leave no trace of them."""
        blob = b"".join(frame.encode() for frame in frames)
        try:
            write_all(self._fd, blob)
            if self._sync:
                os.fdatasync(self._fd)
        except OSError:
            os.ftruncate(self._fd, self.size)
            raise
        self.size += len(blob)

    def reset(self) -> None:
        """Forget every frame: call once everything they describe is synced."""
        os.ftruncate(self._fd, 0)
        if self._sync:
            os.fsync(self._fd)
        self.size = 0

    def close(self) -> None:
        os.close(self._fd)


def read_frames(data_dir: Path) -> Iterator[Frame]:
    path = data_dir / WAL_NAME
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        return
    frames, _ = decode_frames(blob)
    yield from frames


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
