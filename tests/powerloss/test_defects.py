"""Issue 12, defects 1-4: one power cut (or two) at the moment each missing
fsync mattered, on the strict POSIX model, against the real daemon.

Each test posts a few blocks, cuts where the defect lost or doubled them, and
checks the data directory: every acknowledged block there exactly once. No
checkpoint runs (the interval is an hour), so only the code path under test
makes anything durable.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from cycles import Ingestd
from disk import DurableDisk, fresh_work
from fleet import Device, Stream, Tally, check_device, check_stream, post_block, post_doc

pytestmark = [
    pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="needs /dev/fuse"),
    pytest.mark.timeout(120),
]
START_TIMEOUT = 30.0
BLOCKS = 3
CONFIG = (
    "[server]\n"
    "workers = 1\n"
    "shutdown_timeout_secs = 5\n"
    "[storage]\n"
    'fsync = "always"\n'
    # No checkpoint, no housekeeping: nothing else syncs behind the test's back.
    "checkpoint_interval_secs = 3600\n"
    "housekeeping_interval_secs = 3600\n"
    "compress = false\n"
)


@pytest.fixture
async def disk(tmp_path: Path) -> AsyncIterator[DurableDisk]:
    async with DurableDisk(fresh_work(tmp_path / "work"), mode="strict") as mounted:
        yield mounted


async def start(disk: DurableDisk, data_dir: Path) -> Ingestd:
    """The daemon on `data_dir` (under the mount), listening."""
    config = disk.work / "ingestd.toml"
    config.write_text(CONFIG)
    daemon = await Ingestd.start(data_dir, config)
    listening = asyncio.create_task(daemon.listening.wait())
    exited = asyncio.create_task(daemon.proc.wait())
    await asyncio.wait(
        [listening, exited], timeout=START_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
    )
    listening.cancel()
    exited.cancel()
    if not daemon.listening.is_set():
        await daemon.kill_group()
        raise AssertionError(f"daemon did not start:\n{daemon.log()}")
    return daemon


async def power_cut(disk: DurableDisk, daemon: Ingestd | None) -> None:
    """Freeze (unless an armed freeze did), kill, keep the durable image only."""
    if not disk.tripped.is_set():
        await disk.freeze()
    if daemon is not None:
        await daemon.kill_group()
    await disk.cut(seed=0)


async def send(daemon: Ingestd, device: Device, count: int = BLOCKS) -> None:
    """`count` new blocks, each answered OK."""
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            block = device.next_block()
            await post_block(session, daemon.base, block)
            device.acknowledge(block)


async def resend_all(daemon: Ingestd, device: Device) -> None:
    """Every block again, as a device that never saw its OKs would: each
    must be answered OK (and, being stored already, stored no second time)."""
    async with aiohttp.ClientSession() as session:
        for seq in sorted(device.blocks):
            await post_block(session, daemon.base, device.blocks[seq])


async def stop(daemon: Ingestd) -> None:
    code = await daemon.stop()
    assert code == 0, daemon.log()


def assert_once(tally: Tally) -> None:
    assert tally.clean, f"{tally.counts()}: {tally.problems} {sorted(tally.corrupt)}"


def new_device(index: int = 1) -> Device:
    return Device(index, random.Random(index))


async def test_replayed_keys_survive_a_second_cut(disk: DurableDisk) -> None:
    """Defect 1: recovery wrote the replayed key lines to a buffered file and
    fsynced it before the buffer was flushed, then emptied the log; a second
    cut lost the keys, and a resend of an acknowledged block was stored again."""
    data_dir = disk.mountpoint
    device = new_device()
    daemon = await start(disk, data_dir)
    await send(daemon, device)
    await power_cut(disk, daemon)  # the keys are in the log only
    daemon = await start(disk, data_dir)  # the replay writes them to the key file
    await power_cut(disk, daemon)  # the log was emptied: the key file alone has them
    daemon = await start(disk, data_dir)
    await resend_all(daemon, device)
    await stop(daemon)
    assert_once(check_device(disk.live / "wattmon" / device.folder, device, complete=True))


async def test_blocks_acknowledged_on_a_fresh_install_survive_a_cut(disk: DurableDisk) -> None:
    """Defect 2: the data directory and the log files in it were made durable
    only by the first checkpoint; a cut before it lost the acknowledged
    blocks with their log. The data directory is one level below the mount
    root, so the daemon creates it (as on a fresh install)."""
    device = new_device()
    daemon = await start(disk, disk.mountpoint / "data")
    await send(daemon, device)
    await power_cut(disk, daemon)
    daemon = await start(disk, disk.mountpoint / "data")
    await stop(daemon)
    assert_once(check_device(disk.live / "data" / "wattmon" / device.folder, device, complete=True))


async def test_new_device_survives_a_cut_after_a_clean_stop(disk: DurableDisk) -> None:
    """Defect 3: a clean stop synced the files and the device's folder but not
    the folders above it (new since the last checkpoint), then emptied the
    log; a later cut took the device's folder with its data."""
    data_dir = disk.mountpoint
    device = new_device()
    daemon = await start(disk, data_dir)
    await send(daemon, device)
    await stop(daemon)
    await power_cut(disk, None)
    daemon = await start(disk, data_dir)
    await stop(daemon)
    assert_once(check_device(disk.live / "wattmon" / device.folder, device, complete=True))


async def test_folders_recovery_recreates_survive_a_cut_after_the_log_is_emptied(
    disk: DurableDisk,
) -> None:
    """Defect 4: recovery re-created `wattmon/` and `json/`, fsynced each
    device folder and its parent but not the data directory, then emptied
    the log. The second cut comes right after the log is emptied (its first
    fdatasync), before anything else could sync the data directory."""
    data_dir = disk.mountpoint
    device = new_device()
    stream = Stream("meter")
    daemon = await start(disk, data_dir)
    await send(daemon, device)
    async with aiohttp.ClientSession() as session:
        n = stream.next_doc()
        await post_doc(session, daemon.base, stream, n)
        stream.acknowledge(n)
    await power_cut(disk, daemon)  # no checkpoint: `wattmon/` and `json/` are gone
    await disk.arm("datasync", 1)  # recovery uses fsync; the log's reset, fdatasync
    config = disk.work / "ingestd.toml"
    daemon = await Ingestd.start(data_dir, config)
    async with asyncio.timeout(START_TIMEOUT):
        await disk.tripped.wait()
    await power_cut(disk, daemon)
    daemon = await start(disk, data_dir)
    await stop(daemon)
    assert_once(check_device(disk.live / "wattmon" / device.folder, device, complete=True))
    assert_once(check_stream(disk.live / "json" / stream.name, stream, complete=True))
