"""Pure rotation policy: which file a record goes to, and what it is called.

Names sort in time order with a plain byte sort (`ls`, `sorted()`):
`2026-11-21.csv`, then `2026-11-21_0001.csv`, `2026-11-21_0002.csv`, ...
(`_` sorts after `.`), then `2026-11-22.csv`. Hourly files are
`2026-11-21T13.csv`. A compressed closed file adds `.gz`.

Also across a change of `rotate_period`: within a day, `.` < `T` < `_`, so
the day's first file sorts before its hourly files and its later sequence
after them. A switch from hour to day therefore goes on in `<day>_0001`,
and a switch from day to hour keeps the day's file until the day ends
(an hourly file would sort before the day's `_0001`, `_0002`, ...).
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass
from typing import Literal

from ingestd.protocols.registry import PROTOCOLS

Period = Literal["day", "hour"]

_NAME = re.compile(
    r"(?P<period>\d{4}-\d{2}-\d{2}(?:T\d{2})?)(?:_(?P<seq>\d{4,}))?\.(?P<ext>[a-z0-9]{1,16})"
)


def period_of(ts: float, period: Period) -> str:
    """The UTC day (`2026-11-21`) or hour (`2026-11-21T13`) of a timestamp."""
    return _period_of_hour(int(ts // 3600), period)


@functools.lru_cache(maxsize=256)
def _period_of_hour(hour: int, period: Period) -> str:
    # Cached per hour: every record of a batch asks, and strftime is slow.
    fmt = "%Y-%m-%d" if period == "day" else "%Y-%m-%dT%H"
    return time.strftime(fmt, time.gmtime(hour * 3600))


def file_name(period: str, seq: int, ext: str) -> str:
    return f"{period}.{ext}" if seq == 0 else f"{period}_{seq:04d}.{ext}"


@dataclass(frozen=True, slots=True)
class FileName:
    period: str
    seq: int
    ext: str

    @property
    def name(self) -> str:
        return file_name(self.period, self.seq, self.ext)

    @property
    def sort_key(self) -> tuple[str, int, str, int]:
        """The order of the names' byte sort, also past `_9999`: the day's
        first file, its hours, then the day's later sequence."""
        day, hour = self.period[:10], self.period[10:]
        if hour:
            return (day, 1, hour, self.seq)
        return (day, 2 if self.seq else 0, "", self.seq)


def parse_file_name(name: str) -> FileName | None:
    """A name this policy made (not compressed), or None for anything else:
    the extension is a registered protocol's."""
    match = _NAME.fullmatch(name)
    if not match:
        return None
    ext = match["ext"]
    if not any(protocol.ext == ext for protocol in PROTOCOLS.values()):
        return None
    return FileName(match["period"], int(match["seq"] or 0), ext)


@dataclass(frozen=True, slots=True)
class OpenFile:
    """What the policy needs to know about a device's current file."""

    name: FileName
    size: int
    header: bytes


def next_file(
    current: OpenFile | None,
    *,
    record_period: str,
    header: bytes,
    add_bytes: int,
    max_file_bytes: int,
    ext: str,
) -> FileName | None:
    """None to append to `current`, else the name of the file to start.

    A new file starts for a later period, a different CSV header, or when the
    append would pass `max_file_bytes` (a block larger than that still goes,
    whole, into a file of its own). A record whose period is earlier than the
    current file's (the clock stepped back) is appended: a file that has been
    rotated away from is never written again. Across a change of period
    (hour and day), see the module's docstring.
    """
    if current is None:
        return FileName(record_period, 0, ext)
    current_period = current.name.period
    if len(record_period) < len(current_period) and current_period.startswith(record_period):
        # The record's day holds the current file's hour (hour -> day): the
        # day's next sequence sorts after the hour's files; `<day>.csv`
        # would not. (The device's folder skips past names taken already.)
        return FileName(record_period, 1, ext)
    # A day and an hour of it: neither is later (day -> hour: the day's file
    # goes on until the day ends).
    later_period = record_period[:10] > current_period[:10] or (
        len(record_period) == len(current_period) and record_period > current_period
    )
    if current.size == 0 and not later_period:
        return None  # an empty file takes any header
    header_changed = header != current.header
    too_big = current.size > len(current.header) and current.size + add_bytes > max_file_bytes
    if not (later_period or header_changed or too_big):
        return None
    if later_period:
        return FileName(record_period, 0, ext)
    return FileName(current.name.period, current.name.seq + 1, ext)
