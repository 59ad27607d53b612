"""Bytes of memory per device the writer keeps, measured with tracemalloc.

    python3 bench/memory_per_device.py [--devices 10000] [--blocks 10]

Stores `--blocks` blocks for each of `--devices` devices (all kept open:
max_open_files = devices) and divides the growth of traced memory by the
number of devices. Devices beyond max_open_files cost nothing: their state
is on disk and loaded again when they next post.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import tempfile
import tracemalloc
from pathlib import Path

from ingestd.config import StorageConfig
from ingestd.records import Record
from ingestd.sinks.file.sink import FileSink

HEADER = b"Time,V1,V2,V3,V4,V5,V6,V7,V8,V9,V10\n"


def block(device: int, i: int) -> Record:
    rows = b"".join(b"2026-11-21 08:%02d:00,1,2,3,4,5,6,7,8,9,10\n" % m for m in range(15))
    key = hashlib.md5(b"%d-%d" % (device, i)).hexdigest()
    return Record("wattmon", f"{device:012x}", 1_795_248_000.0 + i, rows, HEADER, key, 15)


async def measure(devices: int, blocks: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = StorageConfig(data_dir=tmp, fsync="never", max_open_files=devices)
        sink = FileSink(Path(tmp), config)
        await sink.open()
        await sink.commit([block(0, 0)])  # warm up imports and caches
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(blocks):
            for start in range(0, devices, 1000):
                await sink.commit([block(d, i) for d in range(start, min(start + 1000, devices))])
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        await sink.close()
    per_device = (after - before) / devices
    print(f"devices={devices} blocks_each={blocks} bytes_per_open_device={per_device:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--blocks", type=int, default=10)
    args = parser.parse_args()
    asyncio.run(measure(args.devices, args.blocks))


if __name__ == "__main__":
    main()
