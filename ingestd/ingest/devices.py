"""What the daemon knows of each device or stream it has heard from.

Kept small (slots, no per-device containers but one 96-byte array): a fleet
of 100,000 devices must fit in memory many times over. Live state comes from
the pipeline (`on_result`); what was on disk before the start comes from
`scan_data_dir`, merged in by `merge_scan` (live state wins).
"""

from __future__ import annotations

import calendar
import functools
import os
import re
import threading
import time
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import repeat
from pathlib import Path

from ingestd.errors import IngestError
from ingestd.protocols.registry import PROTOCOLS
from ingestd.records import Outcome, Quarantined, Record
from ingestd.sinks.file import quarantine
from ingestd.sinks.file.device import FIRST_SEEN_NAME, read_first_seen
from ingestd.sinks.file.rotation import FileName, parse_file_name

HOURS = 24  # hourly buckets of rows kept per device
RECENT_ERRORS = 10  # refused requests remembered per device, for its page
WINDOW_SECS = 60  # rows per minute: the last 60 one-second buckets, fleet-wide
_MAX_COUNT = 0xFFFFFFFF  # array('I') holds 32 bits


class DeviceStats:
    __slots__ = (
        "blocks",
        "bytes",
        "current_file",
        "duplicates",
        "first_seen",
        "hour",
        "hourly",
        "last_seen",
        "quarantined",
        "recent_errors",
        "rows",
    )

    @property
    def last_error(self) -> str | None:
        return self.recent_errors[-1][1] if self.recent_errors else None

    @property
    def last_error_at(self) -> float | None:
        return self.recent_errors[-1][0] if self.recent_errors else None

    def __init__(self, now: float) -> None:
        self.first_seen = now
        self.last_seen = now
        self.blocks = 0
        # A block or document stored counts once in `blocks`; its rows (CSV
        # rows, or 1 for a document: the lines of its file) in `rows`.
        self.rows = 0
        self.bytes = 0
        self.duplicates = 0
        self.quarantined = 0
        # (time, error code) of the last refused requests, newest last;
        # codes only, never client text. None until the first refusal, so
        # a fleet that is never refused pays nothing for it (a list: a
        # deque's first block alone is ~600 bytes).
        self.recent_errors: list[tuple[float, str]] | None = None
        # The newest known data file, relative to the data dir (scan, or the
        # writer's while the device was open).
        self.current_file: str | None = None
        # Records per UTC hour, a ring indexed by hour % 24; `hour` is the
        # newest bucket's hour (Unix seconds // 3600). None until a record.
        self.hourly: array[int] | None = None
        self.hour = 0

    def count(self, ts: float, rows: int) -> None:
        """Add `rows` stored at `ts` to its hourly bucket."""
        hour = int(ts // 3600)
        buckets = self.hourly
        if buckets is None:
            buckets = self.hourly = array("I", bytes(4 * HOURS))
            self.hour = hour
        elif hour > self.hour:
            # Empty the buckets of the hours skipped over (24 at most).
            for skipped in range(self.hour + 1, min(hour, self.hour + HOURS) + 1):
                buckets[skipped % HOURS] = 0
            self.hour = hour
        elif hour <= self.hour - HOURS:
            return  # older than the window (a clock step back)
        i = hour % HOURS
        buckets[i] = min(buckets[i] + rows, _MAX_COUNT)

    def hourly_rows(self, now: float) -> list[int]:
        """Rows per hour for the 24 hours up to `now`'s, oldest first."""
        buckets = self.hourly
        age = int(now // 3600) - self.hour  # hours since the newest bucket's
        if buckets is None or not -HOURS < age < HOURS:
            return [0] * HOURS
        start = (self.hour + 1) % HOURS
        ordered = buckets[start:].tolist() + buckets[:start].tolist()  # newest last
        if age > 0:
            return ordered[age:] + [0] * age
        if age < 0:  # the clock went back: `now` is before the newest bucket
            return [0] * -age + ordered[:age]
        return ordered


@dataclass(frozen=True, slots=True)
class ScannedDevice:
    """What the data directory tells of a device, without reading a data file."""

    protocol: str
    device_id: str
    first_seen: float
    last_seen: float
    current_file: str | None  # relative to the data dir
    quarantined: int


class DeviceRegistry:
    def __init__(self) -> None:
        self._devices: dict[tuple[str, str], DeviceStats] = {}
        # Fleet-wide rows per second, a ring of WINDOW_SECS buckets.
        self._recent = array("I", bytes(4 * WINDOW_SECS))
        self._second = 0
        # Set by the fleet view's start-up context. The scan of the data dir:
        # "none" (not started), "running", "done" or "failed".
        self.started_at: float | None = None
        self.scan = "none"

    def __len__(self) -> int:
        return len(self._devices)

    def __iter__(self) -> Iterator[tuple[tuple[str, str], DeviceStats]]:
        return iter(self._devices.items())

    def get(self, protocol: str, device_id: str) -> DeviceStats | None:
        return self._devices.get((protocol, device_id))

    def _stats(self, protocol: str, device_id: str, now: float) -> DeviceStats:
        stats = self._devices.get((protocol, device_id))
        if stats is None:
            stats = self._devices[(protocol, device_id)] = DeviceStats(now)
        return stats

    def on_result(self, item: Record | Quarantined, result: Outcome | IngestError) -> None:
        """Called by the pipeline once per stored, refused or duplicate item."""
        outcome = result.code if isinstance(result, IngestError) else result.value
        if isinstance(item, Record):
            self.count_result(
                item.protocol,
                item.device_id,
                item.received_at,
                outcome,
                item.count,
                len(item.payload),
            )
        else:
            self.count_result(item.protocol, item.device_id, item.received_at, outcome, 0, 0)

    def count_result(
        self, protocol: str, device_id: str, at: float, outcome: str, rows: int, size: int
    ) -> None:
        """One item's result: an `Outcome` value, or the refusal's error code
        (a worker's results reach the main process in this plain form)."""
        stats = self._stats(protocol, device_id, at)
        stats.last_seen = max(stats.last_seen, at)
        if outcome == "stored":
            stats.blocks += 1
            stats.rows += rows
            stats.bytes += size
            stats.count(at, rows)
            self._count_recent(at, rows)
        elif outcome == "duplicate":
            stats.duplicates += 1
        elif outcome == "quarantined":
            stats.quarantined += 1
        else:
            self.on_error(protocol, device_id, outcome, at)

    def on_error(self, protocol: str, device_id: str, code: str, now: float) -> None:
        stats = self._stats(protocol, device_id, now)
        stats.last_seen = max(stats.last_seen, now)
        if stats.recent_errors is None:
            stats.recent_errors = []
        elif len(stats.recent_errors) >= RECENT_ERRORS:
            del stats.recent_errors[0]
        stats.recent_errors.append((now, code))

    def _count_recent(self, ts: float, rows: int) -> None:
        second = int(ts)
        recent = self._recent
        if second > self._second:
            for skipped in range(self._second + 1, min(second, self._second + WINDOW_SECS) + 1):
                recent[skipped % WINDOW_SECS] = 0
            self._second = second
        elif second <= self._second - WINDOW_SECS:
            return
        i = second % WINDOW_SECS
        recent[i] = min(recent[i] + rows, _MAX_COUNT)

    def rows_per_minute(self, now: float) -> int:
        """Rows stored fleet-wide in the 60 seconds up to `now`."""
        now_second = int(now)
        newest = self._second
        return sum(
            self._recent[s % WINDOW_SECS]
            for s in range(now_second - WINDOW_SECS + 1, now_second + 1)
            if newest - WINDOW_SECS < s <= newest
        )

    def merge_scan(self, found: list[ScannedDevice]) -> None:
        """Add what the start-up scan found; live state wins where both know."""
        devices = self._devices
        for entry in found:
            key = (entry.protocol, entry.device_id)
            stats = devices.get(key)
            if stats is None:
                stats = devices[key] = DeviceStats(entry.first_seen)
                stats.last_seen = entry.last_seen
                stats.current_file = entry.current_file
                stats.quarantined = entry.quarantined
                continue
            stats.first_seen = min(stats.first_seen, entry.first_seen)
            stats.last_seen = max(stats.last_seen, entry.last_seen)
            if stats.current_file is None:
                stats.current_file = entry.current_file
            # The scan's count includes blocks quarantined before it; the
            # live count those since the start.
            stats.quarantined = max(stats.quarantined, entry.quarantined)


def scan_data_dir(data_dir: Path, stop: threading.Event | None = None) -> list[ScannedDevice]:
    """Every device and stream with a folder under `data_dir` (blocking).

    One directory listing per device folder, one stat (the newest file's
    mtime) and one small read (the device's first-seen time); no data file
    is opened. Names that are not device ids or data files are skipped.
    `stop` set ends the scan early with what it found so far.
    """
    found: list[ScannedDevice] = []
    for protocol, form in PROTOCOLS.items():
        pattern, ext = form.device_id, form.ext
        kept = str(quarantine.protocol_folder(data_dir, protocol))
        quarantined = _quarantine_counts(kept, pattern, stop) if form.quarantines else {}
        seen: set[str] = set()
        for device_id, folder in _subdirs(os.path.join(data_dir, protocol), pattern):
            if stop is not None and stop.is_set():
                return found
            entry = _scan_device(protocol, device_id, folder, ext)
            if entry is None:
                continue
            seen.add(device_id)
            count = quarantined.get(device_id, 0)
            found.append(ScannedDevice(protocol, device_id, *entry, count))
        if quarantined:
            # Devices whose every block so far went to quarantine.
            for device_id, count in quarantined.items():
                if device_id in seen:
                    continue
                try:
                    mtime = os.stat(os.path.join(kept, device_id)).st_mtime
                except OSError:
                    continue
                found.append(ScannedDevice(protocol, device_id, mtime, mtime, None, count))
    return found


# Plain str paths: pathlib would double the cost of a scan.
def _subdirs(parent: str, pattern: re.Pattern[str]) -> Iterator[tuple[str, str]]:
    try:
        listing = os.scandir(parent)
    except OSError:
        return
    with listing:  # read as we go: 100,000 entries need not sit in a list
        for entry in listing:
            if pattern.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
                yield entry.name, entry.path


def _scan_device(
    protocol: str, device_id: str, folder: str, ext: str
) -> tuple[float, float, str | None] | None:
    """(first seen, last seen, current file) of one device folder, or None."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return None
    # Names sort in time order (also with `.gz`), so only the ends of the
    # sorted listing are parsed: a year of daily files costs a sort in C.
    oldest = next((p for p in map(_data_file, names, repeat(ext)) if p is not None), None)
    newest: str | None = None
    current: str | None = None
    for name in reversed(names):
        if _data_file(name, ext) is None:
            continue
        newest = newest or name
        if not name.endswith(".gz"):
            current = name
            break
    if oldest is None or newest is None:
        return None
    try:
        last_seen = os.stat(os.path.join(folder, newest)).st_mtime
    except OSError:
        return None
    # Written with the device's first file; folders from before it existed
    # get the start of their oldest file's period.
    first_seen = read_first_seen(folder) if FIRST_SEEN_NAME in names else None
    if first_seen is None:
        first_seen = _period_start(oldest.period)
    first_seen = last_seen if first_seen is None else min(first_seen, last_seen)
    return first_seen, last_seen, None if current is None else f"{protocol}/{device_id}/{current}"


def _data_file(name: str, ext: str) -> FileName | None:
    parsed = parse_file_name(name[:-3] if name.endswith(".gz") else name)
    return parsed if parsed is not None and parsed.ext == ext else None


@functools.lru_cache(maxsize=1024)
def _period_start(period: str) -> float | None:
    """`2026-11-21` or `2026-11-21T08` (UTC) to Unix seconds."""
    fmt = "%Y-%m-%dT%H" if "T" in period else "%Y-%m-%d"
    try:
        return float(calendar.timegm(time.strptime(period, fmt)))
    except ValueError:  # matches the name pattern, yet no date (month 13)
        return None


def _quarantine_counts(
    parent: str, pattern: re.Pattern[str], stop: threading.Event | None
) -> dict[str, int]:
    """Quarantined blocks per device: the `<md5>.csv` files of each folder."""
    counts: dict[str, int] = {}
    for device_id, folder in _subdirs(parent, pattern):
        if stop is not None and stop.is_set():
            break
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        count = quarantine.count_blocks(names)
        if count:
            counts[device_id] = count
    return counts
