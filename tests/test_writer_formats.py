"""The writer's fast path against the plain definitions: log frames as
`Frame.encode` makes them, key lines, rotation as `next_file` decides it,
rolled-back writes voided in the log."""

from __future__ import annotations

import os
import random
import shutil

import pytest

from ingestd.config import StorageConfig
from ingestd.errors import StorageFailed
from ingestd.records import Outcome, Record
from ingestd.sinks.file.device import KEYS_NAME, DeviceFiles, Settings
from ingestd.sinks.file.rotation import FileName, OpenFile, next_file, period_of
from ingestd.sinks.file.sink import FileSink
from ingestd.sinks.file.wal import WAL_NAME, Frame, WriteAheadLog, read_log

T0 = 1_795_248_000.0  # 2026-11-21T08:00:00Z
HEADER = b"Time,A\n"


def record(device: str, i: int, *, key: bool = True, header: bytes = HEADER) -> Record:
    return Record(
        "wattmon",
        device,
        T0 + i * 0.125,
        b"2026-11-21 08:00:00,%d\n" % i,
        header=header,
        dedup_key=f"{i:032x}" if key else None,
    )


def test_append_writes_is_byte_for_byte_frame_encode(tmp_path):
    writes = [
        ("wattmon/001122334455/2026-11-21.csv", 0, f"{1:032x} {T0:.3f}\n", b"Time\n1\n"),
        ("json/s/2026-11-21.jsonl", 12345, f"- {T0 + 0.25:.3f}\n", b'{"a":1}\n'),
        ("wattmon/001122334455/2026-11-21.csv", 7, f"{1:032x} {T0:.3f}\n", b""),  # a void
    ]
    log = WriteAheadLog(tmp_path, sync=False, epoch=41)
    log.append_writes(writes)
    log.close()
    frames = [
        Frame(".", 0, None, 0.0, b""),
        Frame("wattmon/001122334455/2026-11-21.csv", 0, f"{1:032x}", T0, b"Time\n1\n"),
        Frame("json/s/2026-11-21.jsonl", 12345, None, T0 + 0.25, b'{"a":1}\n'),
        Frame("wattmon/001122334455/2026-11-21.csv", 7, f"{1:032x}", T0, b""),
    ]
    expected = b"".join(frame.encode(42) for frame in frames)
    assert (tmp_path / WAL_NAME).read_bytes()[: len(expected)] == expected
    assert read_log(tmp_path) == (43, frames[1:])  # 43: the other, empty, log file


def test_log_frames_key_lines_and_files(tmp_path):
    sink = FileSink(tmp_path, StorageConfig(fsync="never"))
    sink._open_blocking()
    a, b = "001122334455", "00112233445a"
    batch = [
        record(a, 0),
        record(b, 1),
        record(a, 2, key=False),
        record(a, 0),
        record(b, 3),
    ]
    assert sink._commit_blocking(batch) == [Outcome.STORED] * 3 + [Outcome.DUPLICATE] + [
        Outcome.STORED
    ]
    assert sink._commit_blocking([record(b, 1), record(a, 4)]) == [
        Outcome.DUPLICATE,
        Outcome.STORED,
    ]
    _, frames = read_log(tmp_path)
    row = len(b"2026-11-21 08:00:00,0\n")
    # Frames go device by device, in the order devices first appear.
    expected = [
        (a, 0, f"{0:032x}", 0, HEADER + batch[0].payload),
        (a, len(HEADER) + row, None, 2, batch[2].payload),
        (b, 0, f"{1:032x}", 1, HEADER + batch[1].payload),
        (b, len(HEADER) + row, f"{3:032x}", 3, batch[4].payload),
        (a, len(HEADER) + 2 * row, f"{4:032x}", 4, record(a, 4).payload),
    ]
    assert frames == [
        Frame(f"wattmon/{dev}/2026-11-21.csv", offset, key, T0 + i * 0.125, data)
        for dev, offset, key, i, data in expected
    ]
    assert sink.current_file("wattmon", a) == f"wattmon/{a}/2026-11-21.csv"
    sink._close_blocking()
    for dev, keys in ((a, [0, 4]), (b, [1, 3])):
        folder = tmp_path / "wattmon" / dev
        lines = "".join(f"{i:032x} {T0 + i * 0.125:.3f}\n" for i in keys)
        assert (folder / KEYS_NAME).read_text() == lines
        data = b"".join(data for d, _, _, _, data in expected if d == dev)
        assert (folder / "2026-11-21.csv").read_bytes() == data


def test_a_failed_write_is_rolled_back_and_voided(tmp_path, monkeypatch):
    sink = FileSink(tmp_path / "live", StorageConfig(fsync="never"))
    sink._open_blocking()
    a, b = "001122334455", "00112233445a"
    assert sink._commit_blocking([record(a, 0)]) == [Outcome.STORED]
    real_write = os.write

    def write(fd: int, data: bytes) -> int:
        if b",13\n" in bytes(data):
            raise OSError(28, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    results = sink._commit_blocking([record(a, 12), record(b, 1), record(a, 13), record(a, 12)])
    assert results[1] is Outcome.STORED
    assert all(isinstance(r, StorageFailed) for r in results[:1] + results[2:])
    monkeypatch.undo()
    shutil.copytree(tmp_path / "live", tmp_path / "image")
    _, frames = read_log(tmp_path / "live")
    written = [f for f in frames if f.data and f"/{a}/" in f.relpath][1:]
    voids = [f for f in frames if not f.data]
    assert [f.offset for f in written] == [f.offset for f in reversed(voids)]
    assert [(f.relpath, f.key, f.received_at) for f in reversed(voids)] == [
        (f.relpath, f.key, f.received_at) for f in written
    ]
    sink._close_blocking()
    folder = tmp_path / "live" / "wattmon" / a
    assert (folder / "2026-11-21.csv").read_bytes() == HEADER + record(a, 0).payload
    assert (folder / KEYS_NAME).read_text() == f"{0:032x} {T0:.3f}\n"
    # A replay of the crash image neither restores the rows nor their keys.
    replayed = FileSink(tmp_path / "image", StorageConfig(fsync="never"))
    replayed._open_blocking()
    replayed._close_blocking()
    folder = tmp_path / "image" / "wattmon" / a
    assert (folder / "2026-11-21.csv").read_bytes() == HEADER + record(a, 0).payload
    # (Key 0 twice: dropping the device wrote it, and the log has it too.)
    assert set((folder / KEYS_NAME).read_text().splitlines()) == {f"{0:032x} {T0:.3f}"}


@pytest.mark.parametrize("seed", range(20))
def test_planning_follows_the_rotation_policy(tmp_path, seed):
    """Random headers, sizes and clocks (stepping back too): every record goes
    where `next_file` says, at the offset the plain model says."""
    rng = random.Random(seed)
    period = rng.choice(["day", "hour"])
    settings = Settings(period, rng.choice([50, 200, 1000]), 1000, 3600.0)
    device = DeviceFiles(tmp_path, "wattmon/001122334455", "csv", settings)
    current: OpenFile | None = None
    ts = T0
    for i in range(300):
        ts += rng.choice([0.0, 1.0, 1800.0, 5000.0, -4000.0])
        header = rng.choice([b"", b"Time,A\n", b"Time,A,B\n"])
        payload = b"x" * rng.choice([1, 10, 40, 120]) + b"\n"
        rec = Record("wattmon", "001122334455", ts, payload, header=header, dedup_key=f"{i:032x}")
        record_period = period_of(ts, period)  # type: ignore[arg-type]
        planned = device.plan(rec, record_period)
        assert planned is not None
        target = next_file(
            current,
            record_period=record_period,
            header=header,
            add_bytes=len(payload),
            max_file_bytes=settings.max_file_bytes,
            ext="csv",
        )
        if target is not None:
            current = OpenFile(target, 0, header)
        assert current is not None
        data = header + payload if current.size == 0 and header else payload
        new_header = header if current.size == 0 and header else current.header
        relpath, offset, tail, planned_data, line, name = planned
        assert (name, offset, planned_data) == (current.name, current.size, data)
        assert relpath == f"wattmon/001122334455/{current.name.name}"
        assert line == tail == f"{i:032x} {ts:.3f}\n"
        current = OpenFile(current.name, current.size + len(data), new_header)
        assert device.current == current
    assert isinstance(current.name, FileName)
