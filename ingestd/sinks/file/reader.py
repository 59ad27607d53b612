"""Read one device's stored records back, in order, read-only (blocking).

Follows the file sink's documented layout (README, "Storage layout"):
`<data_dir>/<protocol>/<device id>/<period>[_<seq>].<ext>[.gz]`, names
sorting in time order. How a protocol's lines read is its `stored_as`
(ingestd.protocols.base): a CSV file (Wattmon) starts with its one header
line and each row's first column is its time; a JSON Lines file holds one
`{"received_at": ..., ...}` line per post; plain text lines are timed by
their file's period.

Everything here blocks (it opens files): callers run it in a thread. Rows
are yielded as they are read, so no history is ever held whole.

The newest file may be growing (the writer thread appends to it): a file is
read up to its size when opened, and only whole lines (ending in `\\n`).
Housekeeping may gzip a closed file meanwhile (`x.csv` becomes `x.csv.gz`,
the `.csv` removed once the `.gz` is whole), or retention delete it: a file
that vanished is looked for as `.gz`, then skipped.
"""

from __future__ import annotations

import calendar
import functools
import gzip
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ingestd.protocols.base import StoredAs
from ingestd.protocols.registry import PROTOCOLS
from ingestd.protocols.registry import valid_id as valid_id
from ingestd.sinks.file.rotation import parse_file_name

READ_BYTES = 1024 * 1024
TAIL_BYTES = 64 * 1024  # enough for a device's last row
# A row's own timestamp may precede the file it was stored in by this much
# (a device sending its backlog): files received up to a day after the
# range are read too, and their rows selected by their own time.
LATE_ROWS_SECS = 86400.0


class UnknownDevice(LookupError):
    """No folder for this device under the data directory."""


def device_folder(data_dir: Path | str, protocol: str, device_id: str) -> Path:
    if not valid_id(protocol, device_id):
        raise ValueError("not a device id")
    return Path(data_dir) / protocol / device_id


@dataclass(frozen=True, slots=True)
class StoredFile:
    """One data file of a device, as listed (its size may have grown since)."""

    name: str  # on disk, e.g. `2026-11-21_0001.csv.gz`
    period: str  # `2026-11-21` or `2026-11-21T08`
    seq: int
    compressed: bool
    size: int
    mtime: float
    start: float  # the period's first second (Unix, UTC)
    end: float  # the next period's first second

    @property
    def plain_name(self) -> str:
        return self.name[:-3] if self.compressed else self.name


def list_files(data_dir: Path | str, protocol: str, device_id: str) -> list[StoredFile]:
    """The device's data files, oldest first; UnknownDevice without a folder."""
    folder = device_folder(data_dir, protocol, device_id)
    ext = PROTOCOLS[protocol].ext
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        raise UnknownDevice(device_id) from None
    found: dict[str, StoredFile] = {}
    for entry in entries:
        compressed = entry.name.endswith(".gz")
        parsed = parse_file_name(entry.name[:-3] if compressed else entry.name)
        if parsed is None or parsed.ext != ext:
            continue
        bounds = period_bounds(parsed.period)
        if bounds is None:
            continue
        try:
            stat = entry.stat(follow_symlinks=False)
        except OSError:
            continue  # gone since the listing
        if not entry.is_file(follow_symlinks=False):
            continue
        stored = StoredFile(
            entry.name, parsed.period, parsed.seq, compressed, stat.st_size, stat.st_mtime, *bounds
        )
        # Both `x.csv` and `x.csv.gz` while housekeeping finishes: the .gz is
        # whole once it has its name, so it wins.
        if compressed or parsed.name not in found:
            found[parsed.name] = stored
    return [found[name] for name in sorted(found)]


@functools.lru_cache(maxsize=4096)
def period_bounds(period: str) -> tuple[float, float] | None:
    """`2026-11-21` or `2026-11-21T08` to its [start, end) in Unix seconds."""
    match = re.fullmatch(r"(\d{4})-(\d{2})-(\d{2})(?:T(\d{2}))?", period)
    if match is None:
        return None
    year, month, day = int(match[1]), int(match[2]), int(match[3])
    if not (1 <= month <= 12 and 1 <= day <= calendar.monthrange(year, month)[1]):
        return None
    start = float(calendar.timegm((year, month, day, 0, 0, 0)))
    if match[4] is None:
        return start, start + 86400.0
    hour = int(match[4])
    if hour > 23:
        return None
    return start + hour * 3600.0, start + hour * 3600.0 + 3600.0


def files_in_range(
    files: list[StoredFile], start: float | None, end: float | None, late_secs: float = 0.0
) -> list[StoredFile]:
    """The files whose period overlaps [start, end), and those received up
    to `late_secs` after it (their rows may carry earlier times)."""
    return [
        f
        for f in files
        if (start is None or f.end > start) and (end is None or f.start < end + late_secs)
    ]


# -- lines ---------------------------------------------------------------------------


def _open(folder: Path, stored: StoredFile) -> tuple[BinaryIO, bool] | None:
    """The file opened for reading, and whether it is gzipped; None if gone."""
    names = [stored.name] if stored.compressed else [stored.name, stored.name + ".gz"]
    for name in names:
        try:
            fh = open(folder / name, "rb")  # noqa: SIM115 - closed by the caller
        except FileNotFoundError:
            continue
        return fh, name.endswith(".gz")
    return None


def read_lines(folder: Path, stored: StoredFile) -> Iterator[bytes]:
    """The file's whole lines, without their `\\n`; nothing if it is gone."""
    opened = _open(folder, stored)
    if opened is None:
        return
    raw, compressed = opened
    with raw:
        if compressed:
            with gzip.GzipFile(fileobj=raw, mode="rb") as gz:
                yield from _split(gz, None)
        else:
            # Up to the size at open: the writer may be appending past it.
            yield from _split(raw, os.fstat(raw.fileno()).st_size)


def _split(fh: BinaryIO | gzip.GzipFile, size: int | None) -> Iterator[bytes]:
    rest = b""
    left = size
    while left is None or left > 0:
        chunk = fh.read(READ_BYTES if left is None else min(READ_BYTES, left))
        if not chunk:
            break
        if left is not None:
            left -= len(chunk)
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()  # not yet ended: kept for the next chunk, or dropped
        yield from (line for line in lines if line)


def first_line(folder: Path, stored: StoredFile) -> bytes | None:
    """A file's first whole line (a CSV file's header)."""
    return next(read_lines(folder, stored), None)


def last_line(folder: Path, stored: StoredFile) -> bytes | None:
    """A file's last whole line, reading only its tail when not gzipped."""
    opened = _open(folder, stored)
    if opened is None:
        return None
    raw, compressed = opened
    if compressed:
        raw.close()
        last = None
        for last in read_lines(folder, stored):  # noqa: B007 - the last one is wanted
            pass
        return last
    with raw:
        size = os.fstat(raw.fileno()).st_size
        start = max(0, size - TAIL_BYTES)
        raw.seek(start)
        tail = raw.read(size - start)
    end = tail.rfind(b"\n")
    if end < 0:
        return None
    lines = [line for line in tail[:end].split(b"\n") if line]
    if not lines or (start > 0 and len(lines) == 1 and tail.find(b"\n") == end):
        return None  # one line longer than the tail read: not a row to show
    return lines[-1]


# -- records -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """One row (CSV, with its file's header), stored JSON line or text line."""

    header: bytes  # the CSV file's header line; b"" for the others
    line: bytes
    time: float | None  # a CSV row's own time, a JSON line's received_at
    file: StoredFile


def records(
    data_dir: Path | str,
    protocol: str,
    device_id: str,
    files: Iterable[StoredFile],
    start: float | None = None,
    end: float | None = None,
) -> Iterator[StoredRecord]:
    """The records of `files` in stored order, selected by time: a record is
    in [start, end) by its own time when it has one, else by its file's
    period (overlapping the range)."""
    folder = device_folder(data_dir, protocol, device_id)
    form = PROTOCOLS[protocol]
    time_of = TIME_OF[form.stored_as]
    for stored in files:
        file_in_range = (start is None or stored.end > start) and (
            end is None or stored.start < end
        )
        lines = read_lines(folder, stored)
        header = next(lines, b"") if form.has_header else b""
        for line in lines:
            ts = time_of(line)
            if ts is None:
                if not file_in_range:
                    continue
            elif (start is not None and ts < start) or (end is not None and ts >= end):
                continue
            yield StoredRecord(header, line, ts, stored)


# -- times ---------------------------------------------------------------------------

_ISO = re.compile(
    rb'"?(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2})(?::(\d{2})(\.\d{1,9})?)?'
    rb'(Z|[+-]\d{2}:?\d{2})?"?',
    re.ASCII,
)
_UNIX = re.compile(rb'"?(\d{9,10}(?:\.\d{1,9})?|\d{12,13})"?', re.ASCII)


@functools.lru_cache(maxsize=4096)
def _day(year: int, month: int, day: int) -> float | None:
    if not (1 <= month <= 12 and 1 <= day <= calendar.monthrange(year, month)[1]):
        return None
    return float(calendar.timegm((year, month, day, 0, 0, 0)))


def parse_time(text: bytes) -> float | None:
    """`2026-11-21 08:00:00` / RFC 3339 (no zone: UTC) or Unix seconds (or
    milliseconds) to Unix seconds; None for anything else."""
    match = _ISO.fullmatch(text)
    if match is not None:
        day = _day(int(match[1]), int(match[2]), int(match[3]))
        hour, minute = int(match[4]), int(match[5])
        if day is None or hour > 23 or minute > 59:
            return None
        ts = day + hour * 3600 + minute * 60 + int(match[6] or 0) + float(match[7] or 0)
        zone = match[8]
        if zone and zone != b"Z":
            sign = -1 if zone[:1] == b"-" else 1
            digits = zone[1:].replace(b":", b"")
            ts -= sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
        return ts
    match = _UNIX.fullmatch(text)
    if match is not None:
        value = float(match[1])
        return value / 1000 if len(match[1]) >= 12 else value
    return None


def row_time(line: bytes) -> float | None:
    """A CSV row's first column as a time, if it is one."""
    comma = line.find(b",")
    return parse_time((line if comma < 0 else line[:comma]).strip())


# The sink writes `received_at` first, compact; a space after the colon is
# accepted too (the README's example shows one).
_RECEIVED_PREFIXES = (b'{"received_at":"', b'{"received_at": "')


def received_at(line: bytes) -> float | None:
    """A stored JSON line's `received_at`."""
    for prefix in _RECEIVED_PREFIXES:
        if line.startswith(prefix):
            close = line.find(b'"', len(prefix))
            return parse_time(line[len(prefix) : close]) if close > 0 else None
    return None


def no_time(line: bytes) -> float | None:
    """A text line carries no time of its own."""
    return None


# A stored line's own time, by the shape of its protocol's lines.
TIME_OF = {StoredAs.CSV: row_time, StoredAs.JSON_LINES: received_at, StoredAs.TEXT: no_time}


def late_secs(protocol: str) -> float:
    """How long after a file's period its records may be timed before it:
    a CSV row carries the device's time (a backlog sent late), the others
    the time they were received."""
    return LATE_ROWS_SECS if PROTOCOLS[protocol].stored_as is StoredAs.CSV else 0.0
