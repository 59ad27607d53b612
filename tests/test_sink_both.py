"""`sink = "both"` against a real nats-server: a refused request leaves
nothing in the files, an acknowledged one is in the stream and in the files
once, with one `received_at`, so `ingestd export` rebuilds the files."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest
from aiohttp.test_utils import TestClient
from nats_server import NATS_SERVER, NatsServer
from test_jetstream import (
    device_files,
    js_config,
    post_block,
    start,
    stream_messages,
    wait_health,
)

from ingestd.config import Config
from ingestd.tools.export import ExportOptions, export

pytestmark = pytest.mark.skipif(
    NATS_SERVER is None, reason="nats-server not installed (apt-get install nats-server)"
)

MAC = "00:1A:2B:3C:4D:5E"
DEVICE = "001a2b3c4d5e"
BLOCK = "Time,V\n2026-11-21 08:00:00,230.1\n"


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    server = NatsServer(tmp_path / "nats")
    await server.start()
    yield server
    await server.stop()


def both_config(data_dir: Path, server: NatsServer, **jetstream: Any) -> Config:
    return js_config(data_dir, server, wattmon="both", json_sink="both", **jetstream)


def stored_files(data_dir: Path) -> dict[str, bytes]:
    """The device and quarantine files (what export must rebuild)."""
    return device_files(data_dir) if data_dir.exists() else {}


async def post_json(
    client: TestClient, stream: str, doc: dict[str, Any], key: str | None = None
) -> int:
    headers = {"Idempotency-Key": key} if key else {}
    try:
        resp = await client.post(f"/{stream}", data=json.dumps(doc).encode(), headers=headers)
        await resp.read()
    except aiohttp.ClientError:
        return 0
    return resp.status


async def assert_export_rebuilds(config: Config, server: NatsServer, out: Path) -> None:
    """The stream, exported, gives the collector's files byte for byte."""
    written = stored_files(Path(config.storage.data_dir))
    summary = await export(
        ExportOptions(out=out, jetstream=config.jetstream, storage=config.storage)
    )
    assert summary.messages == len(await stream_messages(server))
    assert stored_files(out) == written


async def test_refused_while_nats_is_down_leaves_nothing_in_the_files(
    start_client, nats_server, tmp_path, clock
):
    config = both_config(tmp_path / "data", nats_server)
    client = await start(start_client, config)
    await nats_server.kill()
    await wait_health(client, 503)

    for _ in range(3):  # each device resends, a little later every time
        status, text, _ = await post_block(client, BLOCK)
        assert (status, text) == (503, "ERROR: jetstream unavailable; retry later")
        assert await post_json(client, "keyed", {"v": 1}, key="k-1") == 503
        assert await post_json(client, "plain", {"v": 2}) == 503
        clock.now += 1.5
    assert stored_files(tmp_path / "data") == {}

    await nats_server.start()
    await wait_health(client, 200)
    assert (await post_block(client, BLOCK))[:2] == (200, "OK")
    assert await post_json(client, "keyed", {"v": 1}, key="k-1") == 200
    assert await post_json(client, "plain", {"v": 2}) == 200
    await client.close()

    files = stored_files(tmp_path / "data")
    assert files[f"wattmon/{DEVICE}/2026-11-21.csv"] == b"Time,V\n2026-11-21 08:00:00,230.1\n"
    for stream in ("keyed", "plain"):
        lines = files[f"json/{stream}/2026-11-21.jsonl"].splitlines()
        assert len(lines) == 1  # the one that was answered OK
        assert json.loads(lines[0])["received_at"] == "2026-11-21T08:00:04.500Z"
    assert len(await stream_messages(nats_server)) == 3
    await assert_export_rebuilds(config, nats_server, tmp_path / "central")


async def test_too_large_for_nats_is_refused_before_anything_is_stored(start_client, tmp_path):
    server = NatsServer(tmp_path / "nats", max_payload=4096)
    await server.start()
    try:
        client = await start(start_client, both_config(tmp_path / "data", server))
        rows = "".join(f"2026-11-21 08:00:{i % 60:02d},{i}\n" for i in range(250))
        status, text, _ = await post_block(client, "Time,V\n" + rows)
        assert (status, text.split(":")[0]) == (413, "ERROR")
        assert await post_json(client, "big", {"pad": "x" * 5000}) == 413
        assert await post_json(client, "big", {"pad": "x" * 5000}, key="k") == 413
        await client.close()
        assert stored_files(tmp_path / "data") == {}
        assert await stream_messages(server) == []
    finally:
        await server.stop()


async def test_too_large_for_the_streams_max_msg_size_is_refused_with_413(
    start_client, nats_server, tmp_path
):
    """A stream made by someone else with a smaller message limit: a resend
    would never get in, so it is a 413 (not a 503 forever), stored nowhere."""
    nc = await nats.connect(nats_server.url)
    try:
        await nc.jetstream().add_stream(name="INGESTD", subjects=["ingestd.>"], max_msg_size=2048)
    finally:
        await nc.close()
    client = await start(start_client, both_config(tmp_path / "data", nats_server))
    assert await post_json(client, "big", {"pad": "x" * 2048}) == 413
    assert await post_json(client, "small", {"v": 1}) == 200
    await wait_health(client, 200)
    await client.close()
    assert list(stored_files(tmp_path / "data")) == ["json/small/2026-11-21.jsonl"]
    assert len(await stream_messages(nats_server)) == 1


async def test_a_file_failure_after_the_stream_ack_keeps_the_streams_received_at(
    start_client, nats_server, tmp_path, clock
):
    """JetStream stored it, the disk did not: 503, and the resend (a duplicate
    in the stream) is stored in the file as the stream has it."""
    config = both_config(tmp_path / "data", nats_server)
    client = await start(start_client, config)
    blocker = tmp_path / "data" / "json" / "meter"
    blocker.parent.mkdir(parents=True)
    blocker.write_bytes(b"")  # a file where the stream's folder goes: writes fail

    assert await post_json(client, "meter", {"v": 1}, key="k-1") == 503
    assert len(await stream_messages(nats_server)) == 1  # the stream has it already
    blocker.unlink()
    clock.now += 30
    await wait_health(client, 200)
    assert await post_json(client, "meter", {"v": 1}, key="k-1") == 200
    await client.close()

    [message] = await stream_messages(nats_server)
    files = stored_files(tmp_path / "data")
    assert files == {"json/meter/2026-11-21.jsonl": message.data}
    assert json.loads(message.data)["received_at"] == "2026-11-21T08:00:00.000Z"
    await assert_export_rebuilds(config, nats_server, tmp_path / "central")


async def test_a_stream_copy_that_cannot_be_read_back_still_answers_ok(
    start_client, nats_server, tmp_path, clock, caplog
):
    """The stream's copy is gone (deleted; the server still knows its id):
    the file keeps the resend as received rather than refusing it forever."""
    config = both_config(tmp_path / "data", nats_server)
    client = await start(start_client, config)
    blocker = tmp_path / "data" / "json" / "meter"
    blocker.parent.mkdir(parents=True)
    blocker.write_bytes(b"")
    assert await post_json(client, "meter", {"v": 1}, key="k-1") == 503
    nc = await nats.connect(nats_server.url)
    try:
        await nc.jetstream().delete_msg("INGESTD", 1)
    finally:
        await nc.close()
    blocker.unlink()
    clock.now += 30
    await wait_health(client, 200)
    assert await post_json(client, "meter", {"v": 1}, key="k-1") == 200
    await client.close()
    [line] = stored_files(tmp_path / "data")["json/meter/2026-11-21.jsonl"].splitlines()
    assert json.loads(line)["received_at"] == "2026-11-21T08:00:30.000Z"
    assert "jetstream_copy_unavailable protocol=json device=meter" in caplog.text


async def test_an_ack_lost_in_a_hang_keeps_the_streams_received_at(
    start_client, nats_server, tmp_path, clock
):
    """The server stored the first try but its ack came too late (503): the
    resend is a duplicate there, and the file gets the stream's copy."""
    config = both_config(tmp_path / "data", nats_server, publish_timeout_secs=0.5)
    client = await start(start_client, config)
    await nats_server.pause()
    try:
        assert await post_json(client, "meter", {"v": 1}, key="k-1") == 503
        assert stored_files(tmp_path / "data") == {}
    finally:
        nats_server.resume()
    await wait_health(client, 200)
    clock.now += 30
    assert await post_json(client, "meter", {"v": 1}, key="k-1") == 200
    await client.close()

    [message] = await stream_messages(nats_server)
    assert stored_files(tmp_path / "data") == {"json/meter/2026-11-21.jsonl": message.data}
    await assert_export_rebuilds(config, nats_server, tmp_path / "central")


async def test_nats_killed_and_restarted_under_load(start_client, nats_server, tmp_path, clock):
    """Wattmon devices and JSON pushers post (resending until OK) while the
    server is killed and started twice: the files hold exactly what was
    acknowledged, once; the stream holds the same; export rebuilds the files."""
    config = both_config(tmp_path / "data", nats_server, publish_timeout_secs=1.0)
    client = await start(start_client, config)
    devices, streams, each = 6, 4, 30
    acked_blocks: set[tuple[str, int]] = set()
    acked_docs: set[tuple[str, int]] = set()
    refused = Counter[int]()
    progress = asyncio.Condition()

    async def until_ok(send: Any) -> None:
        for _ in range(600):  # a device resends until it reads OK
            clock.now += 0.001  # every try is received at another time
            status = await send()
            if status == 200:
                async with progress:
                    progress.notify_all()
                return
            refused[status] += 1
            await asyncio.sleep(0.02)
        raise AssertionError("never acknowledged")

    async def wattmon_device(n: int) -> None:
        mac = f"0000000000{n:02x}"
        for i in range(each):
            data = f"Time,N,I\n2026-11-21 08:{i:02d}:00,{n},{i}\n"

            async def send(data: str = data) -> int:
                try:
                    return (await post_block(client, data, mac))[0]
                except aiohttp.ClientError:
                    return 0

            await until_ok(send)
            acked_blocks.add((mac, i))

    async def json_pusher(n: int) -> None:
        for i in range(each):
            doc = {"n": n, "i": i}
            await until_ok(lambda doc=doc, i=i: post_json(client, f"s{n}", doc, key=f"{n}-{i}"))
            acked_docs.add((f"s{n}", i))

    async def outages() -> None:
        total = (devices + streams) * each
        for share in (4, 2):  # at a quarter and at half of the records
            async with progress:
                await progress.wait_for(
                    lambda share=share: len(acked_blocks) + len(acked_docs) >= total // share
                )
            await nats_server.kill()
            await asyncio.sleep(0.3)
            await nats_server.start()

    async with asyncio.timeout(90):
        await asyncio.gather(
            outages(),
            *(wattmon_device(n) for n in range(devices)),
            *(json_pusher(n) for n in range(streams)),
        )
    await client.close()
    assert set(refused) <= {503}
    assert refused[503] > 0  # the outages were seen

    files = stored_files(tmp_path / "data")
    rows: Counter[tuple[str, int]] = Counter()
    docs: Counter[tuple[str, int]] = Counter()
    for name, content in files.items():
        folder, device, _ = name.split("/")
        for line in content.splitlines():
            if folder == "wattmon" and not line.startswith(b"Time"):
                rows[(device, int(line.split(b",")[2]))] += 1
            elif folder == "json":
                body = json.loads(line)["body"]
                docs[(device, body["i"])] += 1
    assert set(rows) == acked_blocks and max(rows.values()) == 1
    assert set(docs) == acked_docs and max(docs.values()) == 1
    in_stream = Counter(
        (m.headers["Ingestd-Device"], m.headers["Ingestd-Key"])
        for m in await stream_messages(nats_server)
    )
    assert len(in_stream) == len(acked_blocks) + len(acked_docs)
    assert max(in_stream.values()) == 1
    await assert_export_rebuilds(config, nats_server, tmp_path / "central")
