"""10,000 slow devices hold connections open; honest devices must not notice.

    python3 bench/slow_clients.py [--slow 10000] [--honest-rate 100] [--seconds 20]

Starts ingestd with its defaults. `--slow` connections each send a request's
headers and then trickle its body one byte every few seconds (a device on a
very bad link); they stay open for the whole run. Meanwhile honest devices
post Wattmon blocks at `--honest-rate` per second on fresh connections.
Reports the honest devices' latency percentiles and ingestd's resident
memory (main process and workers) with all slow connections open.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import shutil
import tempfile
from pathlib import Path

import aiohttp
from common import form, now, percentile, rss_bytes, start_ingestd, stop_ingestd


async def slow_device(port: int, seconds: float, opened: list[int]) -> None:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return
    opened[0] += 1
    body = form(random.randrange(10**6), 0)
    writer.write(
        b"POST /wattmon HTTP/1.1\r\nHost: ingestd\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    deadline = now() + seconds
    sent = 0
    try:
        while now() < deadline and sent < len(body) - 1:
            writer.write(body[sent : sent + 1])
            sent += 1
            await asyncio.sleep(5 + random.random())
    except ConnectionError:
        pass
    finally:
        writer.close()


async def honest(url: str, rate: float, seconds: float) -> list[float]:
    latencies: list[float] = []
    failures = 0

    async def one(n: int) -> None:
        nonlocal failures
        started = now()
        # 100 honest devices, each posting its next block
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s,
            s.post(
                f"{url}/wattmon",
                data=form(n % 100, n // 100 + 1),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            ) as r,
        ):
            ok = r.status == 200 and await r.text() == "OK"
        if ok:
            latencies.append(now() - started)
        else:
            failures += 1

    tasks = []
    for n in range(int(rate * seconds)):
        tasks.append(asyncio.create_task(one(n)))
        await asyncio.sleep(1 / rate)
    await asyncio.gather(*tasks)
    assert failures == 0, f"{failures} honest posts failed"
    return latencies


async def run(args: argparse.Namespace) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    root = Path(tempfile.mkdtemp(prefix="ingestd-slow-"))
    proc, port = start_ingestd(root / "data", "[server]\nbody_timeout_secs = 600\n")
    url = f"http://127.0.0.1:{port}"
    opened = [0]
    base_rss = rss_bytes(proc.pid)
    slow = []
    for _ in range(args.slow):
        slow.append(asyncio.create_task(slow_device(port, args.seconds + 30, opened)))
        if len(slow) % 500 == 0:
            await asyncio.sleep(0.05)
    await asyncio.sleep(3)
    held_rss = rss_bytes(proc.pid)
    latencies = await honest(url, args.honest_rate, args.seconds)
    end_rss = rss_bytes(proc.pid)
    print(
        f"slow connections open: {opened[0]}; ingestd RSS idle {base_rss / 2**20:.0f} MiB, "
        f"with them {held_rss / 2**20:.0f} MiB, after honest load {end_rss / 2**20:.0f} MiB"
    )
    print(
        f"honest posts: {len(latencies)}, latency p50 {percentile(latencies, 50) * 1000:.1f} ms, "
        f"p99 {percentile(latencies, 99) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms"
    )
    for task in slow:
        task.cancel()
    await asyncio.gather(*slow, return_exceptions=True)
    stop_ingestd(proc)
    shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--slow", type=int, default=10_000)
    parser.add_argument("--honest-rate", type=float, default=100)
    parser.add_argument("--seconds", type=float, default=20)
    args = parser.parse_args()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
