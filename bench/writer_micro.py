"""CPU and wall time the file sink's writer spends per record, without HTTP.

    python3 bench/writer_micro.py [--records 20000] [--repeat 3] [--profile]
        [--only wattmon|json] [--fsync always|never] [--dir DIR] [--cold-log]
        [--window N] [--max-open-files N]

Parses the benchmark bodies (`bench/results/bodies/{wattmon,json}.txt`, made
by `python3 bench/gen_bodies.py --out bench/results/bodies`) up front, then
drives a `FileSink` directly from this thread, as the writer thread does:
`_open_blocking()`, then `_commit_blocking()` over batches of `--batch` (48)
records. The first pass over the devices (1,000 Wattmon MACs, 100 JSON
streams) is a warm-up, so every device is open when timing starts. The log
files are zero-filled before timing, as in a daemon that has run a while
(`--cold-log` times that too). `--window 1000` starts every device with
that many keys in its key file, as after a while (`dedup_window_blocks`): a
keyed record then looks through a full dedup window. `--max-open-files 100`
(below the 1,000 devices) has the writer close a device for every one it
opens, as in a fleet larger than `storage.max_open_files`: each record then
loads its device's folder and key file again (with `--window 1000`, the
state of a fleet that has been posting for a while).

Prints CPU us per record (`time.process_time`, all threads, so a
checkpoint's fsyncs count too; the kernel's share from `getrusage`) and wall
us per record: the best of `--repeat` runs, each in a fresh data directory.
`--profile` prints a cProfile top 20 of one run instead (cProfile itself
roughly doubles the Python part).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import resource
import tempfile
import time
from pathlib import Path

from ingestd.config import StorageConfig
from ingestd.protocols import jsonpost, wattmon
from ingestd.records import Outcome, Quarantined, Record
from ingestd.sinks.file.device import KEYS_NAME
from ingestd.sinks.file.sink import FileSink

BODIES = Path(__file__).parent / "results" / "bodies"
WARM_UP = {"wattmon": 1000, "json": 100}  # distinct devices in the bodies


def load(protocol: str, count: int) -> list[Record | Quarantined]:
    items: list[Record | Quarantined] = []
    with open(BODIES / f"{protocol}.txt", "rb") as fh:
        for line in fh:
            path, _, body = line.rstrip(b"\n").partition(b"\t")
            now = time.time()  # each request its own, as the daemon does
            if protocol == "wattmon":
                item = wattmon.parse(
                    body, "application/x-www-form-urlencoded", received_at=now, require_md5=False
                )
            else:
                item = jsonpost.parse(body, path=path.decode(), remote="127.0.0.1", received_at=now)
            if item is not None:
                items.append(item)
            if len(items) == count:
                break
    return items


def run(
    items: list[Record | Quarantined],
    warm: int,
    args: argparse.Namespace,
    prof: cProfile.Profile | None,
) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        config = StorageConfig(data_dir=tmp, fsync=args.fsync, max_open_files=args.max_open_files)
        if args.window:
            fill_windows(Path(tmp), items, args.window)
        sink = FileSink(Path(tmp), config)
        sink._open_blocking()
        if not args.cold_log:
            # A running daemon recycles its log files: zero-fill them now, as
            # a long-running log already is, so the timing leaves that out.
            wal = sink._wal
            assert wal is not None
            need = sum(len(r.payload) + 256 for r in items if isinstance(r, Record))
            for slot in wal._slots:
                wal._reserve(slot, need)
        batch = args.batch
        for i in range(0, warm, batch):
            sink._commit_blocking(items[i : min(i + batch, warm)])
        measured = items[warm:]
        if prof is not None:
            prof.enable()
        cpu, wall = time.process_time(), time.perf_counter()
        kernel = resource.getrusage(resource.RUSAGE_SELF).ru_stime
        stored = 0
        for i in range(0, len(measured), batch):
            results = sink._commit_blocking(measured[i : i + batch])
            stored += results.count(Outcome.STORED)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        kernel = resource.getrusage(resource.RUSAGE_SELF).ru_stime - kernel
        if prof is not None:
            prof.disable()
        sink._close_blocking()
        sink._executor.shutdown()
        if stored != len(measured):
            raise SystemExit(f"only {stored} of {len(measured)} records stored")
        n = len(measured)
        return cpu * 1e6 / n, kernel * 1e6 / n, wall * 1e6 / n


def fill_windows(data_dir: Path, items: list[Record | Quarantined], keys: int) -> None:
    now = time.time()
    for protocol, device in {(item.protocol, item.device_id) for item in items}:
        folder = data_dir / protocol / device
        folder.mkdir(parents=True)
        lines = "".join(f"{random.getrandbits(128):032x} {now:.3f}\n" for _ in range(keys))
        (folder / KEYS_NAME).write_text(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=20_000, help="per protocol, with warm-up")
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=["wattmon", "json"])
    parser.add_argument("--fsync", choices=["always", "never"], default="always")
    parser.add_argument("--dir", type=Path, help="where the data dirs go (default: $TMPDIR)")
    parser.add_argument("--cold-log", action="store_true", help="time zero-filling the log too")
    parser.add_argument("--window", type=int, default=0, help="keys each device starts with")
    parser.add_argument(
        "--max-open-files",
        type=int,
        default=StorageConfig().max_open_files,
        help="devices the writer keeps open (fewer: reloads)",
    )
    parser.add_argument("--profile", action="store_true", help="cProfile top 20 of one run")
    args = parser.parse_args()
    if not (BODIES / "wattmon.txt").exists():
        raise SystemExit(f"no bodies: python3 bench/gen_bodies.py --out {BODIES}")
    for protocol in ("wattmon", "json"):
        if args.only and protocol != args.only:
            continue
        items = load(protocol, args.records)
        warm = WARM_UP[protocol]
        if args.profile:
            prof = cProfile.Profile()
            cpu, kernel, wall = run(items, warm, args, prof)
            print(f"{protocol}: under cProfile cpu {cpu:.1f} us/record, wall {wall:.1f} us/record")
            pstats.Stats(prof).sort_stats("tottime").print_stats(20)
            continue
        runs = [run(items, warm, args, None) for _ in range(args.repeat)]
        cpu, kernel, _ = min(runs)
        wall = min(w for _, _, w in runs)
        print(
            f"{protocol:8s} {len(items) - warm} records, batches of {args.batch}: "
            f"cpu {cpu:.1f} us/record (of which kernel {kernel:.1f}), "
            f"wall {wall:.1f} us/record; best of {args.repeat}, "
            f"cpu {' '.join(f'{c:.1f}' for c, _, _ in runs)}"
        )


if __name__ == "__main__":
    main()
