"""Min/max downsampling of a time series for a chart (pure).

The window is cut into equal time buckets; each bucket keeps its smallest
and its largest value, in the order they came, so a one-row spike stays on
the chart. `buckets` buckets give at most `2 * buckets` points; a series
with no more points than that is returned whole.
"""

from __future__ import annotations

from bisect import bisect_left

Point = tuple[float, float]  # (time, value)


def min_max(
    times: list[float], values: list[float], start: float, end: float, buckets: int
) -> list[Point]:
    """`times` ascending (same length as `values`), all in [start, end)."""
    if len(times) <= 2 * buckets:
        return list(zip(times, values, strict=True))
    width = (end - start) / buckets
    points: list[Point] = []
    lo = 0
    for bucket in range(1, buckets + 1):
        # The last bucket takes everything left (rounding of the width).
        hi = len(times) if bucket == buckets else bisect_left(times, start + bucket * width, lo)
        if hi > lo:
            part = values[lo:hi]
            low = lo + part.index(min(part))
            high = lo + part.index(max(part))
            for i in sorted({low, high}):
                points.append((times[i], values[i]))
        lo = hi
    return points
