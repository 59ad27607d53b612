"""The Wattmon route against a real server: every answer of the contract."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import aiohttp
import pytest
from conftest import FORM, wattmon_form

MAC = "00:1A:2b:3c:4D:5e"
DEVICE = "001a2b3c4d5e"
BLOCK = "Time,V,I\r\n2026-11-21 08:00:00,230.1,1.5\r\n2026-11-21 08:01:00,230.2,1.6\r\n"


def device_dir(tmp_path: Path, device: str = DEVICE) -> Path:
    return tmp_path / "data" / "wattmon" / device


def stored_files(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "data").rglob("*") if p.suffix in (".csv", ".jsonl"))


async def post(client, body: str | bytes, path: str = "/wattmon", headers=FORM):
    resp = await client.post(path, data=body, headers=headers)
    return resp.status, await resp.read(), resp.headers


@pytest.mark.parametrize("path", ["/wattmon", "/export-script.php"])
async def test_stored_block_answers_exactly_ok(client, tmp_path, path):
    status, body, _ = await post(client, wattmon_form(MAC, BLOCK), path)
    assert (status, body) == (200, b"OK")
    assert (device_dir(tmp_path) / "2026-11-21.csv").read_bytes() == (
        b"Time,V,I\n2026-11-21 08:00:00,230.1,1.5\n2026-11-21 08:01:00,230.2,1.6\n"
    )


async def test_multipart_form_is_accepted(client, tmp_path):
    form = aiohttp.FormData()
    form.add_field("key", MAC)
    form.add_field("md5sum", hashlib.md5(BLOCK.encode()).hexdigest())
    form.add_field("data", BLOCK.encode(), filename="block.csv", content_type="text/csv")
    resp = await client.post("/wattmon", data=form)
    assert (resp.status, await resp.text()) == (200, "OK")
    assert (device_dir(tmp_path) / "2026-11-21.csv").read_text().count("\n") == 3


async def test_md5_mismatch_is_refused_and_nothing_stored(client, tmp_path):
    status, body, _ = await post(client, wattmon_form(MAC, BLOCK, md5="0" * 32))
    assert (status, body) == (400, b"ERROR: MD5 sum mismatch")
    assert stored_files(tmp_path) == []


@pytest.mark.parametrize(
    "key", [None, "", "00:1A:2B:3C:4D", "00:1A:2B:3C:4D:5E:6F", "zz1a2b3c4d5e", "../../etc/x"]
)
async def test_bad_or_missing_key_is_refused(client, tmp_path, key):
    body = wattmon_form(key or "", BLOCK)
    if key is None:
        body = body.replace("key=&", "")
    status, text, _ = await post(client, body)
    assert status == 400
    assert text.startswith(b"ERROR: ")
    assert stored_files(tmp_path) == []


@pytest.mark.parametrize("mac", ["001A2B3C4D5E", "00-1a-2b-3c-4d-5e", "00:1a:2b:3c:4d:5e"])
async def test_every_mac_spelling_reaches_one_folder(client, tmp_path, mac):
    status, _, _ = await post(client, wattmon_form(mac, BLOCK))
    assert status == 200
    assert [p.name for p in (tmp_path / "data" / "wattmon").iterdir()] == [DEVICE]


@pytest.mark.parametrize("body", [wattmon_form(MAC, ""), f"key={MAC}&md5sum="])
async def test_missing_or_empty_data_is_ok_and_stores_nothing(client, tmp_path, body):
    assert (await post(client, body))[:2] == (200, b"OK")
    assert stored_files(tmp_path) == []


async def test_missing_md5_is_accepted_by_default(client, tmp_path):
    assert (await post(client, wattmon_form(MAC, BLOCK, md5=None)))[:2] == (200, b"OK")
    assert len(stored_files(tmp_path)) == 1


async def test_missing_md5_is_refused_when_required(start_client, tmp_path):
    client = await start_client(wattmon={"require_md5": True})
    status, text, _ = await post(client, wattmon_form(MAC, BLOCK, md5=None))
    assert status == 400 and text.startswith(b"ERROR")
    assert stored_files(tmp_path) == []


async def test_header_is_written_once_per_file(client, tmp_path):
    for minute in range(3):
        block = f"Time,V\n2026-11-21 08:0{minute}:00,{minute}\n"
        assert (await post(client, wattmon_form(MAC, block)))[0] == 200
    assert (device_dir(tmp_path) / "2026-11-21.csv").read_text() == (
        "Time,V\n2026-11-21 08:00:00,0\n2026-11-21 08:01:00,1\n2026-11-21 08:02:00,2\n"
    )


async def test_new_header_starts_a_new_file(client, tmp_path):
    await post(client, wattmon_form(MAC, "Time,V\nt1,2\n"))
    await post(client, wattmon_form(MAC, "Time,V,I\nt2,3,4\n"))
    await post(client, wattmon_form(MAC, "Time,V,I\nt3,5,6\n"))
    files = sorted(device_dir(tmp_path).glob("*.csv"))
    assert [f.name for f in files] == ["2026-11-21.csv", "2026-11-21_0001.csv"]
    assert files[0].read_text() == "Time,V\nt1,2\n"
    assert files[1].read_text() == "Time,V,I\nt2,3,4\nt3,5,6\n"


async def test_resend_of_a_stored_block_is_ok_and_not_stored_twice(client, tmp_path):
    for _ in range(3):
        assert (await post(client, wattmon_form(MAC, BLOCK)))[:2] == (200, b"OK")
    assert (device_dir(tmp_path) / "2026-11-21.csv").read_text().count("\n") == 3


async def test_concurrent_resends_store_once(client, tmp_path):
    results = await asyncio.gather(*(post(client, wattmon_form(MAC, BLOCK)) for _ in range(20)))
    assert {r[:2] for r in results} == {(200, b"OK")}
    assert (device_dir(tmp_path) / "2026-11-21.csv").read_text().count("\n") == 3


async def test_block_that_is_not_csv_is_quarantined_and_answered_ok(client, tmp_path):
    bad = "Time,V\n2026-11-21 08:00:00,1,extra\n"
    assert (await post(client, wattmon_form(MAC, bad)))[:2] == (200, b"OK")
    assert not device_dir(tmp_path).exists() or not list(device_dir(tmp_path).glob("*.csv"))
    md5 = hashlib.md5(bad.encode()).hexdigest()
    kept = tmp_path / "data" / "quarantine" / "wattmon" / DEVICE / f"{md5}.csv"
    assert kept.read_text() == bad
    assert "columns" in (kept.with_suffix(".json")).read_text()


@pytest.mark.parametrize(
    ("headers", "body"),
    [
        ({"Content-Type": "application/json"}, b'{"key": "x"}'),
        ({"Content-Type": "multipart/form-data"}, b"--x--"),
        ({"Content-Type": "multipart/form-data; boundary=b"}, b"--b\r\nContent-Dis"),
        (FORM, b"key=001122334455&key=001122334455&data=a"),
    ],
)
async def test_malformed_requests_get_a_clear_error(client, tmp_path, headers, body):
    status, text, _ = await post(client, body, headers=headers)
    assert 400 <= status < 500
    assert text.startswith(b"ERROR: ")
    assert stored_files(tmp_path) == []
    # The daemon still serves the next honest device.
    assert (await post(client, wattmon_form(MAC, BLOCK)))[:2] == (200, b"OK")


async def test_get_on_wattmon_route_is_405(client):
    resp = await client.get("/wattmon")
    assert resp.status == 405
    assert (await resp.text()).startswith("ERROR")


async def test_body_over_limit_is_413(start_client, tmp_path):
    client = await start_client(server={"max_body_bytes": 1000})
    big = "Time,V\n" + "2026-11-21 08:00:00,1\n" * 100
    status, text, _ = await post(client, wattmon_form(MAC, big))
    assert status == 413 and text.startswith(b"ERROR")
    assert stored_files(tmp_path) == []


async def test_many_devices_at_once_keep_their_rows_apart_and_in_order(client, tmp_path):
    devices = [f"0000000000{n:02x}" for n in range(40)]

    async def device(mac: str) -> None:
        for i in range(10):
            block = f"Time,Dev,Seq\n2026-11-21 08:00:{i:02d},{mac},{i}\n"
            status, body, _ = await post(client, wattmon_form(mac, block))
            assert (status, body) == (200, b"OK")

    await asyncio.gather(*(device(mac) for mac in devices))
    for mac in devices:
        lines = (device_dir(tmp_path, mac) / "2026-11-21.csv").read_text().splitlines()
        assert lines[0] == "Time,Dev,Seq"
        assert lines[1:] == [f"2026-11-21 08:00:{i:02d},{mac},{i}" for i in range(10)]
