"""A fleet larger than `max_open_files`: every post loads its device again.

    python3 bench/large_fleet.py [--devices 5000] [--max-open-files 256]
        [--keys 1000] [--seconds 12]

Each of `--devices` Wattmon MACs starts with a folder holding a key file of
`--keys` lines (a full dedup window, as after a fleet has posted for a
while). ingestd runs with `workers = 1` and `max_open_files` well below the
number of devices, pinned to core 0; wrk on core 1 sends distinct blocks
round-robin over the devices on 64 keep-alive connections, so nearly every
post finds its device closed and loads it (folder listing, header, key
window). Prints posts/s and latency: the rate a collector sustains when
its fleet does not fit in its open files (100,000 devices posting once a
minute is 1,700 posts/s).
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from common import serve_command
from gen_bodies import wattmon_line
from run import free_port, wait_listening, wrk


def make_bodies(path: Path, devices: int, count: int) -> None:
    rng = random.Random(42)
    with open(path, "w") as fh:
        for n in range(count):
            fh.write(wattmon_line(n, rng, devices) + "\n")


def make_fleet(data_dir: Path, devices: int, keys: int) -> None:
    """Device folders with a full key window each, an hour old."""
    rng = random.Random(7)
    stamp = f"{time.time() - 3600:.3f}"
    for device in range(devices):
        folder = data_dir / "wattmon" / f"0050c2{device:06x}"
        folder.mkdir(parents=True)
        lines = "".join(f"{rng.getrandbits(128):032x} {stamp}\n" for _ in range(keys))
        (folder / ".ingestd-keys").write_text(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=5000)
    parser.add_argument("--max-open-files", type=int, default=256)
    parser.add_argument("--keys", type=int, default=1000, help="lines in each key file")
    parser.add_argument("--seconds", type=int, default=12)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ingestd-fleet-", dir=args.data_root) as tmp:
        root = Path(tmp)
        bodies = root / "bodies"
        bodies.mkdir()
        # Enough distinct blocks that none is sent twice at ~5,000 posts/s.
        make_bodies(bodies / "wattmon.txt", args.devices, 5000 * args.seconds)
        data_dir = root / "data"
        make_fleet(data_dir, args.devices, args.keys)
        config = root / "ingestd.toml"
        config.write_text(
            f"[server]\nworkers = 1\n[storage]\nmax_open_files = {args.max_open_files}\n"
        )
        port = free_port()
        proc = subprocess.Popen(
            ["taskset", "-c", "0", *serve_command(config, data_dir, f"127.0.0.1:{port}")],
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_listening(port)
            time.sleep(3)  # the fleet view's scan of the data dir, at start
            result = wrk(port, "wattmon", False, args.seconds, args.connections, "1", bodies)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
            shutil.rmtree(data_dir, ignore_errors=True)
    print(
        f"{args.devices:,} devices with {args.keys} keys each, max_open_files = "
        f"{args.max_open_files}, {args.connections} keep-alive connections, {args.seconds} s: "
        f"{result['rate']:,.0f} posts/s, p99 {result['p99_ms']:.0f} ms, "
        f"{result['errors']:.0f} errors"
    )


if __name__ == "__main__":
    main()
