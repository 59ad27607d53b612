"""Backpressure, health and draining, with the real writer held mid-write."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
from conftest import FORM, wattmon_form

from ingestd.http.keys import SINK
from ingestd.sinks.file.wal import read_log


@pytest.fixture
def disk_gate() -> Iterator[threading.Event]:
    gate = threading.Event()
    yield gate
    gate.set()


def hold_writer(client, gate: threading.Event) -> None:
    """Make the writer thread wait for `gate`, like a disk that stalls."""
    client.app[SINK]._executor.submit(gate.wait)


def block(i: int) -> str:
    return f"Time,V\n2026-11-21 08:00:{i:02d},{i}\n"


async def test_full_queue_answers_503_with_retry_after(start_client, tmp_path, disk_gate):
    client = await start_client(queue_max_records=1, enqueue_timeout_secs=0.05)
    hold_writer(client, disk_gate)
    first = asyncio.create_task(
        client.post("/wattmon", data=wattmon_form("000000000001", block(1)), headers=FORM)
    )
    second = asyncio.create_task(
        client.post("/wattmon", data=wattmon_form("000000000002", block(2)), headers=FORM)
    )
    await asyncio.sleep(0.05)  # let the writer take the first and the queue hold the second
    refused = await client.post(
        "/wattmon", data=wattmon_form("000000000003", block(3)), headers=FORM
    )
    assert refused.status == 503
    assert (await refused.text()) == "ERROR: queue full; retry later"
    assert int(refused.headers["Retry-After"]) > 0
    disk_gate.set()
    for task in (first, second):
        resp = await task
        assert (resp.status, await resp.text()) == (200, "OK")
    assert not (tmp_path / "data" / "wattmon" / "000000000003").exists()


async def test_no_ok_before_the_write(client, tmp_path, disk_gate):
    hold_writer(client, disk_gate)
    request = asyncio.create_task(
        client.post("/wattmon", data=wattmon_form("001122334455", block(1)), headers=FORM)
    )
    await asyncio.sleep(0.1)
    assert not request.done()  # the device is still waiting for its OK
    disk_gate.set()
    resp = await request
    assert (resp.status, await resp.text()) == (200, "OK")
    assert (tmp_path / "data" / "wattmon" / "001122334455" / "2026-11-21.csv").exists()


async def test_healthz(client):
    resp = await client.get("/healthz")
    assert (resp.status, await resp.text()) == (200, "OK")


async def test_shutdown_stores_requests_in_flight_before_closing(client, tmp_path, disk_gate):
    hold_writer(client, disk_gate)
    requests = [
        asyncio.create_task(
            client.post("/wattmon", data=wattmon_form(f"0000000000{i:02x}", block(i)), headers=FORM)
        )
        for i in range(10)
    ]
    await asyncio.sleep(0.1)
    closing = asyncio.create_task(client.server.close())
    await asyncio.sleep(0.1)
    assert not closing.done()  # shutdown waits for the held writes
    disk_gate.set()
    for task in requests:
        resp = await task
        assert (resp.status, await resp.text()) == (200, "OK")
    await closing
    for i in range(10):
        stored = tmp_path / "data" / "wattmon" / f"0000000000{i:02x}" / "2026-11-21.csv"
        assert stored.read_text() == block(i)
    # A clean stop: nothing left to replay.
    _, frames = await asyncio.to_thread(read_log, tmp_path / "data")
    assert frames == []
