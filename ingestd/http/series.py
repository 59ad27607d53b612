"""A device's stored records as numeric series and latest values (pure).

By the shape of the protocol's stored lines (`StoredAs`). CSV (Wattmon):
every column whose cells are numbers (at least half of those not empty,
within one header section) is a series, plotted at the row's own time; rows
without a time are left off the chart. JSON Lines: every numeric leaf of the
document (`a.b.c`, at most `MAX_DEPTH` deep), at `received_at`. Text: no
series; the latest line as it is.
"""

from __future__ import annotations

import csv
import math
import operator
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import orjson

from ingestd.http.downsample import Point, min_max
from ingestd.http.record_formats import cells
from ingestd.protocols.base import StoredAs
from ingestd.sinks.file.reader import StoredRecord

MAX_SERIES = 40  # columns charted at most (the first ones)
MAX_DEPTH = 4
MAX_VALUES = 200  # cells shown in the latest-values table at most


@dataclass(slots=True)
class Series:
    times: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


def _numbers(column: Sequence[str]) -> list[float | None] | None:
    """The column as numbers (None where a cell is not one), or None when
    fewer than half of its non-empty cells are numbers."""
    try:
        numbers: list[float] = list(map(float, column))  # the usual column, in C
        if all(map(math.isfinite, numbers)):
            return numbers  # type: ignore[return-value]  # no None in it
    except ValueError:
        pass
    found: list[float | None] = []
    good = filled = 0
    for cell in column:
        value: float | None = None
        if cell.strip():
            filled += 1
            try:
                value = float(cell)
            except ValueError:
                value = None
            if value is not None and not math.isfinite(value):
                value = None
            good += value is not None
        found.append(value)
    return found if good and 2 * good >= filled else None


def _csv_sections(
    items: Iterable[StoredRecord],
) -> Iterator[tuple[bytes, list[float], list[bytes]]]:
    """(header, times, lines) per run of rows with the same header; rows
    without a time are skipped."""
    header: bytes | None = None
    times: list[float] = []
    lines: list[bytes] = []
    for item in items:
        if item.time is None:
            continue
        if item.header != header:
            if lines and header is not None:
                yield header, times, lines
            header, times, lines = item.header, [], []
        times.append(item.time)
        lines.append(item.line)
    if lines and header is not None:
        yield header, times, lines


def collect(stored_as: StoredAs, items: Iterable[StoredRecord]) -> tuple[dict[str, Series], int]:
    """Numeric series by name, and the number of records read."""
    series: dict[str, Series] = {}
    count = 0

    def add(name: str, times: list[float], values: list[float | None]) -> None:
        target = series.get(name)
        if target is None:
            if len(series) >= MAX_SERIES:
                return
            target = series[name] = Series()
        if None not in values:  # every cell a number: in C
            target.times.extend(times)
            target.values.extend(values)  # type: ignore[arg-type]  # no None in it
            return
        for ts, value in zip(times, values, strict=True):
            if value is not None:
                target.times.append(ts)
                target.values.append(value)

    if stored_as is StoredAs.CSV:
        for header, times, lines in _csv_sections(items):
            count += len(lines)
            names = cells(header)
            rows = list(csv.reader(line.decode("utf-8", "replace") for line in lines))
            width = len(names)
            if all(len(row) == width for row in rows):
                columns: list[Sequence[str]] = list(zip(*rows, strict=True))
            else:
                columns = [[row[i] if i < len(row) else "" for row in rows] for i in range(width)]
            # Column 0 is the time the rows are plotted at.
            for index in range(1, width):
                numbers = _numbers(columns[index])
                if numbers is not None:
                    add(names[index], times, numbers)
    elif stored_as is StoredAs.JSON_LINES:
        for item in items:
            count += 1
            if item.time is None:
                continue
            for name, value in _leaves(_body(item.line)):
                number = isinstance(value, int | float) and not isinstance(value, bool)
                if number and math.isfinite(value):
                    add(name, [item.time], [float(value)])
    else:
        count = sum(1 for _ in items)
    return series, count


def _body(line: bytes) -> Any:
    try:
        return orjson.loads(line).get("body")
    except (orjson.JSONDecodeError, AttributeError):
        return None


def _leaves(value: Any, prefix: str = "", depth: int = 0) -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict) and depth < MAX_DEPTH:
        for key, inner in value.items():
            yield from _leaves(inner, f"{prefix}.{key}" if prefix else str(key), depth + 1)
    elif not isinstance(value, dict | list):
        yield prefix or "value", value


def downsampled(
    series: dict[str, Series], start: float, end: float, buckets: int
) -> dict[str, list[Point]]:
    charted = {}
    for name, one in series.items():
        times, values = one.times, one.values
        if not all(map(operator.le, times, islice(times, 1, None))):  # a backlog sent late
            order = sorted(range(len(times)), key=times.__getitem__)
            times = [times[i] for i in order]
            values = [values[i] for i in order]
        charted[name] = min_max(times, values, start, end, buckets)
    return charted


def latest_values(stored_as: StoredAs, header: bytes, line: bytes) -> list[tuple[str, str]]:
    """(column, value) of the newest record, for a table."""
    if stored_as is StoredAs.CSV:
        names, row = cells(header), cells(line)
        pairs = list(zip(names, row, strict=False))
        pairs += [(f"column {i + 1}", cell) for i, cell in enumerate(row) if i >= len(names)]
    elif stored_as is StoredAs.TEXT:
        pairs = [("line", line.decode("utf-8", "replace"))]
    else:
        pairs = [
            (name, value if isinstance(value, str) else orjson.dumps(value).decode())
            for name, value in _leaves(_body(line))
        ]
    return pairs[:MAX_VALUES]
