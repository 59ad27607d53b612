"""`server.workers = 0` resolved for the machine: never a loss on small boxes."""

from __future__ import annotations

import pytest

from ingestd.runtime.daemon import worker_count


@pytest.mark.parametrize(
    ("configured", "cores", "expected"),
    [(0, 1, 1), (0, 2, 1), (0, 4, 4), (0, 16, 16), (1, 16, 1), (3, 2, 3)],
)
def test_default_is_one_process_up_to_two_cores(configured: int, cores: int, expected: int) -> None:
    assert worker_count(configured, cores) == expected
