"""A device with 30 days of one-minute blocks: how fast its page and data come.

    python3 bench/device_page.py [--days 30] [--columns 20] [--runs 5]

Stores `--days` x 1440 one-row blocks of `--columns` columns (a time and
numbers) for one Wattmon device with the real file sink (daily files, the
closed ones gzipped as housekeeping does), starts `ingestd serve` (one
worker) on that data directory, and times, median of `--runs`:
- the page's data requests: `GET /api/devices/{id}/chart` for the default
  24 h window and for all 30 days, and `GET /api/devices/{id}`;
- the data API: time to the first byte and to the last of
  `GET /api/devices/{id}/data` (all of it as CSV, and the last 24 h).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import start_ingestd, stop_ingestd

from ingestd.config import StorageConfig
from ingestd.records import Record
from ingestd.sinks.file.housekeeping import compress_file
from ingestd.sinks.file.sink import FileSink

MAC = "0250c2000001"


def make_rows(days: int, columns: int, end: float) -> tuple[bytes, list[tuple[float, bytes]]]:
    header = ",".join(["Time", *(f"C{i}" for i in range(1, columns))]).encode() + b"\n"
    start = end - days * 86400
    rows = []
    for minute in range(days * 1440):
        ts = start + minute * 60
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))
        values = ",".join(f"{(minute * (c + 1)) % 997 / 10:.1f}" for c in range(1, columns))
        rows.append((ts, f"{when},{values}\n".encode()))
    return header, rows


async def store(data_dir: Path, days: int, columns: int) -> int:
    end = time.time()
    header, rows = make_rows(days, columns, end)
    sink = FileSink(data_dir, StorageConfig(data_dir=str(data_dir), fsync="never"))
    await sink.open()
    batch = 1440
    for i in range(0, len(rows), batch):
        await sink.commit(
            [
                Record("wattmon", MAC, ts, row, header, f"{i + n:032x}", 1)
                for n, (ts, row) in enumerate(rows[i : i + batch])
            ]
        )
    await sink.close()
    folder = data_dir / "wattmon" / MAC
    for path in sorted(folder.glob("*.csv"))[:-1]:  # every day but today's
        compress_file(path)
    return len(rows)


def timed(port: int, path: str) -> tuple[float, float, int]:
    """(seconds to the first body byte, to the last, bytes) of one GET."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    started = time.perf_counter()
    conn.request("GET", path)
    response = conn.getresponse()
    assert response.status == 200, (response.status, response.read(200))
    first = response.read(1)
    first_byte = time.perf_counter() - started
    size = len(first) + len(response.read())
    total = time.perf_counter() - started
    conn.close()
    return first_byte, total, size


def median(port: int, path: str, runs: int) -> tuple[float, float, int]:
    results = [timed(port, path) for _ in range(runs)]
    return (
        statistics.median(r[0] for r in results),
        statistics.median(r[1] for r in results),
        results[0][2],
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--columns", type=int, default=20)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        started = time.perf_counter()
        rows = asyncio.run(store(data_dir, args.days, args.columns))
        files = [p for p in (data_dir / "wattmon" / MAC).iterdir() if ".csv" in p.name]
        print(
            f"stored {rows} rows x {args.columns} columns in {len(files)} files "
            f"({time.perf_counter() - started:.1f} s)"
        )
        proc, port = start_ingestd(data_dir, "[server]\nworkers = 1\n")
        try:
            timed(port, f"/api/devices/{MAC}")  # warm: imports, the first scan
            cases: list[tuple[str, str, Callable[[tuple[float, float, int]], str]]] = [
                (
                    "page data: chart, 24 h",
                    f"/api/devices/{MAC}/chart",
                    lambda r: f"{r[1] * 1000:.0f} ms ({r[2]:,} bytes)",
                ),
                (
                    "page data: chart, 30 d",
                    f"/api/devices/{MAC}/chart?window=30d",
                    lambda r: f"{r[1] * 1000:.0f} ms ({r[2]:,} bytes)",
                ),
                (
                    "page data: device document",
                    f"/api/devices/{MAC}",
                    lambda r: f"{r[1] * 1000:.0f} ms",
                ),
                ("page itself", f"/devices/{MAC}", lambda r: f"{r[1] * 1000:.1f} ms"),
                (
                    "data API, all (CSV)",
                    f"/api/devices/{MAC}/data",
                    lambda r: (
                        f"first byte {r[0] * 1000:.0f} ms, all {r[1] * 1000:.0f} ms "
                        f"({r[2] / 1e6:.1f} MB)"
                    ),
                ),
                (
                    "data API, last 24 h (CSV)",
                    f"/api/devices/{MAC}/data?from=24h",
                    lambda r: (
                        f"first byte {r[0] * 1000:.0f} ms, all {r[1] * 1000:.0f} ms "
                        f"({r[2] / 1e6:.2f} MB)"
                    ),
                ),
                (
                    "data API, all (NDJSON)",
                    f"/api/devices/{MAC}/data?format=ndjson",
                    lambda r: (
                        f"first byte {r[0] * 1000:.0f} ms, all {r[1] * 1000:.0f} ms "
                        f"({r[2] / 1e6:.1f} MB)"
                    ),
                ),
            ]
            for name, path, show in cases:
                print(f"{name}: {show(median(port, path, args.runs))}")
        finally:
            stop_ingestd(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
