"""Side-by-side throughput table: ingestd against the bare aiohttp baseline.

    python3 bench/run.py [--runs 3] [--seconds 5] [--connections 64]

Each server is pinned to core 0 (`taskset -c 0`) and wrk to core 1, as in the
issue. Every cell is the median of `--runs` runs; ingestd starts each run on
an empty data directory with its defaults (durable: the log is fdatasynced
before every OK). Requests come from bench/gen_bodies.py: every Wattmon
block is distinct, so none is answered as a resend. Prints a Markdown table
with the ratio to the baseline measured in the same run.

`--warmup SECS` (default 8) first sends each server, freshly started, other
blocks from the same devices for that long (bench/results/bodies/warm), so
the measured run sees a daemon that has been running: every device folder
exists and the write-ahead logs have been filled once. `--warmup 0`
measures a daemon meeting 1,000 devices for the first time (each new device
is a mkdir and two file creations, which cost this VM's ext4 50 us to 1 ms).

`--servers baseline,ingestd,ceiling,floor` adds two reference rows: ingestd
with storage skipped (what the request path alone allows) and a Python core
answering OK and nothing else (the HTTP exchange's own share).

`--servers baseline,ingestd,php,node` adds the seeds' own sample receivers
(bench/seed_servers.py), each on the columns of its protocol: the Wattmon
PHP script under nginx + php-fpm with 4 children, the Allegro Node script;
both store without fsync. Before its runs each must answer a device's post
as the device expects, and after it its stored files must have grown by the
posts it answered; a row "ingestd / seed receiver" and the issue's targets
follow the table.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import seed_servers
from common import serve_command

HERE = Path(__file__).resolve().parent
BODIES = HERE / "results" / "bodies"
WARM_BODIES = BODIES / "warm"
COLUMNS = [
    ("Wattmon, keep-alive", "wattmon", False),
    ("Wattmon, new connection per post", "wattmon", True),
    ("JSON, keep-alive", "json", False),
    ("JSON, new connection", "json", True),
]
CONTENT_TYPES = {"wattmon": "application/x-www-form-urlencoded", "json": "application/json"}
# The seeds' sample receiver of each protocol, and what it answers a stored post.
SEED_RECEIVER = {"wattmon": "php", "json": "node"}
SEED_ANSWER = {"php": b"OK", "node": b""}
# Each post stores at least this much (a Wattmon block ~1.5 KB, a JSON document ~700 bytes).
MIN_STORED_PER_POST = 500
# Issue 13, one core: ingestd against the seed receiver and against the baseline.
TARGETS = {"seed receiver": 2.0, "baseline": 1.0}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_listening(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"server on port {port} did not start")


SERVERS = {
    "baseline": "the bare aiohttp + uvloop handler of the issue (bench/baseline_server.py)",
    "ingestd": "ingestd with its defaults: durable, written and fsynced before OK",
    "before": "ingestd from the checkout named by --before-tree (e.g. a git worktree of an"
    " older commit): before/after rows measured in one run",
    "ceiling": "ingestd with storage skipped: the request path alone (bench/ceiling_server.py)",
    "floor": "a Python core answering OK and nothing else (bench/floor_server.py)",
    "php": "the Wattmon seed's PHP script under nginx + php-fpm (4 children), Wattmon only",
    "node": "the Allegro seed's Node.js script (Buffer.concat patch), JSON only",
}


@dataclass
class Running:
    procs: list[subprocess.Popen[bytes]]
    port: int
    store: Path | None = None  # a seed receiver's files, checked to grow


def start_server(
    name: str, port: int, run_dir: Path, workers: int, before_tree: Path | None = None
) -> Running:
    cores = "0" if workers == 1 else f"0-{workers - 1}"
    if name == "php":
        procs, store = seed_servers.start_php(run_dir, port, cores)
        return Running(procs, port, store)
    if name == "node":
        procs, store = seed_servers.start_node(run_dir, cores)
        return Running(procs, seed_servers.NODE_PORT, store)
    if name in ("baseline", "floor"):
        command = [sys.executable, str(HERE / f"{name}_server.py"), str(port)]
    else:
        data_dir = run_dir / "data"
        data_dir.mkdir()
        config = run_dir / "ingestd.toml"
        # workers = 1 is the single-process mode: HTTP and storage in one process.
        config.write_text(f"[server]\nworkers = {workers}\n")
        daemon = ("-m", "ingestd") if name != "ceiling" else (str(HERE / "ceiling_server.py"),)
        command = serve_command(config, data_dir, f"127.0.0.1:{port}", daemon)
    # "before" imports ingestd from its own checkout: `-m` looks in the cwd first.
    cwd = before_tree if name == "before" else None
    proc = subprocess.Popen(["taskset", "-c", cores, *command], stderr=subprocess.DEVNULL, cwd=cwd)
    wait_listening(port)
    return Running([proc], port)


def wrk(
    port: int,
    protocol: str,
    new_conn: bool,
    seconds: float,
    connections: int,
    core: str,
    bodies: Path = BODIES,
) -> dict[str, float]:
    env = {
        **os.environ,
        "BODIES": str(bodies / f"{protocol}.txt"),
        "CONTENT_TYPE": CONTENT_TYPES[protocol],
        "NEW_CONN": "1" if new_conn else "0",
    }
    out = subprocess.run(
        [
            "taskset",
            "-c",
            core,
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds:g}s",
            "-s",
            str(HERE / "replay.lua"),
            f"http://127.0.0.1:{port}",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])
    result = dict(re.findall(r"(\w+)=(\d+)", out.split("RESULT", 1)[1]))
    errors = sum(int(result[k]) for k in ("errors_status", "errors_connect", "errors_read"))
    if bodies == BODIES and int(result["requests"]) >= 200_000:
        print(f"warning: {protocol} bodies were replayed more than once", file=sys.stderr)
    return {
        "rate": rate,
        "errors": errors,
        "p99_ms": int(result["p99_us"]) / 1000,
        "answered": int(result["requests"]) - int(result["errors_status"]),
    }


def check_seed_answer(name: str, port: int, protocol: str) -> None:
    """A seed receiver must answer a device's post as the device expects."""
    with open(WARM_BODIES / f"{protocol}.txt") as fh:
        path, body = fh.readline().rstrip("\n").split("\t", 1)
    seed_servers.check_answer(port, path, body.encode(), CONTENT_TYPES[protocol], SEED_ANSWER[name])


def run_once(
    name: str, column: tuple[str, str, bool], args: argparse.Namespace
) -> dict[str, float]:
    """One fresh server, warmed up, then one measured wrk run."""
    _, protocol, new_conn = column
    run_dir = Path(tempfile.mkdtemp(prefix="ingestd-bench-", dir=args.data_root))
    server = start_server(name, free_port(), run_dir, args.workers, args.before_tree)
    try:
        if server.store is not None:
            check_seed_answer(name, server.port, protocol)
        if args.warmup:
            wrk(
                server.port,
                protocol,
                new_conn,
                args.warmup,
                args.connections,
                args.wrk_core,
                WARM_BODIES,
            )
        before = seed_servers.stored_bytes(server.store) if server.store else 0
        result = wrk(server.port, protocol, new_conn, args.seconds, args.connections, args.wrk_core)
        if server.store is not None:
            grown = seed_servers.stored_bytes(server.store) - before
            if grown < result["answered"] * MIN_STORED_PER_POST:
                raise RuntimeError(
                    f"{name} answered {result['answered']:.0f} posts but stored only {grown} bytes"
                )
        return result
    finally:
        seed_servers.stop(server.procs)
        shutil.rmtree(run_dir, ignore_errors=True)


def serves(name: str, protocol: str) -> bool:
    """A seed receiver serves only its own protocol; every other server both."""
    return name not in SEED_ANSWER or SEED_RECEIVER[protocol] == name


Cell = dict[str, float] | None  # None: a column the server does not serve


def ratio_row(label: str, cells: list[Cell], references: list[Cell]) -> str:
    return (
        f"| {label} | "
        + " | ".join(
            "-" if c is None or r is None else f"{c['rate'] / r['rate']:.2f}x"
            for c, r in zip(cells, references, strict=True)
        )
        + " |"
    )


def print_table(table: dict[str, list[Cell]], columns: list[tuple[str, str, bool]]) -> None:
    print("| server | " + " | ".join(c[0] for c in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name, cells in table.items():
        print(
            f"| {name} | "
            + " | ".join(
                "-" if c is None else f"{c['rate']:,.0f}/s (p99 {c['p99_ms']:.0f} ms)"
                for c in cells
            )
            + " |"
        )
    # What each server is held against: the baseline, and each column's seed receiver.
    references: dict[str, list[Cell]] = {}
    if "baseline" in table:
        references["baseline"] = table["baseline"]
    if "before" in table:
        references["before"] = table["before"]
    if any(SEED_RECEIVER[c[1]] in table for c in columns):
        references["seed receiver"] = [
            table.get(SEED_RECEIVER[c[1]], [None] * len(columns))[i] for i, c in enumerate(columns)
        ]
    for name, cells in table.items():
        if name == "baseline" or name in SEED_ANSWER:
            continue
        for label, reference in references.items():
            if label == name:
                continue
            print(ratio_row(f"{name} / {label}", cells, reference))
    if "ingestd" not in table:
        return
    protocols = dict.fromkeys(c[1] for c in columns)
    print(
        "\nseed receiver: "
        + ", ".join(
            f"{SEED_RECEIVER[p]} on the {'Wattmon' if p == 'wattmon' else 'JSON'} columns"
            for p in protocols
        )
    )
    for label, minimum in TARGETS.items():
        if label not in references:
            continue
        short = [
            f"{column[0]} {c['rate'] / r['rate']:.2f}x"
            for column, c, r in zip(columns, table["ingestd"], references[label], strict=True)
            if c is not None and r is not None and c["rate"] / r["rate"] < minimum
        ]
        verdict = "met on every column" if not short else "short on " + "; ".join(short)
        print(f"target ingestd >= {minimum:.1f}x the {label}: {verdict}")


def measure(
    names: list[str], column: tuple[str, str, bool], args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    """Each server's median over `args.runs`. The servers take turns run by
    run, so a slow spell of this shared machine falls on all of them rather
    than on whichever was being measured at the time."""
    runs: dict[str, list[dict[str, float]]] = {
        name: [] for name in names if serves(name, column[1])
    }
    for _ in range(args.runs):
        for name in runs:
            runs[name].append(run_once(name, column, args))
    return {
        name: {
            "rate": statistics.median(r["rate"] for r in results),
            "errors": sum(r["errors"] for r in results),
            "p99_ms": statistics.median(r["p99_ms"] for r in results),
        }
        for name, results in runs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--warmup",
        type=float,
        default=8,
        help="seconds of other blocks before each measured run (0: none)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="ingestd worker processes, pinned to cores 0..N-1"
    )
    parser.add_argument("--wrk-core", default="1")
    parser.add_argument("--data-root", default=None, help="where ingestd stores during runs")
    parser.add_argument(
        "--before-tree",
        type=Path,
        default=None,
        help="checkout the 'before' server runs ingestd from",
    )
    parser.add_argument("--only", choices=["wattmon", "json"], default=None)
    parser.add_argument(
        "--servers",
        default="baseline,ingestd",
        help="comma-separated, of: "
        + "; ".join(f"{name}: {what}" for name, what in SERVERS.items()),
    )
    args = parser.parse_args()
    names = args.servers.split(",")
    if unknown := set(names) - SERVERS.keys():
        parser.error(f"unknown server(s): {', '.join(sorted(unknown))}")
    if "before" in names and args.before_tree is None:
        parser.error("--servers before needs --before-tree")
    if "ceiling" in names and args.workers != 1:
        parser.error("the ceiling server runs in one process: use --workers 1")
    if not (BODIES / "wattmon.txt").exists():
        subprocess.run(
            [sys.executable, str(HERE / "gen_bodies.py"), "--out", str(BODIES)], check=True
        )
    if not (WARM_BODIES / "wattmon.txt").exists():
        subprocess.run(
            [
                sys.executable,
                str(HERE / "gen_bodies.py"),
                "--out",
                str(WARM_BODIES),
                "--start",
                "1000000",
                "--count",
                "100000",
            ],
            check=True,
        )
    columns = [c for c in COLUMNS if args.only in (None, c[1])]
    by_column = [measure(names, column, args) for column in columns]
    table = {
        name: [cells.get(name) for cells in by_column]
        for name in names
        if any(serves(name, c[1]) for c in columns)
    }
    print(
        f"\n{args.runs} runs x {args.seconds} s after {args.warmup:g} s of warm-up, "
        f"{args.connections} connections, "
        f"server on {args.workers} core(s), wrk on core {args.wrk_core}; "
        f"requests/s (median), p99 latency\n"
    )
    print_table(table, columns)
    errors = sum(c["errors"] for cells in table.values() for c in cells if c is not None)
    if errors:
        print(
            f"\nwarning: {errors} errors (non-2xx, connect, read) during the runs", file=sys.stderr
        )


if __name__ == "__main__":
    main()
