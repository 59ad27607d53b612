"""Several worker processes on one port, one storage writer."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import signal
from pathlib import Path

import aiohttp
from conftest import FORM, make_config, wattmon_form
from daemon import DaemonProcess, children, write_config


def block(device: int, seq: int) -> str:
    return f"Time,Device,Seq\n2026-11-21 08:{seq // 60:02d}:{seq % 60:02d},{device},{seq}\n"


def mac(device: int) -> str:
    return f"02000000{device:04x}"


async def post_once(url: str, body: str) -> tuple[int, str]:
    """A device on a cellular link: a new connection for every post."""
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s,
        s.post(f"{url}/wattmon", data=body, headers=FORM) as resp,
    ):
        return resp.status, await resp.text()


def stored_rows(data_dir: Path, device: int) -> list[str]:
    rows = []
    for path in sorted((data_dir / "wattmon" / mac(device)).glob("*.csv")):
        text = path.read_text()
        assert text.endswith("\n"), f"partial last line in {path}"
        lines = text.splitlines()
        assert lines[0] == "Time,Device,Seq"
        assert "Time,Device,Seq" not in lines[1:], f"second header in {path}"
        rows += lines[1:]
    return rows


async def test_resends_across_workers_are_stored_once_without_interleaving(tmp_path):
    config = write_config(tmp_path / "ingestd.toml", "[server]\nworkers = 2\n")
    daemon = await DaemonProcess.start(
        "--config", str(config), "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data")
    )
    try:
        assert len(await asyncio.to_thread(children, daemon.proc.pid)) == 2

        async def device(n: int) -> None:
            for seq in range(8):
                body = wattmon_form(mac(n), block(n, seq))
                # The block and its resend race on two connections, which the
                # kernel hands to either worker.
                results = await asyncio.gather(
                    post_once(daemon.url, body), post_once(daemon.url, body)
                )
                assert results == [(200, "OK"), (200, "OK")]

        await asyncio.gather(*(device(n) for n in range(24)))
    finally:
        assert await daemon.stop() == 0, daemon.lines
    for n in range(24):
        rows = await asyncio.to_thread(stored_rows, tmp_path / "data", n)
        assert rows == [block(n, seq).splitlines()[1] for seq in range(8)]


async def test_a_killed_worker_is_replaced_and_nothing_acknowledged_is_lost(tmp_path):
    config = write_config(tmp_path / "ingestd.toml", "[server]\nworkers = 2\n")
    daemon = await DaemonProcess.start(
        "--config", str(config), "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data")
    )
    acknowledged = []
    try:
        workers = await asyncio.to_thread(children, daemon.proc.pid)
        for seq in range(5):
            assert await post_once(daemon.url, wattmon_form(mac(1), block(1, seq))) == (200, "OK")
            acknowledged.append(seq)
        os.kill(workers[0], signal.SIGKILL)
        await daemon.wait_for(b"worker_exited")
        for seq in range(5, 40):
            status, _ = await post_once(daemon.url, wattmon_form(mac(1), block(1, seq)))
            if status == 200:
                acknowledged.append(seq)
            else:  # a device whose connection landed on the dead worker resends
                status, _ = await post_once(daemon.url, wattmon_form(mac(1), block(1, seq)))
                assert status == 200
                acknowledged.append(seq)
        await daemon.wait_for(b"worker_restarted")
        replaced = await asyncio.to_thread(children, daemon.proc.pid)
        assert len(replaced) == 2 and workers[0] not in replaced
    finally:
        assert await daemon.stop() == 0, daemon.lines
    rows = await asyncio.to_thread(stored_rows, tmp_path / "data", 1)
    assert rows == [block(1, seq).splitlines()[1] for seq in acknowledged]


async def test_metrics_and_device_counts_cover_every_worker(tmp_path):
    config = write_config(tmp_path / "ingestd.toml", "[server]\nworkers = 2\n")
    daemon = await DaemonProcess.start(
        "--config", str(config), "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data")
    )
    try:
        for n in range(12):
            assert await post_once(daemon.url, wattmon_form(mac(n), block(n, 0))) == (200, "OK")
        # Each worker reports its shard to the main process twice a second.
        async with aiohttp.ClientSession() as session:
            for _ in range(50):
                async with session.get(f"{daemon.url}/metrics") as resp:
                    text = await resp.text()
                if "ingestd_records_stored_total 12.0" in text:
                    break
                await asyncio.sleep(0.2)
    finally:
        assert await daemon.stop() == 0
    assert "ingestd_records_stored_total 12.0" in text
    assert "ingestd_devices_seen 12.0" in text
    digest = hashlib.md5(block(0, 0).encode()).hexdigest()
    assert (tmp_path / "data" / "wattmon" / mac(0) / ".ingestd-keys").read_text().startswith(digest)


async def test_state_requests_are_checked_against_the_devices_address(tmp_path):
    """Workers pass /api/devices to the main process over a Unix socket,
    naming the client's address; access rules apply to that address."""
    config = write_config(
        tmp_path / "ingestd.toml",
        ('[server]\nworkers = 2\n[status]\nallowed_networks = ["127.0.0.0/8"]\n'),
    )
    daemon = await DaemonProcess.start(
        "--config", str(config), "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data")
    )
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{daemon.url}/api/devices") as resp:
                assert resp.status == 200, await resp.text()
            # A client cannot name another address through the private header.
            forged = {"X-Ingestd-Worker-Client": "10.1.2.3"}
            async with session.get(f"{daemon.url}/api/devices", headers=forged) as resp:
                assert resp.status == 200
    finally:
        assert await daemon.stop() == 0


async def test_forged_worker_header_over_tcp_is_ignored(start_client, tmp_path):
    config = make_config(tmp_path / "data")
    config = dataclasses.replace(
        config, status=dataclasses.replace(config.status, allowed_networks=("10.0.0.0/8",))
    )
    client = await start_client(config)
    resp = await client.get("/api/devices", headers={"X-Ingestd-Worker-Client": "10.1.2.3"})
    assert resp.status == 403


async def test_a_devices_data_through_a_worker_is_its_stored_rows(tmp_path):
    """GET /api/devices/{id}/data is answered by the main process and
    streamed through whichever worker took the connection: larger than one
    proxied chunk, it arrives whole."""
    config = write_config(tmp_path / "ingestd.toml", "[server]\nworkers = 2\n")
    daemon = await DaemonProcess.start(
        "--config", str(config), "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data")
    )
    pad = "x" * 500
    try:
        for seq in range(300):
            data = (
                f"Time,Device,Seq,Pad\n2026-11-21 08:{seq // 60:02d}:{seq % 60:02d},0,{seq},{pad}\n"
            )
            assert await post_once(daemon.url, wattmon_form(mac(0), data)) == (200, "OK")
        bodies = []
        for _ in range(4):  # new connections: the workers take turns
            async with (
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
                session.get(f"{daemon.url}/api/devices/{mac(0)}/data?format=csv") as resp,
            ):
                assert resp.status == 200, await resp.text()
                bodies.append(await resp.read())
    finally:
        assert await daemon.stop() == 0
    expected = "Time,Device,Seq,Pad\n" + "".join(
        f"2026-11-21 08:{seq // 60:02d}:{seq % 60:02d},0,{seq},{pad}\n" for seq in range(300)
    )
    assert len(expected) > 2 * 64 * 1024
    for body in bodies:
        assert body.decode() == expected


async def test_a_devices_rate_limit_holds_across_workers(tmp_path):
    """Each worker used to keep its own buckets: with two, a device limited
    to a burst of 2 got up to 4 blocks in a row stored."""
    config = write_config(
        tmp_path / "ingestd.toml",
        "[server]\nworkers = 2\n[wattmon]\nrate_limit_per_min = 1.0\nrate_limit_burst = 2\n",
    )
    daemon = await DaemonProcess.start(
        "--config", str(config), "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path / "data")
    )
    try:
        answers = [
            await post_once(daemon.url, wattmon_form(mac(0), block(0, seq))) for seq in range(8)
        ]
    finally:
        assert await daemon.stop() == 0
    assert [status for status, _ in answers] == [200, 200] + [429] * 6, answers
    assert all(text.startswith("ERROR") for _, text in answers[2:])
    assert len(stored_rows(tmp_path / "data", 0)) == 2
    # Refused by the shard that stores the device, logged by the worker the
    # device talked to: the line names the device either way.
    refusals = [line for line in daemon.lines if "rejected status=429" in line]
    assert len(refusals) == 6, daemon.lines
    assert all(f"device={mac(0)}" in line for line in refusals), refusals
