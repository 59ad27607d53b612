"""The burst after an outage: a whole fleet resends its backlog at once.

    python3 bench/burst.py [--devices 5000] [--blocks 20] [--connections 1000]

Starts ingestd with its defaults (durable OK, bounded queue) on a fresh data
directory. Every device posts its backlog in order as fast as it can, on a
new connection per post (a cellular device), resending a block until it reads
exactly `OK`; 503 answers (queue full) are expected and counted. At most
`--connections` posts are in flight. Afterwards it stops ingestd and checks
every device's files: each block present once, in order, one header a file.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import aiohttp
from common import HEADER, block, form, mac, now, rss_bytes, start_ingestd, stop_ingestd


async def device(
    n: int, blocks: int, url: str, gate: asyncio.Semaphore, tally: Counter[str]
) -> None:
    for seq in range(blocks):
        body = form(n, seq)
        delay = 0.05
        while True:
            async with gate:
                try:
                    async with (
                        aiohttp.ClientSession(
                            connector=aiohttp.TCPConnector(force_close=True),
                            timeout=aiohttp.ClientTimeout(total=60),
                        ) as session,
                        session.post(
                            f"{url}/wattmon",
                            data=body,
                            headers={"Content-Type": "application/x-www-form-urlencoded"},
                        ) as resp,
                    ):
                        text = await resp.text()
                        status = resp.status
                except (aiohttp.ClientError, TimeoutError):
                    status, text = 0, ""
            if status == 200 and text == "OK":
                tally["ok"] += 1
                break
            tally[f"retry_{status}"] += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


def check(data_dir: Path, devices: int, blocks: int) -> None:
    for n in range(devices):
        rows = []
        for path in sorted((data_dir / "wattmon" / mac(n)).glob("*.csv")):
            lines = path.read_text().splitlines()
            assert lines[0] == HEADER and HEADER not in lines[1:], path
            rows += lines[1:]
        expected = [row for seq in range(blocks) for row in block(n, seq).splitlines()[1:]]
        assert rows == expected, f"device {n}: stored rows differ from what was acknowledged"


async def run(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="ingestd-burst-"))
    proc, port = start_ingestd(root / "data", args.config)
    url = f"http://127.0.0.1:{port}"
    gate = asyncio.Semaphore(args.connections)
    tally: Counter[str] = Counter()
    peak_rss = 0

    async def watch_memory() -> None:
        nonlocal peak_rss
        while True:
            peak_rss = max(peak_rss, rss_bytes(proc.pid))
            await asyncio.sleep(0.5)

    watcher = asyncio.create_task(watch_memory())
    started = now()
    await asyncio.gather(*(device(n, args.blocks, url, gate, tally) for n in range(args.devices)))
    elapsed = now() - started
    watcher.cancel()
    stop_ingestd(proc)
    check(root / "data", args.devices, args.blocks)
    total = args.devices * args.blocks
    print(
        f"devices={args.devices} blocks_each={args.blocks} acknowledged={tally['ok']} "
        f"retries={sum(v for k, v in tally.items() if k != 'ok')} ({dict(tally)})"
    )
    print(
        f"drained in {elapsed:.1f} s: {total / elapsed:,.0f} blocks/s; peak RSS "
        f"{peak_rss / 2**20:.0f} MiB; every block stored once, in order"
    )
    shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=5000)
    parser.add_argument("--blocks", type=int, default=20)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--config", default="", help="TOML text for ingestd")
    args = parser.parse_args()
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
