"""The power-cut filesystem itself: what each mode keeps, on a real mount."""

from __future__ import annotations

import asyncio
import fcntl
import os
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from disk import DurableDisk

pytestmark = pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="needs /dev/fuse")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes, *, sync: bool = True) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        if sync:
            os.fsync(fh.fileno())


def tree(root: Path) -> dict[str, bytes | None]:
    """Every entry under `root`: file contents, None for a directory."""
    return {
        str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
async def start_disk(tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    disks: list[DurableDisk] = []

    async def start(mode: str = "strict", *, torn: bool = False) -> DurableDisk:
        disk = DurableDisk(tmp_path / f"work{len(disks)}", mode=mode, torn=torn)
        disks.append(disk)
        await disk.mount()
        return disk

    yield start
    for disk in disks:
        await disk.unmount()


async def cut_after(disk: DurableDisk, actions: Callable[[Path], None], seed: int = 0) -> Path:
    await asyncio.to_thread(actions, disk.mountpoint)
    await disk.freeze()
    await disk.cut(seed)
    return disk.live


async def test_strict_a_synced_file_needs_its_directory_synced(start_disk) -> None:
    disk = await start_disk("strict")

    def actions(mnt: Path) -> None:
        (mnt / "kept").mkdir()
        fsync_dir(mnt)
        write_file(mnt / "kept" / "a", b"synced file, synced folder")
        fsync_dir(mnt / "kept")
        write_file(mnt / "b", b"synced file, folder not synced")
        (mnt / "new").mkdir()  # folder not synced
        write_file(mnt / "kept" / "c", b"never synced", sync=False)

    image = await cut_after(disk, actions)
    assert tree(image) == {"kept": None, "kept/a": b"synced file, synced folder"}


async def test_strict_data_durable_up_to_the_last_fsync(start_disk) -> None:
    disk = await start_disk("strict")

    def actions(mnt: Path) -> None:
        write_file(mnt / "log", b"one\n")
        fsync_dir(mnt)
        fd = os.open(mnt / "log", os.O_WRONLY | os.O_APPEND)
        os.write(fd, b"two\n")
        os.fdatasync(fd)
        os.write(fd, b"three\n")  # lost
        os.close(fd)
        fd = os.open(mnt / "log", os.O_RDWR)
        os.pwrite(fd, b"ONE", 0)  # lost too
        os.close(fd)

    image = await cut_after(disk, actions)
    assert tree(image) == {"log": b"one\ntwo\n"}


async def test_truncate_is_undone_unless_synced(start_disk) -> None:
    disk = await start_disk("strict")

    def actions(mnt: Path) -> None:
        write_file(mnt / "a", b"0123456789")
        write_file(mnt / "b", b"0123456789")
        fsync_dir(mnt)
        os.truncate(mnt / "a", 4)
        with open(mnt / "b", "r+b") as fh:
            fh.truncate(4)
            os.fsync(fh.fileno())
        with open(mnt / "b", "r+b") as fh:
            fh.truncate(12)  # a hole, not synced
        with open(mnt / "a", "wb") as fh:  # O_TRUNC, not synced
            fh.write(b"x")

    image = await cut_after(disk, actions)
    assert tree(image) == {"a": b"0123456789", "b": b"0123"}


async def test_strict_rename_and_unlink_need_the_directory_synced(start_disk) -> None:
    disk = await start_disk("strict")

    def actions(mnt: Path) -> None:
        write_file(mnt / "old", b"old")
        write_file(mnt / "gone", b"gone")
        fsync_dir(mnt)
        write_file(mnt / "tmp", b"new")
        os.replace(mnt / "tmp", mnt / "old")  # directory not synced
        os.unlink(mnt / "gone")

    image = await cut_after(disk, actions)
    assert tree(image) == {"gone": b"gone", "old": b"old"}

    def again(mnt: Path) -> None:
        write_file(mnt / "tmp", b"new")
        os.replace(mnt / "tmp", mnt / "old")
        os.unlink(mnt / "gone")
        fsync_dir(mnt)

    image = await cut_after(disk, again)
    assert tree(image) == {"old": b"new"}


async def test_journal_commits_namespace_changes_on_any_fsync(start_disk) -> None:
    disk = await start_disk("journal")

    def actions(mnt: Path) -> None:
        (mnt / "d").mkdir()
        write_file(mnt / "b", b"data not synced", sync=False)
        write_file(mnt / "d" / "a", b"synced")  # fsync: commits the mkdirs and creates
        os.mkdir(mnt / "after")  # after the last commit: lost

    image = await cut_after(disk, actions)
    assert tree(image) == {"b": b"", "d": None, "d/a": b"synced"}


async def test_journal_fdatasync_commits_only_for_a_new_size(start_disk) -> None:
    disk = await start_disk("journal")

    def actions(mnt: Path) -> None:
        write_file(mnt / "wal", bytes(8))
        os.mkdir(mnt / "x")  # not committed: the next fdatasync keeps the size
        fd = os.open(mnt / "wal", os.O_RDWR)
        os.pwrite(fd, b"abcd", 0)
        os.fdatasync(fd)
        os.close(fd)

    image = await cut_after(disk, actions)
    assert tree(image) == {"wal": b"abcd" + bytes(4)}


async def test_torn_cut_keeps_a_prefix_of_the_unsynced_writes(start_disk) -> None:
    disk = await start_disk("strict", torn=True)
    full = b"".join(b"%d\n" % i for i in range(10))
    seen = set()
    for seed in range(8):

        def actions(mnt: Path) -> None:
            write_file(mnt / "f", b"")
            fsync_dir(mnt)
            fd = os.open(mnt / "f", os.O_WRONLY | os.O_APPEND)
            for i in range(10):
                os.write(fd, b"%d\n" % i)
            os.close(fd)

        image = await cut_after(disk, actions, seed)
        data = (image / "f").read_bytes()
        assert full.startswith(data), data
        seen.add(len(data))
        await asyncio.to_thread(os.unlink, disk.mountpoint / "f")
    assert len(seen) > 2, seen  # different prefixes, not all or nothing


async def test_freeze_fails_every_operation(start_disk) -> None:
    disk = await start_disk("strict")
    await asyncio.to_thread(write_file, disk.mountpoint / "a", b"a")
    await disk.freeze()
    with pytest.raises(OSError) as info:
        await asyncio.to_thread(write_file, disk.mountpoint / "b", b"b")
    assert info.value.errno == 5  # EIO


async def test_armed_sync_freezes_after_that_many_syncs(start_disk) -> None:
    disk = await start_disk("strict")
    await disk.arm("sync", 2)

    def actions(mnt: Path) -> None:
        write_file(mnt / "a", b"a")
        fsync_dir(mnt)  # the second: freezes after it
        with pytest.raises(OSError):
            write_file(mnt / "b", b"b")

    image = await cut_after(disk, actions)
    assert disk.tripped.is_set() is False  # a new generation: a new event
    assert tree(image) == {"a": b"a"}


async def test_flock_is_exclusive_across_processes(start_disk) -> None:
    """The kernel keeps flock locks for a FUSE mount that does not: a second
    process cannot take a lock the first holds."""
    disk = await start_disk("strict")
    path = disk.mountpoint / "ingestd.lock"
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import fcntl, sys; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX);"
        "print('held', flush=True); sys.stdin.read()",
        str(path),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        assert await holder.stdout.readline() == b"held\n"

        def try_lock() -> None:
            with open(path, "a") as fh, pytest.raises(BlockingIOError):
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)

        await asyncio.to_thread(try_lock)
    finally:
        holder.kill()
        await holder.communicate()
