"""Running as a service: sd_notify on a real socket, socket activation,
SIGHUP reload, TLS with a certificate made here, /metrics."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from conftest import FORM, wattmon_form
from daemon import DaemonProcess, write_config

BLOCK = "Time,V\n2026-11-21 08:00:00,1\n"


def day_files(folder: Path) -> list[Path]:
    """A device's data files in order. The daemon names them by the day it
    received the data (its real clock), so tests must not assume the date."""
    return sorted(folder.glob("*.csv"))


def stored_rows(folder: Path) -> list[str]:
    """Every data row of a device, header lines left out (a post that
    crosses midnight starts a new file with its own header)."""
    return [row for path in day_files(folder) for row in path.read_text().splitlines()[1:]]


class NotifySocket:
    """The AF_UNIX datagram socket systemd would listen on."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []

    async def wait_for(self, needle: str, timeout: float = 15) -> str:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while True:
                message = (await loop.sock_recv(self.sock, 4096)).decode()
                self.messages.append(message)
                if needle in message:
                    return message

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path):
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


async def post_block(session, url: str, mac: str = "001122334455", block: str = BLOCK, md5="auto"):
    async with session.post(
        f"{url}/wattmon", data=wattmon_form(mac, block, md5), headers=FORM
    ) as r:
        return r.status, await r.text()


async def test_notify_ready_status_watchdog_reload_stopping(tmp_path, notify):
    daemon = await DaemonProcess.start(
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        str(tmp_path / "data"),
        env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"},
    )
    try:
        ready = await notify.wait_for("READY=1")
        assert "STATUS=devices=0" in ready and "queue=0" in ready
        async with aiohttp.ClientSession() as session:  # READY means it answers
            assert await post_block(session, daemon.url) == (200, "OK")
        await notify.wait_for("WATCHDOG=1")
        await notify.wait_for("WATCHDOG=1")  # again, at half the interval
        daemon.signal(signal.SIGHUP)
        await notify.wait_for("RELOADING=1")
        assert "READY=1" in await notify.wait_for("READY=1")
        status = await notify.wait_for("STATUS=devices=1", timeout=10)
        assert "storage=ok" in status
        daemon.signal(signal.SIGTERM)
        await notify.wait_for("STOPPING=1")
    finally:
        assert await daemon.stop() == 0


async def test_socket_activation_keeps_connections_across_a_restart(tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    fd = listener.fileno()
    # systemd passes the socket as fd 3 with LISTEN_FDS=1 and our own PID.
    argv = [
        "bash",
        "-c",
        f'exec 3<&{fd} {fd}<&-; export LISTEN_FDS=1 LISTEN_PID=$$; exec "$@"',
        "_",
        sys.executable,
        "-m",
        "ingestd",
        "serve",
        "--data-dir",
        str(tmp_path / "data"),
    ]
    first = await DaemonProcess.start(argv=argv, pass_fds=[fd])
    assert first.port == port
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        assert await post_block(session, url) == (200, "OK")
    assert await first.stop() == 0
    # Between the two daemons the socket stays open: a device's connection
    # waits in the backlog instead of being refused.
    async with aiohttp.ClientSession() as session:
        waiting = asyncio.create_task(
            post_block(session, url, block="Time,V\n2026-11-21 08:00:01,2\n")
        )
        await asyncio.sleep(0.2)
        second = await DaemonProcess.start(argv=argv, pass_fds=[fd])
        try:
            assert await waiting == (200, "OK")
        finally:
            assert await second.stop() == 0
    listener.close()
    folder = tmp_path / "data" / "wattmon" / "001122334455"
    assert stored_rows(folder) == ["2026-11-21 08:00:00,1", "2026-11-21 08:00:01,2"]


async def test_sighup_applies_new_settings_and_refuses_a_broken_file(tmp_path):
    config = write_config(
        tmp_path / "ingestd.toml",
        (f'[server]\nlisten = "127.0.0.1:0"\n[storage]\ndata_dir = "{tmp_path / "data"}"\n'),
    )
    daemon = await DaemonProcess.start("--config", str(config))
    try:
        async with aiohttp.ClientSession() as session:
            assert await post_block(session, daemon.url, md5=None) == (200, "OK")
            config.write_text(
                config.read_text() + "[wattmon]\nrequire_md5 = true\n"
                'paths = ["/wattmon", "/push"]\n[log]\nformat = "json"\n'
            )
            daemon.signal(signal.SIGHUP)
            line = await daemon.wait_for(b"reloaded")
            assert "wattmon.require_md5" in line and "needs_restart=-" in line
            status, text = await post_block(session, daemon.url, mac="00000000000b", md5=None)
            assert status == 400 and text.startswith("ERROR")
            async with session.post(
                f"{daemon.url}/push", data=wattmon_form("00000000000c", BLOCK), headers=FORM
            ) as resp:
                assert (resp.status, await resp.text()) == (200, "OK")

            config.write_text(config.read_text() + "[storage.bogus]\n")
            daemon.signal(signal.SIGHUP)
            refused = json.loads(await daemon.wait_for(b"reload_refused"))  # JSON log lines now
            assert refused["level"] == "error"
            status, _ = await post_block(session, daemon.url, mac="00000000000d", md5=None)
            assert status == 400  # the running config was kept
    finally:
        assert await daemon.stop() == 0


async def test_sighup_reopens_files_moved_away(tmp_path):
    daemon = await DaemonProcess.start(
        "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data")
    )
    folder = tmp_path / "data" / "wattmon" / "001122334455"
    try:
        async with aiohttp.ClientSession() as session:
            assert await post_block(session, daemon.url) == (200, "OK")
            [first] = day_files(folder)
            first.rename(tmp_path / "moved.csv")
            daemon.signal(signal.SIGHUP)
            await daemon.wait_for(b"reloaded")
            block = "Time,V\n2026-11-21 08:00:05,5\n"
            assert await post_block(session, daemon.url, block=block) == (200, "OK")
    finally:
        assert await daemon.stop() == 0
    [reopened] = day_files(folder)
    assert reopened.read_text() == block
    assert (tmp_path / "moved.csv").read_text() == BLOCK


def make_certificate(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


async def peer_common_name(port: int, cafile: Path) -> str:
    context = ssl.create_default_context(cafile=str(cafile))
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    cert = writer.get_extra_info("peercert")
    writer.close()
    await writer.wait_closed()
    return dict(pair[0] for pair in cert["subject"])["commonName"]


@pytest.mark.skipif(not Path("/usr/bin/openssl").exists(), reason="needs the openssl command")
async def test_tls_serves_https_and_a_renewed_certificate_needs_no_restart(tmp_path):
    old_cert, old_key = await asyncio.to_thread(make_certificate, tmp_path, "first")
    new_cert, new_key = await asyncio.to_thread(make_certificate, tmp_path, "renewed")
    live_cert, live_key = tmp_path / "live.pem", tmp_path / "live.key"
    live_cert.write_bytes(old_cert.read_bytes())
    live_key.write_bytes(old_key.read_bytes())
    config = write_config(
        tmp_path / "ingestd.toml",
        (
            f'[server]\nlisten = "127.0.0.1:0"\ntls_cert = "{live_cert}"\ntls_key = "{live_key}"\n'
            f'[storage]\ndata_dir = "{tmp_path / "data"}"\n'
        ),
    )
    daemon = await DaemonProcess.start("--config", str(config))
    try:
        assert daemon.scheme == "https"
        context = ssl.create_default_context(cafile=str(old_cert))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
            assert await post_block(session, daemon.url) == (200, "OK")
        assert await peer_common_name(daemon.port, old_cert) == "first"
        live_cert.write_bytes(new_cert.read_bytes())
        live_key.write_bytes(new_key.read_bytes())
        daemon.signal(signal.SIGHUP)
        await daemon.wait_for(b"reloaded")
        assert await peer_common_name(daemon.port, new_cert) == "renewed"
    finally:
        assert await daemon.stop() == 0


async def test_metrics_count_requests_records_and_state(client):
    await client.post("/wattmon", data=wattmon_form("001122334455", BLOCK), headers=FORM)
    await client.post("/wattmon", data=wattmon_form("001122334455", BLOCK), headers=FORM)
    await client.post(
        "/wattmon", data=wattmon_form("001122334455", BLOCK, md5="0" * 32), headers=FORM
    )
    await client.post("/stream-1", data=b'{"a": 1}')
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    for line in [
        'ingestd_requests_total{outcome="stored",protocol="wattmon"} 1.0',
        'ingestd_requests_total{outcome="duplicate",protocol="wattmon"} 1.0',
        'ingestd_requests_total{outcome="bad_md5",protocol="wattmon"} 1.0',
        'ingestd_requests_total{outcome="stored",protocol="json"} 1.0',
        "ingestd_records_stored_total 2.0",
        "ingestd_rows_stored_total 2.0",
        "ingestd_duplicates_suppressed_total 1.0",
        "ingestd_devices_seen 2.0",
        "ingestd_queue_depth 0.0",
        "ingestd_storage_ok 1.0",
        "ingestd_open_file_handles 2.0",
        "ingestd_batch_records_count 3.0",
    ]:
        assert line in text, line
    assert "ingestd_log_sync_seconds_bucket" in text


def checkpoint_syncs(text: str) -> float:
    match = re.search(r"^ingestd_checkpoint_sync_seconds_count (\S+)$", text, re.MULTILINE)
    assert match, "no ingestd_checkpoint_sync_seconds in /metrics"
    return float(match[1])


async def test_metrics_time_each_checkpoints_sync(start_client):
    """Each checkpoint's fsyncs are timed in /metrics: how an operator sees
    whether checkpoints keep up with a large fleet."""
    client = await start_client(checkpoint_interval_secs=0.05)
    assert checkpoint_syncs(await (await client.get("/metrics")).text()) == 0
    async with asyncio.timeout(10):
        for n in itertools.count():  # each post's commit starts a checkpoint when due
            block = f"Time,V\n2026-11-21 08:{n // 60 % 60:02d}:{n % 60:02d},{n}\n"
            form = wattmon_form("001122334455", block)
            assert (await client.post("/wattmon", data=form, headers=FORM)).status == 200
            if checkpoint_syncs(await (await client.get("/metrics")).text()) >= 1:
                break
            await asyncio.sleep(0.05)
