"""A quarantine write that fails must not disturb its device's other records
in the same batch (found in review: it dropped the device's state mid-batch)."""

from __future__ import annotations

import hashlib

from ingestd.config import StorageConfig
from ingestd.errors import StorageFailed
from ingestd.records import Outcome, Quarantined, Record
from ingestd.sinks.file.sink import FileSink
from ingestd.sinks.file.wal import read_log

HEADER = b"Time,V\n"
DEVICE = "001122334455"


def block(i: int) -> Record:
    rows = f"2026-11-21 00:0{i}:00,{i}\n".encode()
    return Record(
        "wattmon", DEVICE, 1_795_248_000.0 + i, rows, HEADER, hashlib.md5(rows).hexdigest(), 1
    )


def test_failed_quarantine_leaves_the_devices_other_writes_whole(tmp_path):
    """Stored, failed quarantine, stored, for one device in one batch: the two
    blocks are stored in order, the bad one is refused, and a replay of the
    log (as after a crash) gives the same file."""
    (tmp_path / "quarantine").write_text("not a folder")  # every quarantine write fails
    sink = FileSink(tmp_path, StorageConfig())
    sink._open_blocking()
    bad = Quarantined("wattmon", DEVICE, 1_795_248_000.5, b"Time,V\n1,2,3\n", "bad CSV", "ab" * 16)
    results = sink._commit_blocking([block(1), bad, block(2)])
    assert results[0] is Outcome.STORED and results[2] is Outcome.STORED
    assert isinstance(results[1], StorageFailed)
    stored = tmp_path / "wattmon" / DEVICE / "2026-11-21.csv"
    expected = HEADER + block(1).payload + block(2).payload
    assert stored.read_bytes() == expected
    # The next batch appends after them, not over them.
    assert sink._commit_blocking([block(3)]) == [Outcome.STORED]
    assert stored.read_bytes() == expected + block(3).payload
    _, frames = read_log(tmp_path)
    assert [(f.offset, f.data) for f in frames if f.data] == [
        (0, HEADER + block(1).payload),
        (len(HEADER + block(1).payload), block(2).payload),
        (len(expected), block(3).payload),
    ]


def test_quarantine_never_builds_a_path_from_an_unchecked_device_id(tmp_path):
    """A quarantined block whose device id is not one (parsers never make
    such a block; defence in depth) is refused alone: nothing is written
    outside the device folders, and the batch's other records are stored."""
    outside = tmp_path / "outside"
    data_dir = tmp_path / "data"
    sink = FileSink(data_dir, StorageConfig())
    sink._open_blocking()
    hostile = Quarantined(
        "wattmon", "../../../outside", 1_795_248_000.5, b"x\n", "bad CSV", "cd" * 16
    )
    results = sink._commit_blocking([block(1), hostile])
    assert results[0] is Outcome.STORED
    assert isinstance(results[1], StorageFailed)
    assert not outside.exists()
    assert not (data_dir / "quarantine").exists()
    sink._close_blocking()
