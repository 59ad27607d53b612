"""GET /api/devices: counters, filters, silence, the start-up scan, access, memory."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import gzip
import os
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from conftest import FORM, make_config, wattmon_form

from ingestd.config import Config, validate
from ingestd.http.fleet import parse_duration
from ingestd.http.keys import CONFIG
from ingestd.ingest.devices import DeviceRegistry, DeviceStats, scan_data_dir
from ingestd.records import Outcome, Record

T0 = 1_795_248_000.0  # the FakeClock's start: 2026-11-21T08:00:00Z
MAC_A = "001a2b3c4d5e"
MAC_B = "00aabbccddee"
MAC_Q = "0000000000ff"
MAC_BAD = "0000000000ee"
BLOCK = "Time,V,A\n2026-11-21 08:00:00,230.1,1.5\n2026-11-21 08:01:00,230.2,1.6\n"
ROWS = BLOCK.split("\n", 1)[1]
JSON = {"Content-Type": "application/json"}


def status_config(data_dir: Path, *, server: dict[str, Any] | None = None, **status: Any) -> Config:
    config = make_config(data_dir, server=server)
    status_section = dataclasses.replace(config.status, **status)
    return validate(dataclasses.replace(config, status=status_section))


async def post_block(client, mac: str, data: str = BLOCK, md5: str | None = "auto"):
    return await client.post("/wattmon", data=wattmon_form(mac, data, md5), headers=FORM)


async def fleet(client, **params: str) -> dict[str, Any]:
    resp = await client.get("/api/devices", params=params)
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("application/json")
    return await resp.json()


def by_id(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["id"]: d for d in doc["devices"]}


async def test_lists_posted_devices_with_their_counters(client, tmp_path):
    await wait_for_scan(client)  # of an empty data dir
    assert (await (await post_block(client, "00:1A:2B:3C:4D:5E")).text()) == "OK"
    assert (await (await post_block(client, MAC_A)).text()) == "OK"  # a resend
    bad = "1,2,3\n4,5,6\n"  # no header row: quarantined, answered OK
    assert (await (await post_block(client, MAC_Q, bad)).text()) == "OK"
    refused = await post_block(client, MAC_BAD, md5="0" * 32)
    assert refused.status == 400
    resp = await client.post("/site-a/mm-1", data=b'{"rx": 1}', headers=JSON)
    assert resp.status == 200

    doc = await fleet(client)
    devices = by_id(doc)
    assert set(devices) == {MAC_A, MAC_Q, MAC_BAD, "site-a_mm-1"}
    a = devices[MAC_A]
    assert a == {
        "id": MAC_A,
        "protocol": "wattmon",
        "first_seen": "2026-11-21T08:00:00.000Z",
        "last_seen": "2026-11-21T08:00:00.000Z",
        "silent_secs": 0.0,
        "silent": False,
        "blocks": 1,
        "rows": 2,
        "records": 2,  # the old name of `rows`, kept for existing clients
        "bytes": len(ROWS),
        "duplicates": 1,
        "quarantined": 0,
        "last_error": None,
        "last_error_at": None,
        "current_file": f"wattmon/{MAC_A}/2026-11-21.csv",
        "hourly_rows": [0] * 23 + [2],
        "hourly_records": [0] * 23 + [2],
    }
    assert (tmp_path / "data" / a["current_file"]).is_file()
    q = devices[MAC_Q]
    assert (q["quarantined"], q["blocks"], q["rows"], q["last_error"]) == (1, 0, 0, None)
    assert len(list((tmp_path / "data" / "quarantine" / "wattmon" / MAC_Q).glob("*.csv"))) == 1
    refused_device = devices[MAC_BAD]
    assert refused_device["last_error"] == "bad_md5"
    assert refused_device["last_error_at"] == "2026-11-21T08:00:00.000Z"
    assert refused_device["blocks"] == 0
    assert not (tmp_path / "data" / "wattmon" / MAC_BAD).exists()
    stream = devices["site-a_mm-1"]
    assert (stream["protocol"], stream["rows"], stream["blocks"]) == ("json", 1, 1)
    assert stream["current_file"] == "json/site-a_mm-1/2026-11-21.jsonl"
    assert doc["summary"] == {
        "now": "2026-11-21T08:00:00.000Z",
        "rows_per_minute": 3,
        "records_per_minute": 3,
        "counters_since": "2026-11-21T08:00:00.000Z",
        "scan": "done",
        "devices": 4,
        "reporting": 4,
        "silent": 0,
        "silent_after_secs": 900.0,
        "matched": 4,
        "listed": 4,
    }


async def test_the_status_page_counts_rows_not_records(client):
    """A block or document is what a device posts (a "record" in the metrics
    and STATUS=); a row is a line of its file. The page shows rows."""
    page = await (await client.get("/status")).text()
    assert '"Rows"' in page and " rows per minute" in page
    assert "d.rows" in page and "d.hourly_rows" in page and "s.rows_per_minute" in page
    assert "Records" not in page and "records per minute" not in page


async def test_bad_json_is_the_streams_last_error(client):
    resp = await client.post("/site-b", data=b"{nope", headers=JSON)
    assert resp.status == 400
    assert by_id(await fleet(client))["site-b"]["last_error"] == "bad_json"


async def test_filters_order_and_silence(client, clock):
    await post_block(client, MAC_A)
    clock.now += 20 * 60
    await post_block(client, MAC_B)
    clock.now += 60
    await client.post("/meter-1", data=b"[1,2]", headers=JSON)

    doc = await fleet(client)
    assert [d["id"] for d in doc["devices"]] == ["meter-1", MAC_B, MAC_A]  # newest first
    assert (doc["summary"]["reporting"], doc["summary"]["silent"]) == (2, 1)
    assert [d["silent"] for d in doc["devices"]] == [False, False, True]
    assert doc["devices"][2]["silent_secs"] == 21 * 60

    oldest = await fleet(client, order="oldest")
    assert [d["id"] for d in oldest["devices"]] == [MAC_A, MAC_B, "meter-1"]
    assert [d["id"] for d in (await fleet(client, protocol="wattmon"))["devices"]] == [MAC_B, MAC_A]
    assert [d["id"] for d in (await fleet(client, protocol="json"))["devices"]] == ["meter-1"]
    limited = await fleet(client, order="oldest", limit="1")
    assert [d["id"] for d in limited["devices"]] == [MAC_A]
    assert (limited["summary"]["matched"], limited["summary"]["listed"]) == (3, 1)

    for spelling in ("15m", "900", "900s", "0.25h", "1260"):
        silent = await fleet(client, silent_for=spelling)
        assert [d["id"] for d in silent["devices"]] == [MAC_A], spelling
    assert (await fleet(client, silent_for="1d"))["devices"] == []
    # silent_for sets the threshold too, unless silent_after says otherwise.
    assert (await fleet(client, silent_for="30s"))["summary"]["silent"] == 2
    assert (await fleet(client, silent_after="30s"))["summary"]["silent"] == 2
    assert (await fleet(client, silent_after="2h"))["summary"]["silent"] == 0

    clock.now += 60 * 60  # an hour of silence from everyone: now 09:21
    doc = await fleet(client)
    assert (doc["summary"]["reporting"], doc["summary"]["silent"]) == (0, 3)
    assert doc["summary"]["rows_per_minute"] == 0
    a = by_id(doc)[MAC_A]
    assert a["hourly_rows"] == [0] * 22 + [2, 0]  # the 08:00 hour, then 09:00
    clock.now += 24 * 3600
    assert by_id(await fleet(client))[MAC_A]["hourly_rows"] == [0] * 24


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("protocol=modbus", "ERROR: protocol: expected wattmon or json"),
        ("silent_for=15x", "ERROR: silent_for: expected a duration"),
        ("silent_for=-1m", "ERROR: silent_for: expected a duration"),
        ("silent_for=", "ERROR: silent_for: expected a duration"),
        ("silent_after=soon", "ERROR: silent_after: expected a duration"),
        ("order=random", "ERROR: order: expected newest or oldest"),
        ("limit=0", "ERROR: limit: expected a positive whole number"),
        ("limit=ten", "ERROR: limit: expected a positive whole number"),
        ("limit=%C2%B2", "ERROR: limit: expected a positive whole number"),  # superscript 2
        ("silent_for=%D9%A1%D9%A5m", "ERROR: silent_for: expected a duration"),  # Arabic 15
    ],
)
async def test_bad_query_values_are_400(client, query, message):
    resp = await client.get(f"/api/devices?{query}")
    assert resp.status == 400
    assert (await resp.text()).startswith(message)


def test_durations():
    assert parse_duration("x", "15m") == 900
    assert parse_duration("x", "90") == 90
    assert parse_duration("x", "1.5h") == 5400
    assert parse_duration("x", "2d") == 172800
    assert parse_duration("x", "0") == 0


# -- start-up scan -------------------------------------------------------------------


def make_data_dir(data: Path) -> float:
    """A data dir as an earlier run left it; returns the newest file's mtime."""
    folder = data / "wattmon" / MAC_A
    folder.mkdir(parents=True)
    (folder / "2026-11-19.csv.gz").write_bytes(gzip.compress(b"Time,V\n1,2\n"))
    (folder / "2026-11-20.csv").write_text("Time,V\n2026-11-20 10:00:00,1\n")
    (folder / "2026-11-20_0001.csv").write_text("Time,V,A\n2026-11-20 23:00:00,1,2\n")
    (folder / ".ingestd-keys").write_bytes(b"")
    mtime = T0 - 9 * 3600  # 2026-11-20T23:00:00Z
    os.utime(folder / "2026-11-20_0001.csv", (mtime, mtime))
    stream = data / "json" / "site-b"
    stream.mkdir(parents=True)
    (stream / "2026-11-20T07.jsonl").write_text("{}\n")
    early = T0 - 26 * 3600  # 06:00, before the file's own hour: a skewed clock
    os.utime(stream / "2026-11-20T07.jsonl", (early, early))
    for mac, names in ((MAC_A, ("a" * 32, "b" * 32)), (MAC_Q, ("c" * 32,))):
        quarantine = data / "quarantine" / "wattmon" / mac
        quarantine.mkdir(parents=True)
        for name in names:
            (quarantine / f"{name}.csv").write_text("1,2\n")
            (quarantine / f"{name}.json").write_text("{}\n")
        os.utime(quarantine, (T0 - 3600, T0 - 3600))
    # Not devices: skipped.
    (data / "wattmon" / "not-a-mac").mkdir()
    (data / "wattmon" / "not-a-mac" / "2026-11-20.csv").write_text("x\n")
    (data / "wattmon" / "AABBCCDDEEFF").mkdir()
    (data / "wattmon" / "AABBCCDDEEFF" / "2026-11-20.csv").write_text("x\n")
    (data / "wattmon" / "66778899aabb").mkdir()  # no data files
    (data / "wattmon" / "66778899aabb" / "notes.txt").write_text("x\n")
    (data / "json" / ".hidden").mkdir()
    (data / "json" / ".hidden" / "2026-11-20.jsonl").write_text("{}\n")
    (data / "json" / "stray-file.jsonl").write_text("{}\n")
    return mtime


def test_scan_data_dir(tmp_path):
    mtime = make_data_dir(tmp_path)
    found = {(d.protocol, d.device_id): d for d in scan_data_dir(tmp_path)}
    assert set(found) == {("wattmon", MAC_A), ("wattmon", MAC_Q), ("json", "site-b")}
    a = found[("wattmon", MAC_A)]
    assert a.first_seen == T0 - 2 * 86400 - 8 * 3600  # 2026-11-19T00:00:00Z
    assert a.last_seen == mtime
    assert a.current_file == f"wattmon/{MAC_A}/2026-11-20_0001.csv"
    assert a.quarantined == 2
    stream = found[("json", "site-b")]
    # The period start is later than the file's mtime here: the mtime wins.
    assert stream.first_seen == stream.last_seen == T0 - 26 * 3600
    assert stream.current_file == "json/site-b/2026-11-20T07.jsonl"
    q = found[("wattmon", MAC_Q)]
    assert (q.quarantined, q.current_file, q.last_seen) == (1, None, T0 - 3600)
    assert scan_data_dir(tmp_path / "missing") == []


async def wait_for_scan(client) -> dict[str, Any]:
    async with asyncio.timeout(10):
        while True:
            doc = await fleet(client)
            if doc["summary"]["scan"] == "done":
                return doc
            await asyncio.sleep(0.01)


async def test_startup_scan_lists_devices_seen_only_on_disk(start_client, tmp_path, clock):
    mtime = make_data_dir(tmp_path / "data")
    client = await start_client()
    doc = await wait_for_scan(client)
    devices = by_id(doc)
    assert set(devices) == {MAC_A, MAC_Q, "site-b"}
    a = devices[MAC_A]
    assert a["first_seen"] == "2026-11-19T00:00:00.000Z"
    assert a["last_seen"] == "2026-11-20T23:00:00.000Z"
    assert a["silent_secs"] == T0 - mtime
    assert a["silent"] is True
    assert a["current_file"] == f"wattmon/{MAC_A}/2026-11-20_0001.csv"
    assert (a["quarantined"], a["blocks"], a["rows"]) == (2, 0, 0)
    assert devices["site-b"]["current_file"] == "json/site-b/2026-11-20T07.jsonl"
    assert (doc["summary"]["devices"], doc["summary"]["silent"]) == (3, 3)

    # The device posts again: live state wins, what the scan knew stays.
    assert (await (await post_block(client, MAC_A)).text()) == "OK"
    a = by_id(await fleet(client))[MAC_A]
    assert a["first_seen"] == "2026-11-19T00:00:00.000Z"
    assert a["last_seen"] == "2026-11-21T08:00:00.000Z"
    assert (a["blocks"], a["rows"], a["quarantined"], a["silent"]) == (1, 2, 2, False)
    assert a["current_file"] == f"wattmon/{MAC_A}/2026-11-21.csv"


@pytest.mark.parametrize("gzipped", [False, True])
async def test_first_seen_survives_a_restart(start_client, tmp_path, clock, gzipped):
    """The time of the first stored block, not the start of its file's day."""
    clock.now = T0 + 3 * 3600 + 0.25  # 2026-11-21T11:00:00.250Z
    first = await start_client()
    assert (await (await post_block(first, MAC_A)).text()) == "OK"
    resp = await first.post("/site-c", data=b'{"rx": 1}', headers=JSON)
    assert resp.status == 200
    clock.now += 86400  # a second day, a second file
    assert (await (await post_block(first, MAC_A, BLOCK.replace("230", "231"))).text()) == "OK"
    await first.close()
    if gzipped:  # housekeeping compressed the oldest file meanwhile
        for old in (tmp_path / "data").glob("*/*/2026-11-21.*"):
            old.with_name(old.name + ".gz").write_bytes(gzip.compress(old.read_bytes()))
            old.unlink()
    second = await start_client()
    devices = by_id(await wait_for_scan(second))
    assert devices[MAC_A]["first_seen"] == "2026-11-21T11:00:00.250Z"
    assert devices["site-c"]["first_seen"] == "2026-11-21T11:00:00.250Z"


def test_live_state_wins_over_the_scan():
    registry = DeviceRegistry()
    registry.on_result(Record("wattmon", MAC_A, T0, b"1\n", count=1), Outcome.QUARANTINED)
    registry.on_result(Record("wattmon", MAC_A, T0, b"1\n", count=1), Outcome.STORED)
    scanned = scan_entry(MAC_A, first=T0 - 86400, last=T0 - 3600, quarantined=0)
    registry.merge_scan([scanned, scan_entry(MAC_B, first=T0 - 10, last=T0 - 5, quarantined=3)])
    a = registry.get("wattmon", MAC_A)
    assert a is not None
    assert (a.first_seen, a.last_seen, a.quarantined, a.blocks) == (T0 - 86400, T0, 1, 1)
    b = registry.get("wattmon", MAC_B)
    assert b is not None
    assert (b.first_seen, b.last_seen, b.quarantined, b.current_file) == (
        T0 - 10,
        T0 - 5,
        3,
        f"wattmon/{MAC_B}/2026-11-20.csv",
    )


def scan_entry(mac: str, *, first: float, last: float, quarantined: int):
    from ingestd.ingest.devices import ScannedDevice

    return ScannedDevice("wattmon", mac, first, last, f"wattmon/{mac}/2026-11-20.csv", quarantined)


def test_hourly_buckets():
    stats = DeviceStats(T0)
    stats.count(T0, 5)
    stats.count(T0 + 3599, 1)
    assert stats.hourly_rows(T0)[-1] == 6
    stats.count(T0 + 2 * 3600, 7)  # skips an hour
    assert stats.hourly_rows(T0 + 2 * 3600)[-3:] == [6, 0, 7]
    stats.count(T0 + 3600, 2)  # late, still within the window
    assert stats.hourly_rows(T0 + 2 * 3600)[-3:] == [6, 2, 7]
    stats.count(T0 - 30 * 3600, 9)  # older than the window: dropped
    assert sum(stats.hourly_rows(T0 + 2 * 3600)) == 15
    stats.count(T0 + 100 * 3600, 1)  # days later: the old buckets are gone
    assert stats.hourly_rows(T0 + 100 * 3600) == [0] * 23 + [1]
    assert stats.hourly_rows(T0 + 200 * 3600) == [0] * 24


# -- access ------------------------------------------------------------------------------


async def test_disabled_is_404(start_client, tmp_path):
    client = await start_client(status_config(tmp_path / "data", enabled=False))
    for path in ("/api/devices", "/", "/status"):
        resp = await client.get(path)
        assert resp.status == 404
        assert (await resp.text()).startswith("ERROR")


async def test_token(start_client, tmp_path):
    client = await start_client(status_config(tmp_path / "data", token="s3cret"))
    for path in ("/api/devices", "/", "/status"):
        resp = await client.get(path)
        assert (resp.status, await resp.text()) == (401, "ERROR: unauthorized")
        assert resp.headers["WWW-Authenticate"].startswith("Basic")
        assert (await client.get(path, params={"token": "wrong"})).status == 401
        assert (await client.get(path, params={"token": "s3cret"})).status == 200
        bearer = {"Authorization": "Bearer s3cret"}
        assert (await client.get(path, headers=bearer)).status == 200
        basic = {"Authorization": "Basic " + base64.b64encode(b"ops:s3cret").decode()}
        assert (await client.get(path, headers=basic)).status == 200


async def test_allowed_networks(start_client, tmp_path):
    client = await start_client(status_config(tmp_path / "data", allowed_networks=("10.0.0.0/8",)))
    resp = await client.get("/api/devices")
    assert (resp.status, await resp.text()) == (403, "ERROR: client network not allowed")
    assert (await client.get("/status")).status == 403
    # Behind a trusted proxy, the address it forwards is the client's.
    proxied = status_config(
        tmp_path / "data2",
        server={"trusted_proxies": ("127.0.0.0/8",)},
        allowed_networks=("10.0.0.0/8",),
    )
    client = await start_client(proxied)
    for forwarded, status in (("10.1.2.3", 200), ("192.0.2.1", 403)):
        resp = await client.get("/api/devices", headers={"X-Forwarded-For": forwarded})
        assert resp.status == status
    assert (await client.get("/api/devices")).status == 403


async def test_a_reload_changes_access(start_client, tmp_path):
    client = await start_client(status_config(tmp_path / "data"))
    assert (await client.get("/api/devices")).status == 200
    client.server.app[CONFIG].set(status_config(tmp_path / "data", token="new"))
    assert (await client.get("/api/devices")).status == 401
    assert (await client.get("/api/devices", params={"token": "new"})).status == 200
    client.server.app[CONFIG].set(status_config(tmp_path / "data", enabled=False))
    assert (await client.get("/api/devices")).status == 404


async def test_page_is_served_with_a_strict_policy(client):
    for path in ("/", "/status"):
        resp = await client.get(path)
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
        csp = resp.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src 'sha256-" in csp
        assert "unsafe-inline" not in csp
        body = await resp.text()
        assert "<table" in body and "api/devices" in body
        assert "innerHTML" not in body  # the page builds its table with textContent
        assert "http://" not in body.replace("http://www.w3.org/2000/svg", "")  # no CDN


# -- memory --------------------------------------------------------------------------------


def test_memory_per_device():
    """Each device, with its key, id, counters and 24 hourly buckets."""
    count = 10_000
    payload = b"2026-11-21 08:00:00,230.1,1.5\n" * 4
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        registry = DeviceRegistry()
        for i in range(count):
            device_id = f"{i:012x}"
            for hour in (0, 5):  # two hours of records: the ring is in use
                registry.on_result(
                    Record("wattmon", device_id, T0 + hour * 3600 + i, payload, count=4),
                    Outcome.STORED,
                )
            registry.on_error("wattmon", device_id, "bad_md5", T0 + 1e6 + i)
            stats = registry.get("wattmon", device_id)
            assert stats is not None
            stats.current_file = f"wattmon/{device_id}/2026-11-21.csv"
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    per_device = used / count
    print(f"fleet registry: {per_device:.0f} bytes per device")
    assert len(registry) == count
    assert per_device < 1024


async def test_a_large_fleet_is_listed_whole(client):
    """Encoded in chunks: the document is still one valid list."""
    from ingestd.http.keys import DEVICES

    registry = client.server.app[DEVICES]
    for i in range(2500):
        registry.on_result(Record("json", f"s-{i:05d}", T0 - i, b"{}\n"), Outcome.STORED)
    doc = await fleet(client)
    assert [d["id"] for d in doc["devices"]] == [f"s-{i:05d}" for i in range(2500)]
    assert doc["summary"]["rows_per_minute"] == 60
    assert doc["summary"]["silent"] == 2500 - 900  # i = 900 s and more
    tail = await fleet(client, order="oldest", limit="1001")
    assert tail["devices"][0]["id"] == "s-02499" and len(tail["devices"]) == 1001


def test_timestamps_match_rfc3339():
    from ingestd.http.fleet import timestamp
    from ingestd.protocols.jsonpost import rfc3339

    for ts in (0.0, T0, T0 + 59.999, T0 + 86399.5, 4_102_444_799.001):
        assert timestamp(ts) == rfc3339(ts)
