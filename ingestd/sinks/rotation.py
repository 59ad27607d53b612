"""Pure rotation policy: which file a record goes to, and what it is called.

Names sort in time order with a plain byte sort (`ls`, `sorted()`):
`2026-11-21.csv`, then `2026-11-21_0001.csv`, `2026-11-21_0002.csv`, ...
(`_` sorts after `.`), then `2026-11-22.csv`. Hourly files are
`2026-11-21T13.csv`. A compressed closed file adds `.gz`.
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass
from typing import Literal

Period = Literal["day", "hour"]

_NAME = re.compile(
    r"(?P<period>\d{4}-\d{2}-\d{2}(?:T\d{2})?)(?:_(?P<seq>\d{4,}))?\.(?P<ext>csv|jsonl)"
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


def parse_file_name(name: str) -> FileName | None:
    """A name this policy made (not compressed), or None for anything else."""
    match = _NAME.fullmatch(name)
    if not match:
        return None
    return FileName(match["period"], int(match["seq"] or 0), match["ext"])


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
    rotated away from is never written again.
    """
    if current is None:
        return FileName(record_period, 0, ext)
    later_period = record_period > current.name.period
    if current.size == 0 and not later_period:
        return None  # an empty file takes any header
    header_changed = header != current.header
    too_big = current.size > len(current.header) and current.size + add_bytes > max_file_bytes
    if not (later_period or header_changed or too_big):
        return None
    if later_period:
        return FileName(record_period, 0, ext)
    return FileName(current.name.period, current.name.seq + 1, ext)
