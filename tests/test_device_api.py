"""One device's API: GET /api/devices/{id}, its data, its chart; the fleet gauges;
the reader under it; `ingestd quarantine list|replay`."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import FORM, make_config, wattmon_form

from ingestd.cli import main as cli_main
from ingestd.config import Config, validate
from ingestd.http.downsample import min_max
from ingestd.sinks.file import quarantine, reader
from ingestd.sinks.file.housekeeping import compress_file

T0 = 1_795_248_000.0  # the FakeClock's start: 2026-11-21T08:00:00Z
DAY = 86400.0
MAC = "001a2b3c4d5e"
OTHER = "00aabbccddee"
STREAM = "site-a_mm-1"
HEADER = "Time,V,A"
JSON = {"Content-Type": "application/json"}


def stamp(ts: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


def rows_at(ts: float, count: int, step: float = 60.0) -> list[str]:
    return [f"{stamp(ts + i * step)},{230 + i % 7}.{i % 10},1.{i % 9}" for i in range(count)]


def status_config(data_dir: Path, **status: Any) -> Config:
    config = make_config(data_dir)
    return validate(
        dataclasses.replace(config, status=dataclasses.replace(config.status, **status))
    )


async def post_rows(client, mac: str, rows: list[str], header: str = HEADER) -> None:
    data = header + "\n" + "".join(row + "\n" for row in rows)
    resp = await client.post("/wattmon", data=wattmon_form(mac, data), headers=FORM)
    assert (resp.status, await resp.text()) == (200, "OK")


async def get_text(client, path: str, status: int = 200, **params: str) -> str:
    resp = await client.get(path, params=params)
    text = await resp.text()
    assert resp.status == status, text[:300]
    return text


async def get_json(client, path: str, **params: str) -> Any:
    return json.loads(await get_text(client, path, **params))


def csv_rows(text: str) -> list[str]:
    """The data rows of a CSV answer (headers and section breaks left out)."""
    return [line for line in text.splitlines() if line and not line.startswith("Time")]


async def gzip_closed(data_dir: Path, protocol: str, device_id: str) -> list[str]:
    """Compress every file but the newest, as housekeeping does."""
    folder = data_dir / protocol / device_id
    names = sorted(os.listdir(folder))
    data = [n for n in names if n.endswith((".csv", ".jsonl"))]
    for name in data[:-1]:
        await asyncio.to_thread(compress_file, folder / name)
    return sorted(os.listdir(folder))


# -- the data API -------------------------------------------------------------------


async def test_data_spans_two_days_a_size_rotation_and_a_gzipped_file(
    start_client, tmp_path, clock
):
    data_dir = tmp_path / "data"
    client = await start_client(max_file_bytes=600)
    posted: list[str] = []
    for block in range(4):  # day 1: 4 blocks of 10 rows, ~250 bytes each: rotates by size
        rows = rows_at(T0 + block * 600, 10)
        clock.now = T0 + block * 600 + 600
        await post_rows(client, MAC, rows)
        posted += rows
    clock.now = T0 + DAY
    for block in range(2):  # day 2
        rows = rows_at(T0 + DAY + block * 600, 10)
        await post_rows(client, MAC, rows)
        posted += rows
    names = await gzip_closed(data_dir, "wattmon", MAC)
    # Day 1 rotated by size; all but the newest file gzipped.
    assert {"2026-11-21.csv.gz", "2026-11-21_0001.csv.gz", "2026-11-22.csv.gz"} <= set(names)
    assert names[-1] == "2026-11-22_0001.csv", names

    text = await get_text(client, f"/api/devices/{MAC}/data")
    assert text.splitlines()[0] == HEADER
    assert text.count(HEADER) == 1  # one header for one header
    assert csv_rows(text) == posted

    # A range across the day boundary: exactly the rows inside it, in order.
    start, end = T0 + 1200 + 120, T0 + DAY + 300  # block 2's third row .. day 2's fifth
    inside = [r for r in posted if start <= reader.parse_time(r.split(",")[0].encode()) < end]
    assert 10 < len(inside) < len(posted)
    text = await get_text(
        client,
        f"/api/devices/{MAC}/data",
        **{"from": "2026-11-21T08:22:00Z", "to": "2026-11-22T08:05:00Z"},
    )
    assert csv_rows(text) == inside
    # A duration back from now.
    clock.now = T0 + DAY + 1200
    text = await get_text(client, f"/api/devices/{MAC}/data", **{"from": "15m"})
    assert csv_rows(text) == [r for r in posted if r >= stamp(T0 + DAY + 300)]

    text = await get_text(client, f"/api/devices/{MAC}/data", limit="7")
    assert csv_rows(text) == posted[:7]

    ndjson = await get_text(client, f"/api/devices/{MAC}/data", format="ndjson", limit="2")
    objects = [json.loads(line) for line in ndjson.splitlines()]
    assert objects == [dict(zip(HEADER.split(","), r.split(","), strict=True)) for r in posted[:2]]
    doc = await get_json(client, f"/api/devices/{MAC}/data", format="json")
    assert [",".join(o.values()) for o in doc] == posted


async def test_header_change_makes_sections_or_a_409(client, clock):
    await post_rows(client, MAC, rows_at(T0, 3))
    other = ["2026-11-21 08:10:00,1,2,3"]
    await post_rows(client, MAC, other, header="Time,V,A,P")
    await post_rows(client, MAC, rows_at(T0 + 900, 2))
    text = await get_text(client, f"/api/devices/{MAC}/data")
    expected = (
        HEADER
        + "\n"
        + "".join(r + "\n" for r in rows_at(T0, 3))
        + "\nTime,V,A,P\n"
        + other[0]
        + "\n"
        + "\n"
        + HEADER
        + "\n"
        + "".join(r + "\n" for r in rows_at(T0 + 900, 2))
    )
    assert text == expected
    resp = await client.get(f"/api/devices/{MAC}/data", params={"on_header_change": "reject"})
    assert resp.status == 409
    assert (await resp.text()).startswith("ERROR: the selected rows have 2 different headers")
    # Decided by the files the range touches (here all three: one day).
    resp = await client.get(
        f"/api/devices/{MAC}/data",
        params={"on_header_change": "reject", "from": "2026-11-21T08:15:00Z"},
    )
    assert resp.status == 409
    await post_rows(client, OTHER, rows_at(T0, 2))
    text = await get_text(client, f"/api/devices/{OTHER}/data", on_header_change="reject")
    assert text == HEADER + "\n" + "".join(r + "\n" for r in rows_at(T0, 2))
    doc = await get_json(client, f"/api/devices/{MAC}/data", format="json")
    assert doc[3] == {"Time": "2026-11-21 08:10:00", "V": "1", "A": "2", "P": "3"}


async def test_json_stream_data_is_the_stored_lines(client, clock):
    for i in range(3):
        clock.now = T0 + i * 3600
        resp = await client.post(
            f"/{STREAM.replace('_', '/')}", data=b'{"rx": %d}' % i, headers=JSON
        )
        assert resp.status == 200
    text = await get_text(client, f"/api/devices/{STREAM}/data")
    lines = [json.loads(line) for line in text.splitlines()]
    assert [line["body"] for line in lines] == [{"rx": 0}, {"rx": 1}, {"rx": 2}]
    assert lines[1]["received_at"] == "2026-11-21T09:00:00.000Z"
    text = await get_text(
        client,
        f"/api/devices/{STREAM}/data",
        **{"from": "2026-11-21T08:30:00Z", "to": "2026-11-21T09:30:00Z"},
    )
    assert [json.loads(line)["body"] for line in text.splitlines()] == [{"rx": 1}]
    doc = await get_json(client, f"/api/devices/{STREAM}/data", format="json")
    assert [d["body"]["rx"] for d in doc] == [0, 1, 2]
    resp = await client.get(f"/api/devices/{STREAM}/data", params={"format": "csv"})
    assert resp.status == 400 and (await resp.text()).startswith("ERROR: format")


def test_file_being_appended_is_read_to_its_last_whole_line(tmp_path):
    folder = tmp_path / "wattmon" / MAC
    folder.mkdir(parents=True)
    (folder / "2026-11-21.csv").write_bytes(b"Time,V\n2026-11-21 08:00:00,1\n2026-11-21 08:01:00,2")
    files = reader.list_files(tmp_path, "wattmon", MAC)
    got = list(reader.records(tmp_path, "wattmon", MAC, files))
    assert [r.line for r in got] == [b"2026-11-21 08:00:00,1"]
    assert reader.last_line(folder, files[0]) == b"2026-11-21 08:00:00,1"


def test_a_file_gzipped_after_the_listing_is_read_from_its_gz(tmp_path):
    folder = tmp_path / "wattmon" / MAC
    folder.mkdir(parents=True)
    (folder / "2026-11-21.csv").write_bytes(b"Time,V\n2026-11-21 08:00:00,1\n")
    (folder / "2026-11-22.csv").write_bytes(b"Time,V\n2026-11-22 08:00:00,2\n")
    files = reader.list_files(tmp_path, "wattmon", MAC)
    compress_file(folder / "2026-11-21.csv")
    got = [r.line for r in reader.records(tmp_path, "wattmon", MAC, files)]
    assert got == [b"2026-11-21 08:00:00,1", b"2026-11-22 08:00:00,2"]
    # Both names for a moment (the .csv not yet removed): the .gz is read once.
    (folder / "2026-11-21.csv").write_bytes(b"Time,V\n2026-11-21 08:00:00,1\n")
    listed = reader.list_files(tmp_path, "wattmon", MAC)
    assert [f.name for f in listed] == ["2026-11-21.csv.gz", "2026-11-22.csv"]


# -- GET /api/devices/{id} -------------------------------------------------------------


async def test_device_document_has_counters_header_files_and_quarantine(
    start_client, tmp_path, clock
):
    client = await start_client(max_file_bytes=300)
    await post_rows(client, MAC, rows_at(T0, 5))
    await post_rows(client, MAC, rows_at(T0 + 300, 5))
    bad = "1,2\n3,4\n"  # no header row: quarantined
    resp = await client.post("/wattmon", data=wattmon_form(MAC, bad), headers=FORM)
    assert await resp.text() == "OK"
    await gzip_closed(tmp_path / "data", "wattmon", MAC)

    doc = await get_json(client, "/api/devices/00:1A:2B:3C:4D:5E")  # any MAC spelling
    assert doc["id"] == MAC and doc["protocol"] == "wattmon"
    assert (doc["blocks"], doc["records"], doc["quarantined"]) == (2, 10, 1)
    assert doc["header"] == ["Time", "V", "A"]
    assert [f["name"] for f in doc["files"]] == ["2026-11-21_0001.csv", "2026-11-21.csv.gz"]
    newest, oldest = doc["files"]
    assert (
        newest["rows"] == 5 and newest["compressed"] is False and newest["period"] == "2026-11-21"
    )
    assert oldest["rows"] is None and oldest["compressed"] is True
    assert newest["path"] == f"wattmon/{MAC}/2026-11-21_0001.csv"
    [block] = doc["quarantined_blocks"]
    assert block["name"] == hashlib.md5(bad.encode()).hexdigest()
    assert "header" in block["reason"] or block["reason"]

    # A file's download is its bytes on disk.
    resp = await client.get(f"/api/devices/{MAC}/files/2026-11-21.csv.gz")
    assert resp.status == 200
    raw = gzip.decompress(await resp.read()).decode()
    assert raw.splitlines()[1:] == rows_at(T0, 5)
    for name in ("2026-11-21.csv", "..%2f..%2fetc%2fpasswd", ".ingestd-keys"):
        assert (await client.get(f"/api/devices/{MAC}/files/{name}")).status in (400, 404)


async def test_device_on_disk_from_before_the_start_is_found(start_client, tmp_path):
    folder = tmp_path / "data" / "wattmon" / OTHER
    folder.mkdir(parents=True)
    (folder / "2026-11-20.csv").write_text("Time,V\n2026-11-20 08:00:00,1\n")
    client = await start_client()
    doc = await get_json(client, f"/api/devices/{OTHER}")
    assert doc["files"][0]["rows"] == 1 and doc["header"] == ["Time", "V"]
    text = await get_text(client, f"/api/devices/{OTHER}/data")
    assert text == "Time,V\n2026-11-20 08:00:00,1\n"


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/api/devices/.hidden", 400),
        ("/api/devices/a%2Fb", 400),  # decoded: `a/b` is no device id
        ("/api/devices/%2e%2e%2f%2e%2e%2fetc", 400),
        ("/api/devices/00112233445", 404),  # 11 digits: a stream name, unknown
        ("/api/devices/" + "x" * 129, 400),
        ("/api/devices/a b", 400),
        (f"/api/devices/{MAC}?protocol=nats", 400),
        ("/api/devices/0011223344ff", 404),
        ("/api/devices/0011223344ff/data", 404),
        ("/devices/..%2F..%2F", 400),
        ("/devices/%2e%2e%2f", 400),
        ("/api/devices/%00/data", 400),
        ("/api/devices/x/files/..", 404),
    ],
)
async def test_bad_or_unknown_ids(client, tmp_path, path, status):
    resp = await client.get(path)
    assert resp.status == status, (path, await resp.text())
    assert (await resp.text()).startswith("ERROR")


async def test_access_follows_the_status_section(start_client, tmp_path):
    client = await start_client(status_config(tmp_path / "data", token="s3cret"))
    await post_rows(client, MAC, rows_at(T0, 2))
    for path in (
        f"/api/devices/{MAC}",
        f"/api/devices/{MAC}/data",
        f"/api/devices/{MAC}/chart",
        f"/devices/{MAC}",
        f"/api/devices/{MAC}/files/2026-11-21.csv",
    ):
        assert (await client.get(path)).status == 401, path
        assert (await client.get(path, params={"token": "s3cret"})).status == 200, path
    await client.close()
    client = await start_client(status_config(tmp_path / "data", enabled=False))
    assert (await client.get(f"/api/devices/{MAC}/data")).status == 404


async def test_posting_under_the_view_paths_is_not_a_stream(client, tmp_path):
    for path in ("/api/devices/x", "/devices/x", "/api/devices/x/data"):
        resp = await client.post(path, data=b'{"a": 1}', headers=JSON)
        assert resp.status in (404, 405), path
    assert not (tmp_path / "data" / "json").exists()


# -- the chart ---------------------------------------------------------------------------


async def test_chart_downsamples_to_500_points_and_keeps_spikes(client, clock):
    rows = rows_at(T0 - 3000 * 20, 3000, step=20)  # the last 1000 minutes
    rows[1234] = rows[1234].split(",")[0] + ",9999.0,1.0"  # one spike
    for i in range(0, 3000, 500):
        await post_rows(client, MAC, rows[i : i + 500])
    doc = await get_json(client, f"/api/devices/{MAC}/chart", window="1000m")
    assert doc["records"] == 3000 and doc["max_points"] == 500
    series = {s["name"]: s["points"] for s in doc["series"]}
    assert set(series) == {"V", "A"}
    assert 400 < len(series["V"]) <= 500
    assert max(v for _, v in series["V"]) == 9999.0
    assert doc["latest"]["values"] == [
        ["Time", rows[-1].split(",")[0]],
        ["V", rows[-1].split(",")[1]],
        ["A", rows[-1].split(",")[2]],
    ]
    small = await get_json(client, f"/api/devices/{MAC}/chart", window="10m")
    assert len({s["name"]: s for s in small["series"]}["V"]["points"]) == 30  # every row
    assert small["records"] == 30


def test_min_max_keeps_each_buckets_extremes_in_order():
    times = [float(t) for t in range(100)]
    values = [0.0] * 100
    values[10], values[11] = 5.0, -5.0
    points = min_max(times, values, 0.0, 100.0, 10)
    assert len(points) <= 20
    assert (10.0, 5.0) in points and (11.0, -5.0) in points
    assert points == sorted(points)
    few = list(zip(times[:5], values[:5], strict=True))
    assert min_max(times[:5], values[:5], 0.0, 100.0, 10) == few


async def test_json_stream_chart_plots_numeric_leaves(client, clock):
    for i in range(5):
        clock.now = T0 + i * 60
        body = json.dumps({"rx": i, "if": {"tx": i * 2, "name": "eth0"}, "ok": True})
        assert (await client.post(f"/{STREAM}", data=body, headers=JSON)).status == 200
    doc = await get_json(client, f"/api/devices/{STREAM}/chart")
    series = {s["name"]: s["points"] for s in doc["series"]}
    assert set(series) == {"rx", "if.tx"}
    assert [v for _, v in series["if.tx"]] == [0, 2, 4, 6, 8]
    assert dict(doc["latest"]["values"]) == {
        "rx": "4",
        "if.tx": "8",
        "if.name": "eth0",
        "ok": "true",
    }


# -- /metrics ------------------------------------------------------------------------------


def gauge(text: str, name: str) -> dict[str, float]:
    found = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line.rsplit(" ", 1)
            found[labels[len(name) :]] = float(value)
    return found


async def test_silent_gauges_follow_the_clock(start_client, tmp_path, clock):
    client = await start_client(status_config(tmp_path / "data", last_seen_metric_devices=1))
    await post_rows(client, MAC, rows_at(T0, 1))
    await post_rows(client, OTHER, rows_at(T0, 1))
    assert (await client.post(f"/{STREAM}", data=b"{}", headers=JSON)).status == 200
    text = await get_text(client, "/metrics")
    assert gauge(text, "ingestd_devices_known") == {
        '{protocol="wattmon"}': 2,
        '{protocol="json"}': 1,
    }
    assert gauge(text, "ingestd_devices_silent") == {
        '{protocol="wattmon"}': 0,
        '{protocol="json"}': 0,
    }
    # The first device by (protocol, id): the same one at every scrape.
    assert gauge(text, "ingestd_device_last_seen_timestamp_seconds") == {
        f'{{device="{STREAM}",protocol="json"}}': T0
    }

    clock.now = T0 + 15 * 60  # silent after 900 s
    text = await get_text(client, "/metrics")
    assert gauge(text, "ingestd_devices_silent") == {
        '{protocol="wattmon"}': 2,
        '{protocol="json"}': 1,
    }
    await post_rows(client, MAC, rows_at(clock.now, 1))
    text = await get_text(client, "/metrics")
    assert gauge(text, "ingestd_devices_silent") == {
        '{protocol="wattmon"}': 1,
        '{protocol="json"}': 1,
    }
    assert "ingestd_device_last_seen_timestamp_seconds" in text


async def test_last_seen_gauge_is_off_by_default(client):
    await post_rows(client, MAC, rows_at(T0, 1))
    text = await get_text(client, "/metrics")
    assert "ingestd_device_last_seen_timestamp_seconds" not in text


# -- ingestd quarantine list|replay -----------------------------------------------------


async def test_quarantine_list_and_replay(client, tmp_path, capsys):
    data_dir = tmp_path / "data"
    bad = "2026-11-21 08:00:00,1\n"  # the header was lost
    resp = await client.post("/wattmon", data=wattmon_form(MAC, bad), headers=FORM)
    assert await resp.text() == "OK"
    md5 = hashlib.md5(bad.encode()).hexdigest()

    code = await asyncio.to_thread(cli_main, ["quarantine", "list", "--data-dir", str(data_dir)])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith(f"{MAC} {md5} 2026-11-21T08:00:00.000Z ")

    url = f"http://127.0.0.1:{client.server.port}/wattmon"
    args = ["quarantine", "replay", MAC, md5, "--data-dir", str(data_dir), "--url", url]
    code = await asyncio.to_thread(cli_main, args)
    assert code == 1 and "still not a valid block" in capsys.readouterr().err

    block = quarantine.block_path(data_dir, MAC, md5, "wattmon")
    await asyncio.to_thread(block.write_text, "Time,V\n" + bad)  # fixed by hand
    code = await asyncio.to_thread(cli_main, args)
    out, err = capsys.readouterr()
    assert (code, out) == (0, f"replayed {MAC} {md5}\n"), err
    text = await get_text(client, f"/api/devices/{MAC}/data")
    assert text == "Time,V\n" + bad
    assert (await get_json(client, f"/api/devices/{MAC}"))["quarantined_blocks"] == []
    code = await asyncio.to_thread(
        cli_main, ["quarantine", "list", MAC, "--data-dir", str(data_dir)]
    )
    assert code == 0 and capsys.readouterr().out == ""
    assert (
        await asyncio.to_thread(
            cli_main, ["quarantine", "replay", MAC, "../x", "--data-dir", str(data_dir)]
        )
    ) == 1


async def test_a_devices_recent_refusals_are_listed_newest_first(client, clock):
    data = "Time,Value\n2026-11-21 08:00:00,1\n"
    assert (await client.post("/wattmon", data=wattmon_form(MAC, data), headers=FORM)).status == 200
    codes = []
    for i in range(12):
        clock.now += 1
        resp = await client.post(
            "/wattmon", data=wattmon_form(MAC, data, md5="0" * 32), headers=FORM
        )
        assert resp.status == 400
        codes.append(i)
    resp = await client.get(f"/api/devices/{MAC}")
    doc = await resp.json()
    errors = doc["recent_errors"]
    assert len(errors) == 10  # the last ten
    assert [e["at"] for e in errors] == sorted((e["at"] for e in errors), reverse=True)
    assert {e["code"] for e in errors} == {"bad_md5"}
    assert doc["last_error"] == "bad_md5" and doc["last_error_at"] == errors[0]["at"]
