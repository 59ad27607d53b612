"""Pre-generate unique request bodies for wrk to replay (one request a line).

    python3 bench/gen_bodies.py --out bench/results/bodies [--count 200000]
    python3 bench/gen_bodies.py --out bench/results/bodies/warm --start 1000000 --count 100000

(bench/large_fleet.py calls `wattmon_line(n, rng, devices)` for a larger fleet.)

Wattmon: urlencoded forms of 15 rows x 11 columns (about 1.9 KB) with a
correct md5sum, spread over 1,000 MACs; every block is distinct, so none is
answered as a resend (a set made with another --start shares the devices
but no block: bench/run.py warms the server up with one). JSON: documents of
about 700 bytes (an `interfaces` array of 4 objects) over 100 stream paths.
Lines are `path<TAB>body`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path
from urllib.parse import quote_plus

COLUMNS = ["Time", "V1", "V2", "V3", "I1", "I2", "I3", "P", "E", "T", "Hz"]


def wattmon_line(n: int, rng: random.Random, devices: int = 1000) -> str:
    mac = f"0050c2{n % devices:06x}"
    minute = n // devices
    rows = [",".join(COLUMNS)]
    for r in range(15):
        t = minute * 15 + r
        stamp = f"2026-11-{21 + t // 1440 % 7:02d} {t // 60 % 24:02d}:{t % 60:02d}:00"
        values = [f"{rng.uniform(0, 1000):.3f}" for _ in range(len(COLUMNS) - 1)]
        rows.append(",".join([stamp, *values]))
    data = "\r\n".join(rows) + "\r\n"
    md5 = hashlib.md5(data.encode()).hexdigest()
    body = f"key={mac}&md5sum={md5}&data={quote_plus(data)}"
    return f"/wattmon\t{body}"


def json_line(n: int, rng: random.Random) -> str:
    doc = {
        "seq": n,
        "timestamp": 1_795_248_000 + n,
        "interfaces": [
            {
                "name": f"eth{i}",
                "rx_bytes": rng.randrange(10**12),
                "tx_bytes": rng.randrange(10**12),
                "rx_packets": rng.randrange(10**9),
                "tx_packets": rng.randrange(10**9),
                "errors": rng.randrange(100),
                "link": "up",
                "speed_mbps": 10000,
            }
            for i in range(4)
        ],
    }
    return f"/interface-stats-for-mm-{n % 100}\t{json.dumps(doc)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/results/bodies"))
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--start", type=int, default=0, help="number of the first request")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(42)
    for name, make in (("wattmon", wattmon_line), ("json", json_line)):
        path = args.out / f"{name}.txt"
        with open(path, "w") as fh:
            for n in range(args.start, args.start + args.count):
                fh.write(make(n, rng) + "\n")
        print(f"{path}: {args.count} requests")


if __name__ == "__main__":
    main()
