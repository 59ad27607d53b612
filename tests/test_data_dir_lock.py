"""One daemon per data directory: a second `ingestd serve` touches nothing."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
import urllib.parse
from pathlib import Path

import aiohttp
import pytest
from daemon import DaemonProcess, write_config

from ingestd.sinks.file.lock import LOCK_NAME, DataDirLock, DataDirLocked

HEADER = "Time,Value"


def form(mac: str, seq: int) -> str:
    data = f"{HEADER}\n2026-11-21 08:{seq // 60:02d}:{seq % 60:02d},{seq}\n"
    md5 = hashlib.md5(data.encode()).hexdigest()
    return urllib.parse.urlencode({"key": mac, "md5sum": md5, "data": data})


def snapshot(data_dir: Path) -> dict[str, tuple[bytes, int]]:
    """Every file's bytes and modification time."""
    return {
        str(path.relative_to(data_dir)): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(data_dir.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize("workers", [1, 2])
async def test_second_instance_exits_naming_the_holder_and_touches_nothing(
    tmp_path: Path, workers: int
) -> None:
    data_dir = tmp_path / "data"
    config = write_config(
        tmp_path / "ingestd.toml",
        f'[server]\nlisten = "127.0.0.1:0"\nworkers = {workers}\n'
        f'[storage]\ndata_dir = "{data_dir}"\ncheckpoint_interval_secs = 3600\n',
    )
    first = await DaemonProcess.start("--config", str(config))
    try:
        async with aiohttp.ClientSession() as session:
            for seq in range(5):
                async with session.post(
                    f"{first.url}/wattmon",
                    data=form("00:11:22:33:44:55", seq),
                    headers={"Content-Type": "application/x-www-form-urlencoded"},
                ) as response:
                    assert (response.status, await response.text()) == (200, "OK")
            # The log holds these blocks (no checkpoint for an hour): a
            # second instance that replayed it would rewrite the files.
            before = snapshot(data_dir)
            assert any(name.endswith(".csv") for name in before)

            second = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "ingestd",
                "serve",
                "--config",
                str(config),
                stderr=asyncio.subprocess.PIPE,
            )
            _, err = await asyncio.wait_for(second.communicate(), 30)
            assert second.returncode != 0
            assert f"pid {first.proc.pid}" in err.decode(), err.decode()
            assert snapshot(data_dir) == before

            # The first one serves on, and stores.
            async with session.post(
                f"{first.url}/wattmon",
                data=form("00:11:22:33:44:55", 99),
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            ) as response:
                assert (response.status, await response.text()) == (200, "OK")
    finally:
        assert await first.stop() == 0


async def test_the_lock_dies_with_its_holder(tmp_path: Path) -> None:
    """kill -9 leaves no stale lock: the next start takes it."""
    data_dir = tmp_path / "data"
    config = write_config(
        tmp_path / "ingestd.toml",
        f'[server]\nlisten = "127.0.0.1:0"\nworkers = 1\n[storage]\ndata_dir = "{data_dir}"\n',
    )
    first = await DaemonProcess.start("--config", str(config))
    first.signal(signal.SIGKILL)
    await first.proc.wait()
    assert (data_dir / LOCK_NAME).read_text().strip() == str(first.proc.pid)
    second = await DaemonProcess.start("--config", str(config))
    assert await second.stop() == 0


def test_lock_names_the_holder_pid(tmp_path: Path) -> None:
    held = DataDirLock(tmp_path)
    held.acquire()
    try:
        with pytest.raises(DataDirLocked, match=f"pid {os.getpid()}"):
            DataDirLock(tmp_path).acquire()
    finally:
        held.release()
    DataDirLock(tmp_path).acquire()  # free again
