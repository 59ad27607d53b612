"""Storage sharded over worker processes, below the processes: the shard of a
device, the hand-off frames, and logs left by one shard count replayed by
another (workers may change across any restart)."""

from __future__ import annotations

import asyncio
import shutil
from collections import Counter
from pathlib import Path

from conftest import make_config
from hypothesis import given
from hypothesis import strategies as st

from ingestd.errors import RateLimited, StorageFailed
from ingestd.ingest.shards import shard_of
from ingestd.protocols.wattmon import split_block
from ingestd.records import Outcome, Quarantined, Record
from ingestd.runtime.handoff import decode_answer, decode_request, encode_answer, encode_request
from ingestd.sinks.file.sink import FileSink
from ingestd.sinks.file.wal import all_log_names, read_log

T0 = 1_795_248_000.0


def test_a_device_has_one_shard_whatever_the_process() -> None:
    # CRC32, not hash(): the same in every process and every run.
    assert shard_of("wattmon", "001122334455", 2) == shard_of("wattmon", "001122334455", 2)
    assert shard_of("wattmon", "001122334455", 1) == 0
    counts = Counter(shard_of("wattmon", f"{n:012x}", 4) for n in range(4000))
    assert set(counts) == {0, 1, 2, 3}
    assert min(counts.values()) > 800, counts  # about even: 1,000 each


text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


@given(
    protocol=st.sampled_from(["wattmon", "json"]),
    device=text,
    at=st.floats(allow_nan=False, allow_infinity=False),
    payload=st.binary(max_size=2000),
    header=st.binary(max_size=100),
    key=st.one_of(st.none(), st.text("0123456789abcdef", min_size=1, max_size=32)),
    count=st.integers(0, 2**32 - 1),
    request_id=st.integers(0, 2**32 - 1),
)
def test_a_record_crosses_the_handoff_unchanged(
    protocol: str,
    device: str,
    at: float,
    payload: bytes,
    header: bytes,
    key: str | None,
    count: int,
    request_id: int,
) -> None:
    record = Record(protocol, device, at, payload, header, key, count)
    frame = encode_request(request_id, record)
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    assert decode_request(frame[4:]) == (request_id, record)


@given(device=text, raw=st.binary(max_size=500), reason=text, key=st.none() | text)
def test_a_quarantined_block_crosses_the_handoff_unchanged(
    device: str, raw: bytes, reason: str, key: str | None
) -> None:
    block = Quarantined("wattmon", device, T0, raw, reason, key or None)
    assert decode_request(encode_request(7, block)[4:]) == (7, block)


def test_answers_cross_the_handoff_with_their_status() -> None:
    for outcome in Outcome:
        assert decode_answer(encode_answer(3, outcome)[4:]) == (3, outcome)
    limited = RateLimited(12)
    request_id, error = decode_answer(encode_answer(9, limited)[4:])
    assert request_id == 9
    assert isinstance(error, Exception)
    assert (error.status, error.code, error.message, error.retry_after_secs) == (
        429,
        limited.code,
        limited.message,
        12,
    )
    _, failed = decode_answer(encode_answer(1, StorageFailed("disk full; retry later"))[4:])
    assert getattr(failed, "status", None) == 503
    # Anything else is a bug in the owner: the device is told to retry.
    _, crashed = decode_answer(encode_answer(2, ValueError("boom"))[4:])
    assert getattr(crashed, "status", None) == 503


def record(mac: str, i: int) -> Record:
    header, rows, count = split_block(f"Time,Seq\n2026-11-21 08:00:{i:02d},{i}\n".encode())
    return Record("wattmon", mac, T0 + i, rows, header, f"{i:032x}", count)


def macs_of_shard(shard: int, shards: int, n: int) -> list[str]:
    found = [f"0011223344{i:02x}" for i in range(256)]
    return [mac for mac in found if shard_of("wattmon", mac, shards) == shard][:n]


async def shard_crash_image(tmp_path: Path, shards: int) -> tuple[Path, list[Record]]:
    """Every shard stores records; the image is the data dir as a crash
    leaves it: each shard's log holds writes no checkpoint has synced, and
    the page cache, lost at power-off, took the device files' tails."""
    live = tmp_path / "live"
    config = make_config(live).storage
    holder = FileSink(live, config)
    await asyncio.to_thread(holder.take_over)
    records = []
    sinks = []
    for shard in range(shards):
        sink = FileSink(live, config, shard=shard)
        await sink.open()
        batch = [record(mac, i) for mac in macs_of_shard(shard, shards, 3) for i in range(3)]
        assert set(await sink.commit(batch)) == {Outcome.STORED}
        records += batch
        sinks.append(sink)
    image = tmp_path / "image"
    await asyncio.to_thread(lose_unsynced_tails, live, image)
    for sink in sinks:
        await sink.close()
    return image, records


def lose_unsynced_tails(live: Path, image: Path) -> None:
    shutil.copytree(live, image)
    for path in (image / "wattmon").rglob("*.csv"):
        path.write_bytes(b"")  # unsynced: lost with the power
    (image / ".ingestd-lock").unlink()


async def logs(data_dir: Path) -> list[str]:
    return await asyncio.to_thread(all_log_names, data_dir)


def stored_rows(data_dir: Path) -> Counter[str]:
    rows: Counter[str] = Counter()
    for path in (data_dir / "wattmon").rglob("*.csv"):
        lines = path.read_text().splitlines()
        assert lines[0] == "Time,Seq", path
        rows.update(f"{path.parent.name},{line}" for line in lines[1:])
    return rows


def expected_rows(records: list[Record]) -> Counter[str]:
    return Counter(f"{r.device_id},{r.payload.decode().strip()}" for r in records)


async def test_one_process_replays_the_logs_of_every_shard_and_removes_them(tmp_path):
    image, records = await shard_crash_image(tmp_path, shards=2)
    assert {".ingestd-wal.s0", ".ingestd-wal.s1"} <= set(await logs(image))
    sink = FileSink(image, make_config(image).storage)
    await sink.open()
    try:
        assert await asyncio.to_thread(stored_rows, image) == expected_rows(records)
        # Only its own pair is left: a shard log replayed again later would
        # cut what this process appends to the same files.
        assert await logs(image) == [".ingestd-wal", ".ingestd-wal.1"]
        # Resends are still known: their keys came back with the replay.
        assert set(await sink.commit(records)) == {Outcome.DUPLICATE}
    finally:
        await sink.close()


async def test_worker_mode_replays_any_shard_count_before_the_workers_start(tmp_path):
    image, records = await shard_crash_image(tmp_path, shards=3)
    config = make_config(image).storage
    holder = FileSink(image, config)
    lock = await asyncio.to_thread(holder.take_over)
    try:
        assert await asyncio.to_thread(stored_rows, image) == expected_rows(records)
        assert await logs(image) == []
        # Two shards now: each device may have another owner, who knows its keys.
        for shard in range(2):
            sink = FileSink(image, config, shard=shard)
            await sink.open()
            mine = [r for r in records if shard_of("wattmon", r.device_id, 2) == shard]
            assert set(await sink.commit(mine)) == {Outcome.DUPLICATE}
            await sink.close()
        assert (await asyncio.to_thread(read_log, image))[1] == []  # clean stops: nothing to replay
    finally:
        lock.release()
    assert await asyncio.to_thread(stored_rows, image) == expected_rows(records)
