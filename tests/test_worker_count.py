"""`server.workers = 0` resolved for the machine: one worker per core."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ingestd.runtime.daemon import usable_cores, worker_count


@pytest.mark.parametrize(
    ("configured", "cores", "expected"),
    [(0, 1, 1), (0, 2, 2), (0, 4, 4), (0, 16, 16), (1, 16, 1), (3, 2, 3)],
)
def test_default_is_one_worker_per_core(configured: int, cores: int, expected: int) -> None:
    assert worker_count(configured, cores) == expected


def test_usable_cores_follow_the_affinity_not_the_machine() -> None:
    """Under `taskset -c 0` (or systemd's CPUAffinity=) the default is one
    process even on a many-core machine."""
    script = "from ingestd.runtime.daemon import usable_cores; print(usable_cores())"
    one = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
    )
    assert one.stdout.strip() == "1"
    assert usable_cores() == len(os.sched_getaffinity(0))
