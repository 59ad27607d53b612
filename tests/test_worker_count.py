"""`server.workers = 0` resolved for the machine: one worker per core."""

from __future__ import annotations

import os

import pytest
from daemon import DaemonProcess, children, serve_command

from ingestd.runtime.daemon import worker_count


@pytest.mark.parametrize(
    ("configured", "cores", "expected"),
    [(0, 1, 1), (0, 2, 2), (0, 4, 4), (0, 16, 16), (1, 16, 1), (3, 2, 3)],
)
def test_default_is_one_worker_per_core(configured: int, cores: int, expected: int) -> None:
    assert worker_count(configured, cores) == expected


@pytest.mark.parametrize("cores", ["one", "all"])
async def test_serve_with_no_config_starts_a_worker_per_usable_core(tmp_path, cores) -> None:
    """The README's `ingestd serve` on its embedded defaults: one worker
    process per core it may use (as taskset limits it), a single process
    on one core."""
    allowed = sorted(os.sched_getaffinity(0))
    cpus = str(allowed[0]) if cores == "one" else ",".join(map(str, allowed))
    expected = len(cpus.split(","))
    daemon = await DaemonProcess.start(
        argv=[
            "taskset",
            "-c",
            cpus,
            *serve_command("--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data")),
        ]
    )
    try:
        assert f"workers={expected} " in daemon.lines[-1], daemon.lines
        # Started before the port is announced; taskset execs, so its pid is the daemon's.
        assert len(children(daemon.proc.pid)) == (expected if expected > 1 else 0)
    finally:
        assert await daemon.stop() == 0, daemon.lines
