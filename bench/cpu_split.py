"""Where a post's CPU goes in worker mode: the serial part (the main
process) and the spread part (the workers), against one process.

    python3 bench/cpu_split.py [--runs 3] [--seconds 10] [--warmup 5]
                               [--connections 64,256,1024] [--new-conn]

For `workers = 1` and `workers = 2`, `--runs` runs each, alternating, on the
same bodies as bench/run.py (distinct Wattmon blocks from 1,000 devices,
keep-alive, or a new connection per post with `--new-conn`): start ingestd
on an empty data dir, warm it up, then measure posts/s and each process's
CPU time (utime + stime from /proc, threads included) over the measured
run. Server and wrk share both cores, as a 2-core collector box with its
load generator would (`--cores`); with `--delay-ms`, at a paced load below
the peak. Each `--connections` count (wrk's closed loop: that many posts in
flight) gets its own table of every run, the medians' ratios the issue asks
for, and an Amdahl estimate for more cores from the median split (an
estimate, not a measurement).

Concurrency matters: a saturated server with real devices (each post a
cellular round trip of 100s of ms) has many more posts in flight than a
load generator on the same box needs to saturate it (Little's law: 10,000
posts/s at 0.2 s each is 2,000 in flight).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common import serve_command
from run import WARM_BODIES, free_port, wait_listening, wrk

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """A process's CPU time so far, all its threads."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime


def machine_ticks() -> tuple[int, int]:
    """(all, stolen) CPU ticks of the machine so far: on a shared VM the
    host takes a varying share, which makes runs differ."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    return sum(values), values[7]


def children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as fh:
            found += [int(child) for child in fh.read().split()]
    return found


@dataclass
class Split:
    workers: int
    posts_per_sec: float
    main_us: float  # CPU per post of the main process
    workers_us: float  # of all workers together
    steal: float = 0.0  # the share of the machine's CPU the host took meanwhile

    @property
    def total_us(self) -> float:
        return self.main_us + self.workers_us


def measure(workers: int, connections: int, args: argparse.Namespace) -> Split:
    run_dir = Path(tempfile.mkdtemp(prefix="ingestd-split-", dir=args.data_root))
    (run_dir / "data").mkdir()
    config = run_dir / "ingestd.toml"
    config.write_text(f"[server]\nworkers = {workers}\n")
    port = free_port()
    proc = subprocess.Popen(
        [
            "taskset",
            "-c",
            args.server_cores or args.cores,
            *serve_command(config, run_dir / "data", f"127.0.0.1:{port}"),
        ],
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(port)
        time.sleep(1)  # the workers say hello after the port answers
        wrk_cores = args.wrk_cores or args.cores
        wrk(port, "wattmon", args.new_conn, args.warmup, connections, wrk_cores, WARM_BODIES)
        pids = [proc.pid, *children(proc.pid)]
        if workers > 1:
            assert len(pids) == workers + 1, f"expected {workers} workers, found {pids[1:]}"
        before = {pid: cpu_seconds(pid) for pid in pids}
        ticks_before = machine_ticks()
        result = wrk(port, "wattmon", args.new_conn, args.seconds, connections, wrk_cores)
        used = {pid: cpu_seconds(pid) - before[pid] for pid in pids}
        ticks_after = machine_ticks()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        shutil.rmtree(run_dir, ignore_errors=True)
    posts = result["answered"]
    if result["errors"]:
        print(f"warning: workers={workers}: {result['errors']:.0f} errors", file=sys.stderr)
    main = used[proc.pid]
    spread = sum(seconds for pid, seconds in used.items() if pid != proc.pid)
    steal = (ticks_after[1] - ticks_before[1]) / max(1, ticks_after[0] - ticks_before[0])
    return Split(workers, result["rate"], main / posts * 1e6, spread / posts * 1e6, steal)


def amdahl(one: Split, two: Split, cores: int) -> float:
    """Posts/s on `cores` cores, all serving, from the measured split.

    Per post, the main process costs `two.main_us` on one core (the serial
    part). The workers cost the single process's CPU plus a hand-off for
    the posts that reach a worker not owning their device: (n-1)/n of
    them with n workers; the 2-worker run measures it at half the posts.
    """
    handoff_us = max(0.0, 2 * (two.workers_us - one.total_us))
    per_post = one.total_us + handoff_us * (cores - 1) / cores + two.main_us
    return min(cores * 1e6 / per_post, 1e6 / two.main_us if two.main_us else float("inf"))


def median_split(splits: list[Split]) -> Split:
    return Split(
        splits[0].workers,
        statistics.median(s.posts_per_sec for s in splits),
        statistics.median(s.main_us for s in splits),
        statistics.median(s.workers_us for s in splits),
        statistics.median(s.steal for s in splits),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=5)
    parser.add_argument(
        "--connections",
        default="64",
        help="posts in flight (wrk connections); several, comma-separated, for a table each",
    )
    parser.add_argument("--new-conn", action="store_true", help="a new connection per post")
    parser.add_argument("--cores", default="0-1", help="server and wrk, both")
    parser.add_argument(
        "--server-cores",
        default=None,
        help="the server's alone (e.g. 0, with --wrk-cores 1): the same CPU for both modes,"
        " so the split shows the design's cost without the load generator's contention",
    )
    parser.add_argument("--wrk-cores", default=None)
    parser.add_argument("--data-root", default=None)
    parser.add_argument(
        "--delay-ms",
        type=float,
        default=0,
        help="each connection waits this long before each post (bench/replay.lua's DELAY_MS):"
        " a paced load below the peak, where CPU per post is the work's, not the contention's",
    )
    args = parser.parse_args()
    if args.delay_ms:
        os.environ["DELAY_MS"] = f"{args.delay_ms:g}"
    for connections in (int(count) for count in args.connections.split(",")):
        runs: dict[int, list[Split]] = {1: [], 2: []}
        for _ in range(args.runs):
            for workers in (1, 2):
                runs[workers].append(measure(workers, connections, args))
        mode = "a new connection per post" if args.new_conn else "keep-alive"
        print(f"\n### {connections} connections, {mode}\n")
        report(runs)


def report(runs: dict[int, list[Split]]) -> None:
    print(
        "| workers | run | posts/s | main process CPU/post | workers CPU/post"
        " | total CPU/post | stolen by the host |"
    )
    print("|---|---|---|---|---|---|---|")
    for workers, splits in runs.items():
        for label, split in [*enumerate(splits, 1), ("median", median_split(splits))]:
            spread = f"{split.workers_us:.1f} us" if workers > 1 else "-"
            print(
                f"| {workers} | {label} | {split.posts_per_sec:,.0f} | {split.main_us:.1f} us"
                f" | {spread} | {split.total_us:.1f} us | {split.steal:.0%} |"
            )
    one, two = median_split(runs[1]), median_split(runs[2])
    print()
    print(f"- serial part (main process, 2 workers): {two.main_us:.1f} us/post (target <= 8)")
    print(
        f"- total CPU per post, 2 workers / 1 process: {two.total_us / one.total_us:.2f}x"
        " (target <= 1.25x)"
    )
    print(
        f"- posts/s, 2 workers / 1 process (wrk on the same cores): "
        f"{two.posts_per_sec / one.posts_per_sec:.2f}x"
    )
    print()
    print("Estimate (Amdahl, from the median split above; not measured):")
    for cores in (4, 8, 16):
        print(f"- {cores} cores: ~{amdahl(one, two, cores):,.0f} posts/s")


if __name__ == "__main__":
    main()
