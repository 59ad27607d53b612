"""Real storage faults: a full filesystem (tmpfs), folders removed under us."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FORM, make_config, small_tmpfs, wattmon_form

MAC = "001122334455"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs, so the disk really fills up (needs root to mount)."""
    with small_tmpfs(tmp_path, "512k") as mount:
        yield mount


def block(i: int) -> str:
    return f"Time,Seq,Pad\n2026-11-21 08:{i // 60:02d}:{i % 60:02d},{i},{'x' * 40}\n"


async def test_full_disk_gives_503_keeps_no_partial_rows_and_recovers(start_client, small_fs):
    client = await start_client(make_config(small_fs / "data"))
    filler = small_fs / "filler"
    # Leave a little room, then fill it with honest traffic until it runs out.
    with open(filler, "wb") as fh:
        fh.write(b"\0" * (512 * 1024 - 96 * 1024))
    acked, refused = [], []
    for i in range(2000):
        resp = await client.post("/wattmon", data=wattmon_form(MAC, block(i)), headers=FORM)
        body = await resp.text()
        if resp.status == 200:
            assert body == "OK"
            acked.append(i)
        else:
            assert resp.status == 503
            assert body.startswith("ERROR: ")
            assert int(resp.headers["Retry-After"]) > 0
            refused.append(i)
            if len(refused) >= 3:
                break
    assert acked and refused, "the filesystem never filled up"
    health = await client.get("/healthz")
    assert health.status == 503

    rows = stored_sequence(small_fs / "data")
    assert rows == acked  # every acknowledged block, once, in order; no partial row

    filler.unlink()
    for _ in range(50):  # the daemon notices by itself within ~1 s
        if (await client.get("/healthz")).status == 200:
            break
        await asyncio.sleep(0.1)
    else:
        pytest.fail("healthz did not recover after space came back")
    for i in refused:  # the devices resend what was refused
        resp = await client.post("/wattmon", data=wattmon_form(MAC, block(i)), headers=FORM)
        assert (resp.status, await resp.text()) == (200, "OK")
    assert stored_sequence(small_fs / "data") == acked + refused


def stored_sequence(data_dir: Path) -> list[int]:
    seqs = []
    for f in sorted((data_dir / "wattmon" / MAC).glob("*.csv")):
        text = f.read_text()
        assert text.endswith("\n"), f"torn last line in {f.name}"
        lines = text.splitlines()
        assert lines[0] == "Time,Seq,Pad"
        for line in lines[1:]:
            _, seq, pad = line.split(",")
            assert pad == "x" * 40
            seqs.append(int(seq))
    return seqs


async def test_device_folder_deleted_under_the_daemon_is_recreated(client, tmp_path):
    first = await client.post("/wattmon", data=wattmon_form(MAC, block(1)), headers=FORM)
    assert first.status == 200
    folder = tmp_path / "data" / "wattmon" / MAC
    await asyncio.to_thread(shutil.rmtree, folder)
    resp = await client.post("/wattmon", data=wattmon_form(MAC, block(2)), headers=FORM)
    assert (resp.status, await resp.text()) == (200, "OK")
    assert (folder / "2026-11-21.csv").read_text() == block(2)


async def test_file_moved_away_is_started_again(client, tmp_path):
    await client.post("/wattmon", data=wattmon_form(MAC, block(1)), headers=FORM)
    folder = tmp_path / "data" / "wattmon" / MAC
    (folder / "2026-11-21.csv").rename(tmp_path / "archived.csv")
    resp = await client.post("/wattmon", data=wattmon_form(MAC, block(2)), headers=FORM)
    assert resp.status == 200
    assert (folder / "2026-11-21.csv").read_text() == block(2)
    assert (tmp_path / "archived.csv").read_text() == block(1)


async def test_unusable_device_path_is_503_for_that_device_only(client, tmp_path):
    (tmp_path / "data" / "wattmon").mkdir(parents=True)
    (tmp_path / "data" / "wattmon" / MAC).write_text("not a folder")
    resp = await client.post("/wattmon", data=wattmon_form(MAC, block(1)), headers=FORM)
    assert resp.status == 503
    assert (await resp.text()).startswith("ERROR: ")
    other = await client.post("/wattmon", data=wattmon_form("00aabbccddee", block(1)), headers=FORM)
    assert (other.status, await other.text()) == (200, "OK")


async def test_file_appended_by_someone_else_is_reloaded_not_corrupted(client, tmp_path):
    await client.post("/wattmon", data=wattmon_form(MAC, block(1)), headers=FORM)
    path = tmp_path / "data" / "wattmon" / MAC / "2026-11-21.csv"
    with open(path, "a") as fh:
        fh.write("2026-11-21 09:00:00,foreign,row\n")
    resp = await client.post("/wattmon", data=wattmon_form(MAC, block(2)), headers=FORM)
    assert (resp.status, await resp.text()) == (200, "OK")
    lines = path.read_text().splitlines()
    assert lines[-2:] == ["2026-11-21 09:00:00,foreign,row", block(2).splitlines()[1]]


async def test_storage_failures_on_a_full_disk_are_logged_throttled(start_client, small_fs, caplog):
    """Every refusal is counted, but a full disk does not flood the journal."""
    client = await start_client(make_config(small_fs / "data"))
    with open(small_fs / "filler", "wb") as fh:
        fh.write(b"\0" * (512 * 1024 - 96 * 1024))
    refused = 0
    for i in range(3000):
        mac = f"0011223344{i % 50:02x}"  # many devices: each a new failure
        resp = await client.post("/wattmon", data=wattmon_form(mac, block(i)), headers=FORM)
        await resp.read()
        if resp.status == 503:
            refused += 1
            if refused >= 150:
                break
    assert refused >= 150, "the filesystem never filled up"
    lines = [r.getMessage() for r in caplog.records if "storage_failed" in r.getMessage()]
    assert 1 <= len(lines) <= 20, len(lines)
