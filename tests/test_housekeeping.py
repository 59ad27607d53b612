"""Closed files are gzipped atomically; retention deletes the oldest."""

from __future__ import annotations

import asyncio
import gzip
import os
import time
from pathlib import Path

from conftest import FORM, wattmon_form

from ingestd.sinks.file.housekeeping import Retention, sweep

KEEP_ALL = Retention(compress=True, max_age_days=0, max_total_bytes=0)


def make_files(folder: Path, names: list[str], age_secs: float = 3600) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    old = time.time() - age_secs
    for i, name in enumerate(names):
        path = folder / name
        path.write_text(f"Time,V\nrow-of-{name}\n")
        os.utime(path, (old + i, old + i))


def test_closed_files_are_gzipped_and_the_newest_left_alone(tmp_path):
    folder = tmp_path / "wattmon" / "001122334455"
    make_files(folder, ["2026-11-20.csv", "2026-11-21.csv", "2026-11-21_0001.csv"])
    report = sweep(tmp_path, KEEP_ALL)
    assert report.compressed == 2
    assert sorted(p.name for p in folder.iterdir()) == [
        "2026-11-20.csv.gz",
        "2026-11-21.csv.gz",
        "2026-11-21_0001.csv",
    ]
    assert gzip.decompress((folder / "2026-11-20.csv.gz").read_bytes()) == (
        b"Time,V\nrow-of-2026-11-20.csv\n"
    )


def test_the_newest_file_is_found_across_a_rotate_period_change(tmp_path):
    # hour -> day: the day goes on in `_0001`, which sorts after the hours'
    # files and is the current one.
    folder = tmp_path / "wattmon" / "001122334455"
    make_files(folder, ["2026-11-21T08.csv", "2026-11-21T09.csv", "2026-11-21_0001.csv"])
    assert sweep(tmp_path, KEEP_ALL).compressed == 2
    assert sorted(p.name for p in folder.iterdir()) == [
        "2026-11-21T08.csv.gz",
        "2026-11-21T09.csv.gz",
        "2026-11-21_0001.csv",
    ]


def test_recently_written_files_wait(tmp_path):
    folder = tmp_path / "json" / "s"
    make_files(folder, ["2026-11-20.jsonl", "2026-11-21.jsonl"], age_secs=5)
    assert sweep(tmp_path, KEEP_ALL).compressed == 0


def test_leftovers_of_a_crash_mid_compression_are_cleaned(tmp_path):
    folder = tmp_path / "wattmon" / "001122334455"
    make_files(folder, ["2026-11-19.csv", "2026-11-20.csv", "2026-11-21.csv"])
    (folder / "2026-11-19.csv.gz.tmp").write_bytes(b"half a gzip")
    (folder / "2026-11-20.csv.gz").write_bytes(gzip.compress(b"Time,V\nrow-of-2026-11-20.csv\n"))
    sweep(tmp_path, KEEP_ALL)
    assert sorted(p.name for p in folder.iterdir()) == [
        "2026-11-19.csv.gz",
        "2026-11-20.csv.gz",
        "2026-11-21.csv",
    ]


def test_retention_by_age_deletes_old_closed_files_only(tmp_path):
    folder = tmp_path / "wattmon" / "001122334455"
    make_files(folder, ["2026-11-01.csv", "2026-11-02.csv"], age_secs=10 * 86400)
    make_files(folder, ["2026-11-21.csv"], age_secs=3600)
    retention = Retention(compress=False, max_age_days=7, max_total_bytes=0)
    report = sweep(tmp_path, retention)
    assert report.deleted == 2
    assert sorted(p.name for p in folder.iterdir()) == ["2026-11-21.csv"]


def test_retention_by_total_size_deletes_oldest_first(tmp_path):
    a = tmp_path / "wattmon" / "00000000000a"
    b = tmp_path / "json" / "b"
    make_files(a, ["2026-11-01.csv", "2026-11-03.csv", "2026-11-21.csv"], age_secs=9 * 86400)
    make_files(b, ["2026-11-02.jsonl", "2026-11-21.jsonl"], age_secs=8 * 86400)
    # Room for the two newer closed files, not for all three.
    limit = (a / "2026-11-03.csv").stat().st_size + (b / "2026-11-02.jsonl").stat().st_size
    retention = Retention(compress=False, max_age_days=0, max_total_bytes=limit)
    report = sweep(tmp_path, retention)
    assert report.deleted == 1
    assert not (a / "2026-11-01.csv").exists()
    assert (a / "2026-11-21.csv").exists() and (b / "2026-11-21.jsonl").exists()


async def test_daemon_compresses_what_it_rotated(start_client, tmp_path):
    client = await start_client(max_file_bytes=100)
    for i in range(6):
        block = f"Time,V\n2026-11-21 08:00:0{i},{'x' * 40}\n"
        resp = await client.post("/wattmon", data=wattmon_form("001122334455", block), headers=FORM)
        assert resp.status == 200
    folder = tmp_path / "data" / "wattmon" / "001122334455"
    for path in folder.glob("*.csv"):
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    before = sorted(p.name for p in folder.glob("*.csv"))
    await asyncio.to_thread(sweep, tmp_path / "data", KEEP_ALL)
    after = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    assert after == [f"{n}.gz" for n in before[:-1]] + [before[-1]]
    # The writer goes on in its current file and never reuses a compressed name.
    block = "Time,V\n2026-11-21 08:00:09,y\n"
    resp = await client.post("/wattmon", data=wattmon_form("001122334455", block), headers=FORM)
    assert resp.status == 200
    rows = []
    for path in sorted(folder.glob("*.csv*")):
        data = path.read_bytes()
        text = (gzip.decompress(data) if path.suffix == ".gz" else data).decode()
        assert text.splitlines()[0] == "Time,V"
        rows += text.splitlines()[1:]
    assert [r.split(",")[0][-2:] for r in rows] == ["00", "01", "02", "03", "04", "05", "09"]
