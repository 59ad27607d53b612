"""Rotation: the pure policy, and files on disk with an injected clock."""

from __future__ import annotations

import subprocess

import pytest
from conftest import FORM, wattmon_form

from ingestd.sinks.file.rotation import (
    FileName,
    OpenFile,
    file_name,
    next_file,
    parse_file_name,
    period_of,
)

DAY = 1_795_248_000.0  # 2026-11-21T08:00:00Z


def test_period_names():
    assert period_of(DAY, "day") == "2026-11-21"
    assert period_of(DAY, "hour") == "2026-11-21T08"
    assert period_of(DAY + 16 * 3600, "day") == "2026-11-22"


def test_names_round_trip_and_sort_in_time_order():
    names = [
        file_name("2026-11-21", 0, "csv"),
        file_name("2026-11-21", 1, "csv"),
        file_name("2026-11-21", 2, "csv"),
        file_name("2026-11-21", 10, "csv"),
        file_name("2026-11-22", 0, "csv"),
        file_name("2026-11-22", 1, "csv"),
    ]
    assert names[:2] == ["2026-11-21.csv", "2026-11-21_0001.csv"]
    assert sorted(names) == names
    # `ls` order too, in the C locale
    listed = subprocess.run(
        ["sort"],
        input="\n".join(reversed(names)),
        capture_output=True,
        text=True,
        env={"LC_ALL": "C"},
        check=True,
    ).stdout.split()
    assert listed == names
    for name in names:
        parsed = parse_file_name(name)
        assert parsed is not None and parsed.name == name


@pytest.mark.parametrize("name", ["x.csv", "2026-11-21.csv.gz", ".ingestd-keys", "2026-11-21.txt"])
def test_foreign_names_are_not_ours(name):
    assert parse_file_name(name) is None


def current(size=100, header=b"h\n", period="2026-11-21", seq=0):
    return OpenFile(FileName(period, seq, "csv"), size, header)


def decide(cur, *, period="2026-11-21", header=b"h\n", add=10, limit=1000):
    return next_file(
        cur, record_period=period, header=header, add_bytes=add, max_file_bytes=limit, ext="csv"
    )


def test_first_file_of_a_device():
    assert decide(None) == FileName("2026-11-21", 0, "csv")


def test_same_period_same_header_appends():
    assert decide(current()) is None


def test_later_period_starts_that_periods_first_file():
    assert decide(current(seq=3), period="2026-11-22") == FileName("2026-11-22", 0, "csv")


def test_earlier_period_appends_rather_than_reopening_a_rotated_file():
    assert decide(current(period="2026-11-22"), period="2026-11-21") is None


def test_size_limit_starts_next_sequence():
    assert decide(current(size=995), add=10) == FileName("2026-11-21", 1, "csv")
    assert decide(current(size=990), add=10) is None


def test_block_larger_than_limit_still_goes_whole_into_a_fresh_file():
    assert decide(current(size=2), header=b"h\n", add=5000) is None


def test_header_change_starts_next_sequence():
    assert decide(current(), header=b"other\n") == FileName("2026-11-21", 1, "csv")


def test_empty_file_takes_any_header():
    assert decide(current(size=0, header=b""), header=b"new\n") is None


async def test_rotation_by_size_on_disk(start_client, tmp_path):
    client = await start_client(max_file_bytes=200)
    for i in range(20):
        block = f"Time,V\n2026-11-21 08:00:{i:02d},{i:05d}\n"
        resp = await client.post("/wattmon", data=wattmon_form("001122334455", block), headers=FORM)
        assert resp.status == 200
    folder = tmp_path / "data" / "wattmon" / "001122334455"
    files = sorted(folder.glob("*.csv"))
    assert len(files) > 2
    rows = []
    for f in files:
        lines = f.read_text().splitlines()
        assert lines[0] == "Time,V"
        assert "Time,V" not in lines[1:]
        assert f.stat().st_size <= 200
        rows += lines[1:]
    assert rows == [f"2026-11-21 08:00:{i:02d},{i:05d}" for i in range(20)]


@pytest.mark.parametrize(
    ("period", "step", "names"),
    [
        ("day", 24 * 3600, ["2026-11-21.csv", "2026-11-22.csv"]),
        ("hour", 3600, ["2026-11-21T08.csv", "2026-11-21T09.csv"]),
    ],
)
async def test_rotation_by_period_on_disk(start_client, tmp_path, clock, period, step, names):
    client = await start_client(rotate_period=period)
    for i in range(2):
        block = f"Time,V\n2026-11-21 08:00:0{i},{i}\n"
        resp = await client.post("/wattmon", data=wattmon_form("001122334455", block), headers=FORM)
        assert resp.status == 200
        clock.now += step
    folder = tmp_path / "data" / "wattmon" / "001122334455"
    assert sorted(p.name for p in folder.glob("*.csv")) == names
    assert (folder / names[1]).read_text() == "Time,V\n2026-11-21 08:00:01,1\n"


async def test_json_streams_rotate_by_period_too(start_client, tmp_path, clock):
    client = await start_client()
    await client.post("/s", data=b"1")
    clock.now += 24 * 3600
    await client.post("/s", data=b"2")
    folder = tmp_path / "data" / "json" / "s"
    assert sorted(p.name for p in folder.glob("*.jsonl")) == [
        "2026-11-21.jsonl",
        "2026-11-22.jsonl",
    ]


async def test_restart_continues_the_current_file_not_a_rotated_one(start_client, tmp_path):
    first = await start_client(max_file_bytes=60)
    for i in range(3):
        block = f"Time,V\n2026-11-21 08:00:0{i},{i}\n"
        await first.post("/wattmon", data=wattmon_form("001122334455", block), headers=FORM)
    await first.close()
    folder = tmp_path / "data" / "wattmon" / "001122334455"
    before = {p.name: p.read_bytes() for p in folder.glob("*.csv")}
    second = await start_client(max_file_bytes=60)
    block = "Time,V\n2026-11-21 08:00:09,9\n"
    await second.post("/wattmon", data=wattmon_form("001122334455", block), headers=FORM)
    after = {p.name: p.read_bytes() for p in folder.glob("*.csv")}
    newest = max(before)
    for name in before:
        if name != newest:
            assert after[name] == before[name]  # rotated files never change
    assert b"08:00:09" in after[max(after)]


# -- a change of rotate_period (hour <-> day) between runs ---------------------
# Within a day, names sort: the day's first file, its hourly files, then the
# day's later sequence (`2026-11-21.csv` < `2026-11-21T09.csv` <
# `2026-11-21_0001.csv`: `.` < `T` < `_`).


def test_names_of_one_day_sort_day_then_hours_then_day_sequence():
    names = [
        file_name("2026-11-21", 0, "csv"),
        file_name("2026-11-21T08", 0, "csv"),
        file_name("2026-11-21T08", 1, "csv"),
        file_name("2026-11-21T23", 0, "csv"),
        file_name("2026-11-21", 1, "csv"),
        file_name("2026-11-22T00", 0, "csv"),
    ]
    assert sorted(names) == names
    assert sorted(names, key=lambda n: parse_file_name(n).sort_key) == names


def test_hour_to_day_starts_a_day_file_that_sorts_after_the_hour():
    # Not `2026-11-21.csv` (it sorts before the hour's file) and not the
    # hour's next sequence (day data under an hour's name).
    target = decide(current(period="2026-11-21T09"), period="2026-11-21")
    assert target == FileName("2026-11-21", 1, "csv")
    assert target.name > "2026-11-21T09.csv"


def test_day_to_hour_keeps_the_days_file_until_the_day_ends():
    # An hour's file would sort before the day's `_0001`, `_0002`, ...
    assert decide(current(period="2026-11-21", seq=2), period="2026-11-21T14") is None
    rotated = decide(current(size=995, period="2026-11-21", seq=2), period="2026-11-21T14")
    assert rotated == FileName("2026-11-21", 3, "csv")
    assert decide(current(period="2026-11-21"), period="2026-11-22T00") == FileName(
        "2026-11-22T00", 0, "csv"
    )


def test_earlier_hour_of_an_earlier_day_still_appends():
    assert decide(current(period="2026-11-22"), period="2026-11-21T23") is None
    assert decide(current(period="2026-11-22T00"), period="2026-11-21") is None


async def test_rotate_period_changes_keep_names_in_time_order(start_client, tmp_path, clock):
    """hour -> day -> hour -> day across restarts, with size rotation: the
    README's `cat $(ls ...)` reads every row in time order, and no hourly
    name holds more than its hour."""
    folder = tmp_path / "data" / "wattmon" / "001122334455"
    sent: list[str] = []
    runs = [
        ("hour", [0, 1800, 3600]),
        ("day", [5400, 7200, 9000, 10800]),
        ("hour", [12600, 14400]),
        ("day", [86400, 90000]),
    ]
    start = clock.now  # 2026-11-21T08:00Z
    for period, offsets in runs:
        client = await start_client(rotate_period=period, max_file_bytes=120)
        for offset in offsets:
            clock.now = start + offset
            row = f"t{offset:06d},{offset}"
            block = f"Time,V\n{row}\n"
            resp = await client.post(
                "/wattmon", data=wattmon_form("001122334455", block), headers=FORM
            )
            assert resp.status == 200
            sent.append(row)
        await client.close()
    listed = sorted(p.name for p in folder.iterdir() if p.suffix == ".csv")  # `ls *.csv`
    rows = []
    for name in listed:
        lines = (folder / name).read_text().splitlines()
        assert lines[0] == "Time,V"
        rows += lines[1:]
        parsed = parse_file_name(name)
        assert parsed is not None
        if "T" in parsed.period:  # an hour's file holds only that hour's rows
            hour = int(parsed.period[-2:])
            for line in lines[1:]:
                offset = int(line.split(",")[1])
                assert (8 + offset // 3600) % 24 == hour, (name, line)
    assert rows == sent
