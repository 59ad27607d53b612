"""The harness catches broken storage: it must see these lose data, or it
proves nothing when the daemon passes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
from cycles import Cycles
from disk import DurableDisk

pytestmark = pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="needs /dev/fuse")
TOY = Path(__file__).with_name("toy_receiver.py")


async def test_fsync_never_loses_acknowledged_data(tmp_path: Path) -> None:
    """`fsync = "never"` answers OK before the data is durable: a cut loses some."""
    cycles = Cycles(tmp_path, fsync="never", kinds=("random",), seed=3, workers=(1,))
    report = await cycles.run(2)
    assert report.tally.lost, report.summary()


async def toy_run(tmp_path: Path, mode: str, *, sync_dir: bool, posts: int = 40) -> set[str]:
    """Post to the toy receiver, cut, and return the acknowledged names missing."""
    disk = DurableDisk(tmp_path, mode=mode)
    await disk.mount()
    args = [str(disk.mountpoint)] + (["--sync-dir"] if sync_dir else [])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(TOY), *args, stdout=asyncio.subprocess.PIPE, start_new_session=True
    )
    try:
        assert proc.stdout is not None
        port = int(await proc.stdout.readline())
        acked = set()
        async with aiohttp.ClientSession() as session:
            for i in range(posts):
                name = f"r{i}"
                async with session.post(f"http://127.0.0.1:{port}/", data=name) as resp:
                    if await resp.read() == b"OK":
                        acked.add(name)
        await disk.freeze()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
    await disk.cut(seed=0)
    try:
        return {name for name in acked if not (disk.live / name).is_file()}
    finally:
        await disk.unmount()


async def test_toy_without_directory_fsync_loses_data_in_strict_mode(tmp_path: Path) -> None:
    assert await toy_run(tmp_path, "strict", sync_dir=False)


async def test_toy_with_directory_fsync_keeps_everything_in_strict_mode(tmp_path: Path) -> None:
    assert await toy_run(tmp_path, "strict", sync_dir=True) == set()


async def test_toy_without_directory_fsync_keeps_everything_in_journal_mode(tmp_path: Path) -> None:
    """Where a file's fsync commits the journal, the directory entry goes with it."""
    assert await toy_run(tmp_path, "journal", sync_dir=False) == set()
