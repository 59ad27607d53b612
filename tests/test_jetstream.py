"""The JetStream sink against a real nats-server: subjects, headers, resends,
restarts, outages, and the export that rebuilds the files."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import math
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest
from aiohttp.test_utils import TestClient
from conftest import FORM, make_config, wattmon_form
from nats_server import NATS_SERVER, NatsServer

from ingestd.config import Config, ConfigError, JetStreamConfig, validate
from ingestd.http.keys import JETSTREAM
from ingestd.sinks.jetstream.codec import escape_header, format_time, unescape_header
from ingestd.tools.export import ExportOptions, export

pytestmark = pytest.mark.skipif(
    NATS_SERVER is None, reason="nats-server not installed (apt-get install nats-server)"
)

MAC = "00:1A:2B:3C:4D:5E"
DEVICE = "001a2b3c4d5e"
BLOCK = "Time,V\r\n2026-11-21 08:00:00,230.1\r\n2026-11-21 08:01:00,230.2\r\n"
STREAM = "INGESTD"


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    server = NatsServer(tmp_path / "nats")
    await server.start()
    yield server
    await server.stop()


def js_config(
    data_dir: Path,
    server: NatsServer,
    *,
    wattmon: str = "jetstream",
    json_sink: str = "jetstream",
    storage: dict[str, Any] | None = None,
    **jetstream: Any,
) -> Config:
    config = make_config(data_dir, **(storage or {}))
    settings = {"reconnect_wait_secs": 0.2, "publish_timeout_secs": 2.0, **jetstream}
    return validate(
        dataclasses.replace(
            config,
            wattmon=dataclasses.replace(config.wattmon, sink=wattmon),
            json=dataclasses.replace(config.json, sink=json_sink),
            jetstream=dataclasses.replace(config.jetstream, servers=(server.url,), **settings),
        )
    )


async def wait_health(client: TestClient, status: int = 200) -> None:
    async with asyncio.timeout(10):
        while True:
            resp = await client.get("/healthz")
            await resp.read()
            if resp.status == status:
                return
            await asyncio.sleep(0.05)


async def start(start_client: Any, config: Config, *, healthy: bool = True) -> TestClient:
    client: TestClient = await start_client(config)
    if healthy:
        await wait_health(client)
    return client


async def post_block(client: TestClient, data: str, mac: str = MAC) -> tuple[int, str, Any]:
    resp = await client.post("/wattmon", data=wattmon_form(mac, data), headers=FORM)
    return resp.status, await resp.text(), resp.headers


async def stream_messages(server: NatsServer) -> list[Any]:
    """Every message in the stream, in order."""
    nc = await nats.connect(server.url, max_reconnect_attempts=1, reconnect_time_wait=0.2)
    try:
        js = nc.jetstream()
        info = await js.stream_info(STREAM)
        if info.state.messages == 0:
            return []
        return [
            await js.get_msg(STREAM, seq)
            for seq in range(info.state.first_seq, info.state.last_seq + 1)
        ]
    finally:
        await nc.close()


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


# -- publishing ------------------------------------------------------------------------


async def test_records_are_published_with_subjects_headers_and_bodies(
    start_client, nats_server, tmp_path
):
    client = await start(start_client, js_config(tmp_path / "data", nats_server))
    status, text, _ = await post_block(client, BLOCK)
    assert (status, text) == (200, "OK")
    resp = await client.post(
        "/site-a.mm-1", data=b'{"rx": 1,\n "tx": 2}', headers={"Idempotency-Key": "k-1"}
    )
    assert (resp.status, await resp.text()) == (200, "OK")
    resp = await client.post("/plain", data=b"[1, 2]")
    assert resp.status == 200
    bad = "a,b\r\n1,2,3\r\n"  # MD5 right, rows do not match the header: quarantined
    assert (await post_block(client, bad))[:2] == (200, "OK")

    block, doc, plain, quarantined = await stream_messages(nats_server)

    assert block.subject == f"ingestd.wattmon.{DEVICE}"
    assert block.data == b"2026-11-21 08:00:00,230.1\n2026-11-21 08:01:00,230.2\n"
    assert block.headers == {
        "Nats-Msg-Id": f"wattmon:{DEVICE}:{md5(BLOCK)}",
        "Nats-Expected-Stream": STREAM,
        "Ingestd-Protocol": "wattmon",
        "Ingestd-Device": DEVICE,
        "Ingestd-Received-At": "2026-11-21T08:00:00.000000Z",
        "Ingestd-Key": md5(BLOCK),
        "Ingestd-Count": "2",
        "Ingestd-Csv-Header": "Time,V",
    }

    # '.' separates subject tokens: a stream name's dots become '_'.
    assert doc.subject == "ingestd.json.site-a_mm-1"
    assert doc.data == (
        b'{"received_at":"2026-11-21T08:00:00.000Z","remote":"127.0.0.1",'
        b'"path":"/site-a.mm-1","body":{"rx": 1,  "tx": 2}}\n'
    )
    key = hashlib.sha256(b"k-1").hexdigest()[:32]
    assert doc.headers["Nats-Msg-Id"] == f"json:site-a.mm-1:{key}"
    assert doc.headers["Ingestd-Device"] == "site-a.mm-1"
    assert doc.headers["Ingestd-Remote"] == "127.0.0.1"
    assert doc.headers["Ingestd-Path"] == "/site-a.mm-1"
    assert "Ingestd-Csv-Header" not in doc.headers

    assert plain.subject == "ingestd.json.plain"
    assert plain.headers["Nats-Msg-Id"] == (
        f"json:plain:{hashlib.sha256(plain.data).hexdigest()[:32]}"
    )

    assert quarantined.subject == f"ingestd.quarantine.wattmon.{DEVICE}"
    assert quarantined.data == bad.encode()
    assert quarantined.headers["Nats-Msg-Id"] == f"quarantine:wattmon:{DEVICE}:{md5(bad)}"
    assert quarantined.headers["Ingestd-Quarantined"]

    # JetStream only: no device files.
    assert not (tmp_path / "data" / "wattmon").exists()
    assert not (tmp_path / "data" / "json").exists()


async def test_resends_are_stored_once_by_the_server(start_client, nats_server, tmp_path, clock):
    client = await start(start_client, js_config(tmp_path / "data", nats_server))
    for _ in range(3):
        assert (await post_block(client, BLOCK))[:2] == (200, "OK")
        clock.now += 5  # resends come later; the block (MAC, MD5) is the same
        for key in ("same-key", "same-key"):
            resp = await client.post("/s", data=b'{"a": 1}', headers={"Idempotency-Key": key})
            assert resp.status == 200
    # Without an Idempotency-Key every post is a new document.
    for _ in range(2):
        clock.now += 1
        resp = await client.post("/s", data=b'{"a": 1}')
        assert resp.status == 200

    messages = await stream_messages(nats_server)
    assert Counter(m.subject for m in messages) == {
        f"ingestd.wattmon.{DEVICE}": 1,
        "ingestd.json.s": 3,
    }
    metrics = await (await client.get("/metrics")).text()
    assert 'ingestd_requests_total{outcome="duplicate",protocol="wattmon"} 2.0' in metrics


async def test_a_file_only_config_never_starts_the_jetstream_sink(start_client, tmp_path):
    client = await start_client(make_config(tmp_path / "data"))
    assert JETSTREAM not in client.app
    assert (await post_block(client, BLOCK))[:2] == (200, "OK")


# -- outages ---------------------------------------------------------------------------


async def test_nats_down_gives_503_then_recovers_by_itself(
    start_client, nats_server, tmp_path, clock
):
    config = js_config(tmp_path / "data", nats_server, json_sink="file")
    client = await start(start_client, config)

    await nats_server.kill()
    status, text, headers = await post_block(client, BLOCK)
    assert status == 503
    assert text.startswith("ERROR: ")
    assert int(headers["Retry-After"]) > 0
    await wait_health(client, 503)
    resp = await client.get("/healthz")
    assert (await resp.text()).startswith("ERROR")
    # A route on the file sink is not affected.
    resp = await client.post("/s", data=b"{}")
    assert resp.status == 200

    await nats_server.start()  # same port, same store
    await wait_health(client, 200)
    clock.now += 1
    assert (await post_block(client, BLOCK))[:2] == (200, "OK")
    assert len(await stream_messages(nats_server)) == 1


async def test_a_hung_nats_server_gives_503_and_the_resend_is_stored_once(
    start_client, nats_server, tmp_path, clock
):
    config = js_config(tmp_path / "data", nats_server, publish_timeout_secs=0.5)
    client = await start(start_client, config)
    await nats_server.pause()
    try:
        started = time.monotonic()
        status, text, headers = await post_block(client, BLOCK)
        assert (status, text) == (503, "ERROR: jetstream unavailable; retry later")
        assert time.monotonic() - started < 3  # the publish timeout, not forever
        assert "Retry-After" in headers
        await wait_health(client, 503)
    finally:
        nats_server.resume()
    await wait_health(client, 200)
    # The server may well have stored the block it read late; the device's
    # resend is then a duplicate.
    clock.now += 30
    assert (await post_block(client, BLOCK))[:2] == (200, "OK")
    assert len(await stream_messages(nats_server)) == 1


async def test_starts_while_nats_is_unreachable(start_client, nats_server, tmp_path):
    config = js_config(tmp_path / "data", nats_server)
    await nats_server.kill()
    client = await start(start_client, config, healthy=False)
    resp = await client.get("/healthz")
    assert resp.status == 503
    status, text, headers = await post_block(client, BLOCK)
    assert (status, text) == (503, "ERROR: jetstream unavailable; retry later")
    assert headers["Retry-After"] == "5"

    await nats_server.start()
    await wait_health(client, 200)  # connected, stream created
    assert (await post_block(client, BLOCK))[:2] == (200, "OK")
    assert len(await stream_messages(nats_server)) == 1


async def test_nats_restart_mid_load_loses_nothing_acknowledged(
    start_client, nats_server, tmp_path
):
    """Devices post (and resend until OK) while the server is killed and
    restarted: every acknowledged block is in the stream exactly once."""
    client = await start(start_client, js_config(tmp_path / "data", nats_server))
    devices, blocks_each = 8, 40
    acked: set[tuple[str, str]] = set()
    refused = Counter[int]()
    halfway = asyncio.Event()

    async def device(n: int) -> None:
        mac = f"0000000000{n:02x}"
        for i in range(blocks_each):
            data = f"Time,N\n2026-11-21 08:{i:02d}:00,{n}\n"
            for _ in range(400):  # a device resends until it reads OK
                try:
                    status, _, _ = await post_block(client, data, mac)
                except aiohttp.ClientError:
                    status = 0
                if status == 200:
                    acked.add((mac, md5(data)))
                    if len(acked) >= devices * blocks_each // 3:
                        halfway.set()
                    break
                refused[status] += 1
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"device {mac} block {i} never acknowledged")

    async def restart() -> None:
        await halfway.wait()
        await nats_server.kill()
        await asyncio.sleep(0.3)
        await nats_server.start()

    async with asyncio.timeout(45):
        await asyncio.gather(restart(), *(device(n) for n in range(devices)))

    assert set(refused) <= {503}  # an outage is only ever a 503 (if one was seen at all)
    stored = Counter(
        (m.headers["Ingestd-Device"], m.headers["Ingestd-Key"])
        for m in await stream_messages(nats_server)
    )
    assert set(stored) == acked
    assert len(acked) == devices * blocks_each
    assert max(stored.values()) == 1
    assert client.app[JETSTREAM].stats.disconnects == 1

    # The server rebuilt its duplicate window from its store: a resend of a
    # block it has (as after an ack lost in the crash) is stored once.
    for i in range(0, blocks_each, 7):
        data = f"Time,N\n2026-11-21 08:{i:02d}:00,3\n"
        assert (await post_block(client, data, "000000000003"))[:2] == (200, "OK")
    assert len(await stream_messages(nats_server)) == devices * blocks_each


# -- export ----------------------------------------------------------------------------


def device_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".ingestd")
    }


async def test_export_rebuilds_what_the_file_sink_wrote(start_client, nats_server, tmp_path, clock):
    window = 0.3
    config = js_config(
        tmp_path / "data",
        nats_server,
        wattmon="both",
        json_sink="both",
        storage={"max_file_bytes": 120},
        duplicate_window_secs=window,
    )
    client = await start(start_client, config)
    other = "AA-BB-CC-DD-EE-FF"
    posts = [
        (MAC, BLOCK),
        (MAC, "Time,V\n2026-11-21 08:02:00,230.3\n"),
        (MAC, "Time,V\n2026-11-21 08:02:00,230.3\n"),  # a resend
        (MAC, "Time,V,I\n2026-11-21 08:03:00,230.4,1.0\n"),  # another header: new file
        (other, "Time,T\n2026-11-21 08:00:00,21.5\n"),
        (MAC, "a,b\n1,2,3\n"),  # quarantined
    ] + [(other, f"Time,T\n2026-11-21 09:{i:02d}:00,2{i}.0\n") for i in range(6)]  # by size
    for n, (mac, data) in enumerate(posts):
        if n == 2:
            # The resend comes after the server's window: the stream has the
            # block twice, the files once (the file sink's window is 7 days).
            await asyncio.sleep(window + 0.1)
        assert (await post_block(client, data, mac))[:2] == (200, "OK")
        clock.now += 7
    for n in range(3):
        resp = await client.post("/mm.1", data=json.dumps({"n": n}).encode())
        assert resp.status == 200
        resp = await client.post("/other", data=b"{}", headers={"Idempotency-Key": "once"})
        assert resp.status == 200
        clock.now += 1
    clock.now += 86400  # the next day: new files
    assert (await post_block(client, "Time,V\n2026-11-22 08:00:00,1\n"))[:2] == (200, "OK")
    resp = await client.post("/mm.1", data=b'{"day": 2}')
    assert resp.status == 200
    await client.close()  # the file sink syncs and closes

    written = device_files(tmp_path / "data")
    assert "wattmon/001a2b3c4d5e/2026-11-21_0001.csv" in written  # a new header
    assert "wattmon/aabbccddeeff/2026-11-21_0001.csv" in written  # size
    assert "wattmon/001a2b3c4d5e/2026-11-22.csv" in written  # next day
    assert any(name.startswith("quarantine/wattmon/001a2b3c4d5e/") for name in written)

    out = tmp_path / "central"
    options = ExportOptions(
        out=out, jetstream=config.jetstream, storage=config.storage, durable="central"
    )
    summary = await export(options)
    assert summary.messages == len(await stream_messages(nats_server))
    assert summary.duplicates == 1
    assert device_files(out) == written

    # A durable consumer goes on where it stopped: nothing new, nothing again.
    again = await export(options)
    assert again.messages == 0
    assert device_files(out) == written

    # From a sequence: the stream's tail only (whose blocks the window drops).
    tail = await export(
        dataclasses.replace(options, out=tmp_path / "tail", durable=None, from_seq=summary.last_seq)
    )
    assert tail.messages == 1
    assert list(device_files(tmp_path / "tail")) == ["json/mm.1/2026-11-22.jsonl"]


async def test_export_follows_new_messages_until_stopped(start_client, nats_server, tmp_path):
    config = js_config(tmp_path / "data", nats_server)
    client = await start(start_client, config)
    out = tmp_path / "central"
    stop = asyncio.Event()
    task = asyncio.create_task(
        export(ExportOptions(out=out, jetstream=config.jetstream, follow=True), stop)
    )
    assert (await post_block(client, BLOCK))[:2] == (200, "OK")
    target = out / "wattmon" / DEVICE / "2026-11-21.csv"
    async with asyncio.timeout(10):
        while not target.exists():  # noqa: ASYNC110 - a file, not an event, tells
            await asyncio.sleep(0.05)
    stop.set()
    summary = await asyncio.wait_for(task, 10)
    assert summary.messages == 1
    assert target.read_bytes() == b"Time,V\n2026-11-21 08:00:00,230.1\n2026-11-21 08:01:00,230.2\n"


async def test_a_record_over_max_payload_is_refused_without_dropping_the_connection(
    start_client, tmp_path
):
    server = NatsServer(tmp_path / "nats", max_payload=4096)
    await server.start()
    try:
        client = await start(start_client, js_config(tmp_path / "data", server))
        rows = ""
        while len(rows) < 4096 - 100:  # the body fits; with the headers it does not
            rows += "2026-11-21 08:00:00,1\n"
        big = "Time,V\n" + rows
        status, text, _ = await post_block(client, big)
        assert (status, text.split(":")[0]) == (413, "ERROR")
        assert (await post_block(client, BLOCK))[:2] == (200, "OK")
        await wait_health(client, 200)
        assert client.app[JETSTREAM].stats.disconnects == 0
    finally:
        await server.stop()


async def test_a_token_protected_server(start_client, tmp_path):
    server = NatsServer(tmp_path / "nats", token="s3cret")
    await server.start()
    try:
        config = js_config(tmp_path / "data", server, token="s3cret")
        client = await start(start_client, config)
        assert (await post_block(client, BLOCK))[:2] == (200, "OK")
        summary = await export(ExportOptions(out=tmp_path / "out", jetstream=config.jetstream))
        assert summary.stored == 1
    finally:
        await server.stop()


# -- pieces ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw", [b"Time,V", b" Time , V ", b"100%,a%20b", "T\u00b0C,\u00e9".encode(), b"\t", b"  ", b""]
)
def test_header_values_round_trip(raw):
    value = escape_header(raw)
    assert value == value.strip() and value.isascii() and value.isprintable()
    assert unescape_header(value) == raw


def test_received_time_is_truncated_not_rounded():
    assert format_time(1_795_248_000.0) == "2026-11-21T08:00:00.000000Z"
    just_before = math.nextafter(1_795_248_000.0, 0.0)  # the hour's last float
    assert format_time(just_before) == "2026-11-21T07:59:59.999999Z"


@pytest.mark.parametrize(
    "settings",
    [
        {"subject_prefix": "a..b"},
        {"subject_prefix": "a.*"},
        {"subject_prefix": "a b"},
        {"stream": "A.B"},
        {"replicas": 0},
        {"duplicate_window_secs": 0},
        {"max_age_days": 0.001, "duplicate_window_secs": 120.0},
        {"password": "p"},
        {"token": "t", "user": "u"},
        {"servers": ()},
    ],
)
def test_bad_jetstream_settings_are_refused(settings):
    config = dataclasses.replace(Config(), jetstream=JetStreamConfig(**settings))
    with pytest.raises(ConfigError, match="jetstream"):
        validate(config)


def test_export_exits_nonzero_without_a_server(tmp_path):
    """`python -m ingestd.tools.export` against nothing: a clear error, exit 1."""
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ingestd.tools.export",
            "--servers",
            "nats://127.0.0.1:1",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert "export_failed" in proc.stderr
    assert time.monotonic() - started < 30
