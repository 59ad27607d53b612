"""Worker mode with a JetStream sink: each shard has its own connection to
NATS, and the main process's /healthz and /metrics see all of them."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import nats
import pytest
from conftest import FORM, wattmon_form
from daemon import DaemonProcess, write_config
from nats_server import NATS_SERVER, NatsServer

pytestmark = pytest.mark.skipif(
    NATS_SERVER is None, reason="nats-server not installed (apt-get install nats-server)"
)

DEVICES = 24


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[NatsServer]:
    server = NatsServer(tmp_path / "nats")
    await server.start()
    yield server
    await server.stop()


def mac(n: int) -> str:
    return f"02000000{n:04x}"


def block(n: int, seq: int) -> str:
    return f"Time,Device,Seq\n2026-11-21 08:00:{seq:02d},{n},{seq}\n"


async def post(session: aiohttp.ClientSession, url: str, n: int, seq: int) -> int:
    # A new connection each time, so posts land on both workers.
    async with session.post(
        f"{url}/wattmon", data=wattmon_form(mac(n), block(n, seq)), headers=FORM
    ) as resp:
        await resp.read()
        return resp.status


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as resp:
        return resp.status, await resp.text()


async def until(session: aiohttp.ClientSession, url: str, wanted: str) -> str:
    """Poll `url` until its body holds `wanted` (the workers report twice a second)."""
    text = ""
    for _ in range(100):
        _, text = await get(session, url)
        if wanted in text:
            return text
        await asyncio.sleep(0.1)
    raise AssertionError(f"{url} never showed {wanted!r}:\n{text}")


async def published_md5s(server: NatsServer) -> list[str]:
    nc = await nats.connect(server.url, max_reconnect_attempts=1)
    try:
        js = nc.jetstream()
        info = await js.stream_info("INGESTD")
        found = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            message = await js.get_msg("INGESTD", seq)
            assert message.headers is not None
            found.append(message.headers["Ingestd-Key"])
        return found
    finally:
        await nc.close()


async def test_every_shard_publishes_and_the_main_process_sees_their_health(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    config = write_config(
        tmp_path / "ingestd.toml",
        "[server]\nworkers = 2\n"
        '[wattmon]\nsink = "jetstream"\n'
        f'[jetstream]\nservers = ["{nats_server.url}"]\n'
        "reconnect_wait_secs = 0.2\npublish_timeout_secs = 2.0\n",
    )
    daemon = await DaemonProcess.start(
        "--config", str(config), "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data")
    )
    acknowledged: set[tuple[int, int]] = set()
    try:
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            await until(session, f"{daemon.url}/metrics", "ingestd_jetstream_up 1.0")
            for n in range(DEVICES):
                assert await post(session, daemon.url, n, 0) == 200
                acknowledged.add((n, 0))
            text = await until(
                session, f"{daemon.url}/metrics", f"ingestd_jetstream_published_total {DEVICES}.0"
            )
            assert "ingestd_jetstream_connected 1.0" in text

            await nats_server.kill()
            # Every shard's connection is down: the main process says so.
            await until(session, f"{daemon.url}/healthz", "ERROR: jetstream unavailable")
            statuses = [await post(session, daemon.url, n, 1) for n in range(DEVICES)]
            assert set(statuses) == {503}, statuses

            await nats_server.start()
            await until(session, f"{daemon.url}/healthz", "OK")
            # The devices resend what was refused, and one resends an
            # acknowledged block: JetStream keeps each once.
            for n in range(DEVICES):
                for attempt in range(50):
                    if await post(session, daemon.url, n, 1) == 200:
                        acknowledged.add((n, 1))
                        break
                    await asyncio.sleep(0.1 * attempt)
            assert await post(session, daemon.url, 0, 0) == 200
    finally:
        assert await daemon.stop() == 0, daemon.lines
    stored = await published_md5s(nats_server)
    expected = [hashlib.md5(block(n, seq).encode()).hexdigest() for n, seq in acknowledged]
    assert sorted(stored) == sorted(expected)
