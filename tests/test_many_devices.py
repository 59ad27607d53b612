"""More devices than open handles: least recently used handles are closed."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from conftest import FORM, wattmon_form


def open_files_under(folder: Path) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(folder)):
            found.append(target)
    return found


async def test_handles_stay_bounded_with_more_devices_than_handles(start_client, tmp_path):
    client = await start_client(max_open_files=3)
    devices = [f"0000000000{n:02x}" for n in range(12)]
    most_open = 0
    for round_ in range(3):
        for mac in devices:
            block = f"Time,Round\n2026-11-21 08:00:0{round_},{round_}\n"
            resp = await client.post("/wattmon", data=wattmon_form(mac, block), headers=FORM)
            assert (resp.status, await resp.text()) == (200, "OK")
            held = await asyncio.to_thread(open_files_under, tmp_path / "data" / "wattmon")
            most_open = max(most_open, len(held))
    # Each open device holds its current file and its key file.
    assert 0 < most_open <= 2 * 3
    for mac in devices:
        lines = (tmp_path / "data" / "wattmon" / mac / "2026-11-21.csv").read_text().splitlines()
        assert lines == ["Time,Round"] + [f"2026-11-21 08:00:0{r},{r}" for r in range(3)]
    # Resends are still recognised for devices whose handles were closed.
    block = "Time,Round\n2026-11-21 08:00:00,0\n"
    resp = await client.post("/wattmon", data=wattmon_form(devices[0], block), headers=FORM)
    assert resp.status == 200
    text = (tmp_path / "data" / "wattmon" / devices[0] / "2026-11-21.csv").read_text()
    assert text.count("08:00:00") == 1
