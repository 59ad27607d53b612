"""Shared by the bench scripts: start ingestd, make Wattmon posts, percentiles."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote_plus

HEADER = "Time,V1,V2,V3,I1,I2,I3,P,E,T,Hz"


def block(device: int, seq: int, rows: int = 15) -> str:
    lines = [HEADER]
    for r in range(rows):
        t = seq * rows + r
        lines.append(
            f"2026-11-21 {t // 60 % 24:02d}:{t % 60:02d}:00,{device},{seq},{r},1,2,3,4,5,6,7"
        )
    return "\r\n".join(lines) + "\r\n"


def mac(device: int) -> str:
    return f"0250c2{device:06x}"


def form(device: int, seq: int) -> bytes:
    data = block(device, seq)
    md5 = hashlib.md5(data.encode()).hexdigest()
    return f"key={mac(device)}&md5sum={md5}&data={quote_plus(data)}".encode()


def serve_command(
    config: Path, data_dir: Path, listen: str, daemon: tuple[str, ...] = ("-m", "ingestd")
) -> list[str]:
    """`ingestd serve` (or a script that wraps it, as `daemon`) on `listen`."""
    return [
        sys.executable,
        *daemon,
        "serve",
        "--config",
        str(config),
        "--listen",
        listen,
        "--data-dir",
        str(data_dir),
    ]


def start_ingestd(
    data_dir: Path, config: str = "", cores: str | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """ingestd on an ephemeral port; returns the process and the port."""
    config_path = data_dir.parent / "bench-ingestd.toml"
    config_path.write_text(config)
    command = serve_command(config_path, data_dir, "127.0.0.1:0")
    if cores:
        command = ["taskset", "-c", cores, *command]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    while True:
        line = proc.stderr.readline()
        if not line:
            raise RuntimeError("ingestd exited")
        match = re.search(rb"listening address=\S+:(\d+)", line)
        if match:
            # Keep reading its log, or a full pipe would stall its logging.
            log = open(data_dir.parent / "ingestd.log", "wb")  # noqa: SIM115
            threading.Thread(
                target=shutil.copyfileobj, args=(proc.stderr, log), daemon=True
            ).start()
            return proc, int(match[1])


def stop_ingestd(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and its children (the workers)."""
    total = 0
    pids = [pid]
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as fh:
            pids += [int(child) for child in fh.read().split()]
    for p in pids:
        with open(f"/proc/{p}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
    return total


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def now() -> float:
    return time.perf_counter()
