"""Power cuts against the real daemon: every acknowledged record is there
exactly once after each restart (`-m powerloss` selects these; the long run
is `bench/powerloss.py`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cycles import CUT_KINDS, Cycles

pytestmark = [
    pytest.mark.powerloss,
    pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="needs /dev/fuse"),
    pytest.mark.timeout(300),
]


@pytest.mark.parametrize(
    ("mode", "torn", "workers", "seed"),
    [
        ("strict", False, (1,), 11),
        ("strict", True, (2,), 12),
        ("journal", True, (1, 2), 13),
    ],
    ids=["strict-1-worker", "strict-torn-2-workers", "journal-torn-mixed"],
)
async def test_power_cuts_lose_and_duplicate_nothing_acknowledged(
    tmp_path: Path, mode: str, torn: bool, workers: tuple[int, ...], seed: int
) -> None:
    lines: list[str] = []
    cycles = Cycles(
        tmp_path,
        mode=mode,
        torn=torn,
        seed=seed,
        workers=workers,
        round_robin=True,
        log=lines.append,
    )
    report = await cycles.run(len(CUT_KINDS))
    clean = report.tally.clean
    assert clean, report.summary() + "\n" + "\n".join(line[:300] for line in lines[-40:])
    assert report.acked > 100, report.summary()  # real load was stored
