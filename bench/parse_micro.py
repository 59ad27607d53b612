"""Micro-benchmark of the sans-I/O parsers: microseconds per call, one core.

    python3 bench/gen_bodies.py --out bench/results/bodies   # once
    python3 bench/parse_micro.py [--bodies DIR] [--count 1000] [--repeat 7] [--reference]

Parses the first --count bodies of bench/results/bodies/wattmon.txt and
json.txt once each per run, in a hot loop; prints the median over --repeat
timeit runs divided by --count, and the best run (how noisy the machine is).
`received_at` advances 1 ms per body (1,000 requests a second). --reference
also times the frozen copies of the parsers as they were before the fast
paths (tests/_reference_parsers.py), in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ingestd.protocols import jsonpost, wattmon

ROOT = Path(__file__).resolve().parent.parent
URLENCODED = "application/x-www-form-urlencoded"
BASE_TIME = 1_795_248_000.0


def load(path: Path, count: int) -> list[tuple[str, bytes]]:
    bodies = []
    with open(path, "rb") as fh:
        for line in fh:
            target, _, body = line.rstrip(b"\n").partition(b"\t")
            bodies.append((target.decode(), body))
            if len(bodies) == count:
                break
    return bodies


def per_call_us(run: Callable[[], Any], calls: int, repeat: int) -> tuple[float, float]:
    """(median, best) microseconds per call; best shows how noisy the machine is."""
    run()  # warm up: imports, caches, the allocator
    times = timeit.repeat(run, number=1, repeat=repeat)
    return statistics.median(times) / calls * 1e6, min(times) / calls * 1e6


def bench(
    watt_parse: Any, json_parse: Any, args: argparse.Namespace
) -> dict[str, tuple[float, float]]:
    forms = load(args.bodies / "wattmon.txt", args.count)
    docs = load(args.bodies / "json.txt", args.count)
    stamps = [BASE_TIME + i / 1000 for i in range(args.count)]

    def run_wattmon() -> None:
        for (_, body), now in zip(forms, stamps, strict=False):
            watt_parse(body, URLENCODED, received_at=now, require_md5=False)

    def run_json() -> None:
        for (path, body), now in zip(docs, stamps, strict=False):
            json_parse(
                body,
                path=path,
                remote="192.0.2.1",
                received_at=now,
                idempotency_key=None,
                max_depth=32,
            )

    return {
        "wattmon.parse": per_call_us(run_wattmon, len(forms), args.repeat),
        "jsonpost.parse": per_call_us(run_json, len(docs), args.repeat),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bodies", type=Path, default=ROOT / "bench" / "results" / "bodies")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--reference", action="store_true")
    args = parser.parse_args()
    if not (args.bodies / "wattmon.txt").exists():
        sys.exit(f"no bodies in {args.bodies}: run python3 bench/gen_bodies.py --out {args.bodies}")

    results = {"now": bench(wattmon.parse, jsonpost.parse, args)}
    if args.reference:
        sys.path.insert(0, str(ROOT / "tests"))
        import _reference_parsers as ref  # type: ignore[import-not-found]  # tests/, on the path above

        results["reference"] = bench(ref.wattmon_parse, ref.json_parse, args)
    for label, figures in results.items():
        for name, (median, best) in figures.items():
            print(f"{label:<10} {name:<15} {median:7.2f} us/call (best {best:.2f})")


if __name__ == "__main__":
    main()
