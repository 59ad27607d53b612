"""Start-up after an unclean stop: the write-ahead log restores what was
acknowledged and cuts what was not. The crash image is a copy of the data
directory taken while the sink was running (files not yet checkpointed)."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

from conftest import make_config

from ingestd.protocols.wattmon import split_block
from ingestd.records import Outcome, Record
from ingestd.sinks.file.housekeeping import compress_file
from ingestd.sinks.file.sink import FileSink
from ingestd.sinks.file.wal import WAL_NAME, Frame, decode_frames, read_log

T0 = 1_795_248_000.0
MAC = "001122334455"


def record(i: int, key: str | None = None) -> Record:
    header, rows, count = split_block(f"Time,Seq\n2026-11-21 08:00:{i:02d},{i}\n".encode())
    return Record(
        "wattmon", MAC, T0 + i, rows, header=header, dedup_key=key or f"{i:032x}", count=count
    )


async def open_sink(data_dir: Path) -> FileSink:
    sink = FileSink(data_dir, make_config(data_dir).storage)
    await sink.open()
    return sink


async def crash_image(tmp_path: Path, batches: list[list[Record]]) -> Path:
    """Commit `batches`, copy the data dir as a crash would leave it, then stop."""
    live = tmp_path / "live"
    sink = await open_sink(live)
    for batch in batches:
        assert set(await sink.commit(batch)) == {Outcome.STORED}
    image = tmp_path / "image"
    shutil.copytree(live, image)
    await sink.close()
    assert (await asyncio.to_thread(read_log, image))[1], "the image should need a replay"
    return image


def csv_file(data_dir: Path) -> Path:
    return data_dir / "wattmon" / MAC / "2026-11-21.csv"


EXPECTED = "Time,Seq\n" + "".join(f"2026-11-21 08:00:{i:02d},{i}\n" for i in range(4))


async def test_acknowledged_rows_lost_from_the_file_come_back(tmp_path):
    image = await crash_image(tmp_path, [[record(0), record(1)], [record(2), record(3)]])
    path = csv_file(image)
    path.write_bytes(path.read_bytes()[:15])  # the page cache never reached the disk
    sink = await open_sink(image)
    await sink.close()
    assert path.read_text() == EXPECTED


async def test_torn_unacknowledged_tail_is_cut(tmp_path, caplog):
    image = await crash_image(tmp_path, [[record(0), record(1), record(2), record(3)]])
    with open(csv_file(image), "ab") as fh:
        fh.write(b"2026-11-21 08:00:04,")  # a write that was cut by the crash
    sink = await open_sink(image)
    await sink.close()
    assert csv_file(image).read_text() == EXPECTED
    assert "torn_tail_cut" in caplog.text


async def test_torn_frame_at_the_end_of_the_log_is_ignored(tmp_path):
    image = await crash_image(tmp_path, [[record(0), record(1), record(2), record(3)]])
    frame = Frame(f"wattmon/{MAC}/2026-11-21.csv", 999, None, T0, b"never,acknowledged\n")
    epoch, _, end = decode_frames(await asyncio.to_thread((image / WAL_NAME).read_bytes))
    with open(image / WAL_NAME, "r+b") as fh:
        fh.seek(end)
        fh.write(frame.encode(epoch)[:-5])
    sink = await open_sink(image)
    await sink.close()
    assert csv_file(image).read_text() == EXPECTED


async def test_keys_survive_a_crash_so_resends_are_not_stored_twice(tmp_path):
    image = await crash_image(tmp_path, [[record(0), record(1), record(2), record(3)]])
    # The keys are written to their file at checkpoints: the log has them.
    (image / "wattmon" / MAC / ".ingestd-keys").unlink(missing_ok=True)
    sink = await open_sink(image)
    assert await sink.commit([record(2)]) == [Outcome.DUPLICATE]
    await sink.close()
    assert csv_file(image).read_text() == EXPECTED


async def test_log_paths_outside_the_data_dir_are_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    marker = Frame(".", 0, None, 0.0, b"")
    evil = Frame("wattmon/../../escape/2026-11-21.csv", 0, None, T0, b"x\n")
    (data / WAL_NAME).write_bytes(marker.encode(7) + evil.encode(7))
    sink = await open_sink(data)
    await sink.close()
    assert not (tmp_path / "escape").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


async def test_clean_stop_leaves_an_empty_log(tmp_path):
    sink = await open_sink(tmp_path / "d")
    await sink.commit([record(0)])
    await sink.close()
    assert (await asyncio.to_thread(read_log, tmp_path / "d"))[1] == []


@contextlib.contextmanager
def file_size_limit(max_bytes: int) -> Iterator[None]:
    """Writes past `max_bytes` fail with EFBIG, as on a filesystem quota."""
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_handler)


async def test_write_refused_after_logging_stays_refused_after_a_crash(tmp_path):
    live = tmp_path / "live"
    sink = await open_sink(live)
    big = Record(
        "wattmon",
        MAC,
        T0,
        b"2026-11-21 07:00:00," + b"x" * 100_000 + b"\n",
        header=b"Time,Seq\n",
        dedup_key="f" * 32,
    )
    assert await sink.commit([big]) == [Outcome.STORED]
    await sink.close()  # the log is empty again; the device file is 100 KB
    sink = await open_sink(live)
    with file_size_limit(50_000):  # the small log write passes, the file write fails
        [refused] = await sink.commit([record(1)])
    assert not isinstance(refused, Outcome)  # answered 503: the device will resend
    image = tmp_path / "image"
    shutil.copytree(live, image)
    await sink.close()
    recovered = await open_sink(image)
    # The refused block was rolled back, so its resend is stored, not dropped.
    assert await recovered.commit([record(1)]) == [Outcome.STORED]
    await recovered.close()
    assert csv_file(image).read_bytes().count(b"2026-11-21 08:00:01,1\n") == 1


async def test_background_checkpoints_recycle_the_logs_and_replay_stays_exact(tmp_path):
    live = tmp_path / "live"
    config = make_config(live, checkpoint_interval_secs=0.01).storage
    sink = FileSink(live, config)
    await sink.open()
    for i in range(60):
        assert await sink.commit([record(i)]) == [Outcome.STORED]
        await asyncio.sleep(0.005)  # let background checkpoints come and go
    image = tmp_path / "image"
    await asyncio.to_thread(shutil.copytree, live, image)
    await sink.close()
    _, frames = await asyncio.to_thread(read_log, image)
    assert 0 < len(frames) < 60  # older writes were checkpointed and forgotten
    # Replaying what both logs still describe, in order, changes nothing.
    recovered = await open_sink(image)
    await recovered.close()
    expected = "Time,Seq\n" + "".join(f"2026-11-21 08:00:{i:02d},{i}\n" for i in range(60))
    assert csv_file(image).read_text() == expected


async def test_a_key_line_torn_by_the_crash_does_not_swallow_the_replayed_keys(tmp_path):
    image = await crash_image(tmp_path, [[record(0), record(1), record(2), record(3)]])
    keys = image / "wattmon" / MAC / ".ingestd-keys"
    # An earlier checkpoint's key write, cut mid-line by the crash.
    keys.write_bytes(b"%032x 1795247000.000\n" % 99 + b"%032x 17952" % 98)
    sink = await open_sink(image)
    # Every replayed key starts a line of its own, so each resend is known.
    assert await sink.commit([record(i) for i in range(4)]) == [Outcome.DUPLICATE] * 4
    await sink.close()
    assert keys.read_bytes().startswith(b"%032x 1795247000.000\n%032x " % (99, 0))
    assert csv_file(image).read_text() == EXPECTED


async def test_keys_of_a_file_compressed_before_the_crash_are_replayed(tmp_path):
    """Housekeeping gzipped a closed file whose blocks' keys were still only
    in the log: the replay skips the file but not its keys, so a resend of
    one of its blocks is still recognised."""
    image = await crash_image(tmp_path, [[record(0), record(1)]])
    keys = image / "wattmon" / MAC / ".ingestd-keys"
    keys.unlink(missing_ok=True)  # the checkpoint that writes them never came
    await asyncio.to_thread(compress_file, csv_file(image))
    sink = await open_sink(image)
    try:
        assert await sink.commit([record(1)]) == [Outcome.DUPLICATE]
    finally:
        await sink.close()
    assert not csv_file(image).exists()


async def test_a_recovery_cut_short_and_run_again_writes_each_key_once(tmp_path):
    """Power lost after a recovery synced its keys but before the log was
    reset: the next recovery must not append the same key lines again (each
    duplicate line would push a real key out of the dedup window)."""
    image = await crash_image(tmp_path, [[record(0), record(1)], [record(2), record(3)]])
    keys = image / "wattmon" / MAC / ".ingestd-keys"
    keys.unlink(missing_ok=True)
    sink = FileSink(image, make_config(image).storage)
    await asyncio.to_thread(sink.recover)  # the first recovery; the log stays
    await asyncio.to_thread(sink.recover)  # the second, after the cut
    lines = keys.read_text().splitlines()
    assert sorted(line.split()[0] for line in lines) == [f"{i:032x}" for i in range(4)]
