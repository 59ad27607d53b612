"""Latency at a fixed request rate (open loop), e.g. half the peak throughput.

    python3 bench/latency.py --rate 3000 [--seconds 10] [--connections 64] [--workers 1]

Starts ingestd pinned to core 0 (like bench/run.py) and sends distinct
Wattmon blocks from core 1 at `--rate` posts per second over keep-alive
connections. Latency is measured from each post's scheduled time, so a
stall delays every post behind it and shows in the percentiles (no
coordinated omission).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
from pathlib import Path

import aiohttp
from common import form, now, percentile, start_ingestd, stop_ingestd

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


async def run(args: argparse.Namespace) -> None:
    os.sched_setaffinity(0, {1})  # the load generator's core
    root = Path(tempfile.mkdtemp(prefix="ingestd-latency-"))
    cores = "0" if args.workers == 1 else f"0-{args.workers - 1}"
    proc, port = start_ingestd(root / "data", f"[server]\nworkers = {args.workers}\n", cores)
    url = f"http://127.0.0.1:{port}/wattmon"
    interval = args.connections / args.rate
    latencies: list[float] = []
    errors = 0
    start = 0.0

    async def connection(index: int, session: aiohttp.ClientSession) -> None:
        nonlocal errors
        sent = 0
        while True:
            scheduled = start + index * interval / args.connections + sent * interval
            if scheduled > start + args.seconds:
                return
            delay = scheduled - now()
            if delay > 0:
                await asyncio.sleep(delay)
            # A fleet of 1,024 devices, each posting its next block.
            n = sent * args.connections + index
            body = form(n % 1024, n // 1024)
            sent += 1
            async with session.post(url, data=body, headers=FORM) as resp:
                ok = resp.status == 200 and await resp.text() == "OK"
            if ok:
                latencies.append(now() - scheduled)
            else:
                errors += 1

    connector = aiohttp.TCPConnector(limit=args.connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        # Steady state: the fleet has posted before, its folders exist.
        async def warm(n: int) -> None:
            async with session.post(url, data=form(n, 10**6), headers=FORM) as resp:
                await resp.read()

        for first in range(0, 1024, args.connections):
            await asyncio.gather(
                *(warm(n) for n in range(first, min(first + args.connections, 1024)))
            )
        start = now() + 0.5
        await asyncio.gather(*(connection(i, session) for i in range(args.connections)))
    stop_ingestd(proc)
    shutil.rmtree(root, ignore_errors=True)
    achieved = len(latencies) / args.seconds
    print(
        f"target {args.rate:,.0f}/s, achieved {achieved:,.0f}/s, errors {errors}; latency "
        f"p50 {percentile(latencies, 50) * 1000:.1f} ms, "
        f"p90 {percentile(latencies, 90) * 1000:.1f} ms, "
        f"p99 {percentile(latencies, 99) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rate", type=float, required=True)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
