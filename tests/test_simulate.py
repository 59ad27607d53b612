"""`ingestd simulate` as a subprocess against the real daemon.

What the simulator records as acknowledged must be in the daemon's files
exactly once, in send order; duplicate resends must not be stored again; the
summary's counts must agree with the record.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import hashlib
import json
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from daemon import DaemonProcess

from ingestd.cli import main
from ingestd.tools.simulate import (
    HEADER,
    Options,
    add_arguments,
    device_numbers,
    mac_of,
    parse_duration,
)

SIMULATE = (sys.executable, "-m", "ingestd", "simulate")
FAST_RETRY = ("--backoff-base", "0.05", "--backoff-cap", "0.5")


async def simulate(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *SIMULATE,
        *args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _collect_log(daemon: DaemonProcess) -> None:
    """Keep reading the daemon's stderr, so a chatty run cannot fill the pipe."""
    assert daemon.proc.stderr is not None
    while raw := await daemon.proc.stderr.readline():
        daemon.lines.append(raw.decode(errors="replace"))


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[DaemonProcess]:
    data_dir = str(tmp_path / "data")
    proc = await DaemonProcess.start("--listen", "127.0.0.1:0", "--data-dir", data_dir)
    reader = asyncio.create_task(_collect_log(proc))
    proc.reader = reader  # type: ignore[attr-defined]
    try:
        yield proc
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        proc.kill()
        await proc.proc.wait()


async def stop(daemon: DaemonProcess) -> int:
    daemon.reader.cancel()  # type: ignore[attr-defined]
    with contextlib.suppress(asyncio.CancelledError):
        await daemon.reader  # type: ignore[attr-defined]
    return await daemon.stop()


# -- reading back what was stored ------------------------------------------------------


def read_text(path: Path) -> str:
    raw = path.read_bytes()
    return (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode()


def stored_csv(data: Path) -> dict[str, list[str]]:
    """Device folder -> its rows in file order; every file has our one header."""
    devices = {}
    for folder in sorted((data / "wattmon").iterdir()):
        rows: list[str] = []
        for file in sorted(folder.glob("*.csv*")):
            lines = read_text(file).splitlines()
            assert lines[0] == HEADER, file
            rows += lines[1:]
        devices[folder.name] = rows
    return devices


def stored_quarantine(data: Path) -> dict[tuple[str, str], bytes]:
    folder = data / "quarantine" / "wattmon"
    if not folder.exists():
        return {}
    return {(f.parent.name, f.stem): f.read_bytes() for f in folder.glob("*/*.csv")}


def stored_json(data: Path) -> dict[str, list[dict[str, Any]]]:
    """Stream -> the JSON Lines records, in file order."""
    streams = {}
    for folder in sorted((data / "json").iterdir()):
        lines: list[dict[str, Any]] = []
        for file in sorted(folder.glob("*.jsonl*")):
            lines += [json.loads(line) for line in read_text(file).splitlines()]
        streams[folder.name] = lines
    return streams


def read_record(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_summary(summary: dict[str, Any], record: list[dict[str, Any]]) -> None:
    acked = [r for r in record if r["acknowledged"]]
    assert summary["acknowledged"] == len(acked)
    not_sent = [r for r in record if r["attempts"] == 0]
    assert summary["not_sent"] == len(not_sent)
    assert summary["unacknowledged"] == len(record) - len(acked) - len(not_sent)
    # A block whose first post never left before the end has 0 attempts.
    assert summary["retried"] == sum(max(0, r["attempts"] - 1) for r in record)
    duplicates = [r for r in acked if r["duplicate_resend"] is not None]
    injected = summary["faults"].get("duplicate_resend", 0)
    assert summary["duplicates_sent"] == len(duplicates) == injected
    assert summary["duplicates_acknowledged"] == sum(r["duplicate_resend"] == "ok" for r in acked)
    # In-flight posts finish before the summary: each one succeeded or failed.
    assert summary["sent"] == (
        summary["acknowledged"] + summary["duplicates_acknowledged"] + summary["errors_total"]
    )
    assert summary["errors_total"] == sum(summary["errors"].values())
    per_device = Counter(r["device"] for r in acked)
    senders = {r["device"] for r in record}
    silent = [0] * (summary["devices"] - len(senders))  # never got to send a block
    counts = [per_device.get(d, 0) for d in senders] + silent
    assert summary["acknowledged_per_device"] == {"min": min(counts), "max": max(counts)}
    latency = summary["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]


# -- against the real daemon -------------------------------------------------------------


async def test_everything_acknowledged_is_stored_exactly_once(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    wattmon_record, json_record = tmp_path / "wattmon.jsonl", tmp_path / "json.jsonl"
    common = (
        "--rate",
        "3",
        "--duration",
        "4s",
        "--json",
        "--slow-upload",
        "0.1",
        "--duplicate-resend",
        "0.25",
        *FAST_RETRY,
    )
    (w_rc, w_out, w_err), (j_rc, j_out, j_err) = await asyncio.gather(
        simulate(
            f"{daemon.url}/wattmon",
            "--devices",
            "5",
            "--seed",
            "7",
            *common,
            "--corrupt-md5",
            "0.2",
            "--malformed-csv",
            "0.15",
            "--record",
            str(wattmon_record),
        ),
        simulate(
            f"{daemon.url}/site-a",
            "--protocol",
            "json",
            "--devices",
            "4",
            "--seed",
            "7",
            *common,
            "--idempotency-key",
            "--record",
            str(json_record),
        ),
    )
    assert (w_rc, j_rc) == (0, 0), (w_err, j_err)
    assert await stop(daemon) == 0, daemon.lines
    data = tmp_path / "data"

    # Wattmon: the summary agrees with the record, only injected errors.
    summary = json.loads(w_out)
    record = await asyncio.to_thread(read_record, wattmon_record)
    check_summary(summary, record)
    faults = summary["faults"]
    assert all(
        faults.get(k) for k in ("corrupt_md5", "duplicate_resend", "slow_upload", "malformed_csv")
    ), faults
    assert summary["errors"] == {"http_400": faults["corrupt_md5"]}
    assert summary["unexpected_errors"] == 0
    assert "corrupt_md5_accepted" not in faults
    # Devices have the MACs the seed gives, and each sent something.
    assert {r["key"] for r in record} == {mac_of(n) for n in device_numbers(7, 5)}

    # Acknowledged rows are stored once each, in send order; nothing else is.
    # (Every failure was a 400, which stores nothing, so unacknowledged
    # blocks must be absent.)
    csv_rows = await asyncio.to_thread(stored_csv, data)
    quarantine = await asyncio.to_thread(stored_quarantine, data)
    expected_rows: dict[str, list[str]] = {}
    expected_quarantine = {}
    for block in sorted(record, key=lambda r: (r["device"], r["seq"])):
        raw = (HEADER + "\n" + "\n".join(block["rows"]) + "\n").encode()
        assert hashlib.md5(raw).hexdigest() == block["md5"]
        if not block["acknowledged"]:
            continue
        if block["malformed"]:
            expected_quarantine[(block["device"], block["md5"])] = raw
        else:
            expected_rows.setdefault(block["device"], []).extend(block["rows"])
    assert csv_rows == expected_rows
    assert quarantine == expected_quarantine
    resent = [r for r in record if r["duplicate_resend"] == "ok" and not r["malformed"]]
    assert resent
    for block in resent:
        assert Counter(csv_rows[block["device"]])[block["rows"][0]] == 1

    # JSON: every acknowledged document once, in order, under its stream.
    summary = json.loads(j_out)
    record = await asyncio.to_thread(read_record, json_record)
    check_summary(summary, record)
    assert summary["errors"] == {} and summary["unacknowledged"] == 0
    assert summary["faults"].get("duplicate_resend") and summary["faults"].get("slow_upload")
    streams = await asyncio.to_thread(stored_json, data)
    expected: dict[str, list[dict[str, Any]]] = {}
    for doc in sorted(record, key=lambda r: (r["stream"], r["seq"])):
        assert doc["stream"] == "site-a_" + doc["device"]
        if doc["acknowledged"]:  # one due at the very end may not have been sent
            expected.setdefault(doc["stream"], []).append(doc)
    assert set(streams) == set(expected)
    for stream, lines in streams.items():
        assert [line["body"] for line in lines] == [d["document"] for d in expected[stream]]
        assert {line["path"] for line in lines} == {f"/site-a/{expected[stream][0]['device']}"}
    assert any(d["duplicate_resend"] == "ok" for d in record)


async def test_sigint_stops_early_with_a_summary(daemon: DaemonProcess, tmp_path: Path) -> None:
    record = tmp_path / "record.jsonl"
    proc = await asyncio.create_subprocess_exec(
        *SIMULATE,
        f"{daemon.url}/wattmon",
        "--devices",
        "3",
        "--rate",
        "5",
        "--duration",
        "1h",
        "--json",
        "--record",
        str(record),
        "--progress-every",
        "0.1",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        async with asyncio.timeout(15):
            # Progress lines on stderr (not a TTY): wait for an acknowledged block.
            while True:
                line = await proc.stderr.readline()
                assert line, "simulator exited early"
                if b"acked=0 " not in line:
                    break
            proc.send_signal(signal.SIGINT)
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err
    summary = json.loads(out)
    assert summary["acknowledged"] >= 1 and summary["elapsed_secs"] < 15
    check_summary(summary, await asyncio.to_thread(read_record, record))


async def test_connection_errors_are_counted_and_fail_only_on_request() -> None:
    # Bound but not listening: every connect is refused.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/wattmon"
        args = (url, "--devices", "2", "--rate", "5", "--duration", "1s", "--json", *FAST_RETRY)
        (rc, out, err), (strict_rc, _, _) = await asyncio.gather(
            simulate(*args), simulate(*args, "--fail-on-error")
        )
    assert (rc, strict_rc) == (0, 1), err
    summary = json.loads(out)
    assert summary["acknowledged"] == 0
    assert set(summary["errors"]) == {"connect"}
    assert summary["sent"] == summary["errors"]["connect"] == summary["unexpected_errors"] > 2
    assert summary["retried"] == summary["sent"] - summary["unacknowledged"]
    assert summary["latency_ms"]["max"] == 0


async def test_a_collector_that_never_answers_gives_timeouts() -> None:
    # Listening but never accepting: requests are sent and never answered.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/wattmon"
        common = (url, "--timeout", "0.5", "--duration", "1.2s", "--json", "--quiet", *FAST_RETRY)
        (rc, out, err), (bound_rc, bound_out, bound_err) = await asyncio.gather(
            simulate(*common, "--devices", "2", "--rate", "2"),
            simulate(*common, "--devices", "10", "--rate", "10", "--concurrency", "2"),
        )
    assert (rc, bound_rc) == (0, 0), (err, bound_err)
    summary = json.loads(out)
    assert summary["errors"] == {"timeout": summary["sent"]}
    assert summary["acknowledged"] == 0 and summary["unacknowledged"] == 2
    assert err == ""  # --quiet, and not a TTY
    # Two slots, each held 0.5 s per post: at most 3 posts each start in 1.2 s.
    bounded = json.loads(bound_out)
    assert 2 <= bounded["sent"] <= 6
    assert bounded["not_sent"] > 0
    assert bounded["elapsed_secs"] < 1.2 + 0.5 + 1


# -- arguments -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("5m", 300),
        ("1h", 3600),
        ("90", 90),
        ("1.5", 1.5),
        ("0.5m", 30),
        ("250ms", 0.25),
        (" 2S ", 2),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "abc", "5x", "0", "0s", "-3s", "nan", "inf", "5 m s"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(Exception, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ftp://example.com/wattmon"], "invalid URL"),
        (["not a url"], "invalid URL"),
        (["http://"], "invalid URL"),
        (["http://h/wattmon", "--rate", "-1"], "--rate: must be a positive number"),
        (["http://h/wattmon", "--rate", "0"], "--rate: must be a positive number"),
        (["http://h/wattmon", "--devices", "0"], "--devices: must be a positive integer"),
        (["http://h/wattmon", "--duration", "soon"], "--duration: invalid duration"),
        (["http://h/wattmon", "--corrupt-md5", "1.5"], "--corrupt-md5: probability"),
        (["http://h/wattmon", "--protocol", "mqtt"], "--protocol: invalid choice"),
    ],
)
def test_bad_arguments_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["simulate", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--protocol", "json", "--corrupt-md5", "0.1"], "wattmon only"),
        (["--idempotency-key"], "json only"),
        (["--backoff-base", "2", "--backoff-cap", "1"], "--backoff-cap"),
    ],
)
def test_inconsistent_options_exit_2(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", "http://127.0.0.1:9/x", *args]) == 2
    assert message in capsys.readouterr().err


def options(*args: str) -> Options:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return Options.from_args(parser.parse_args(args))


def test_options() -> None:
    opts = options("http://collector:8080", "--rate", "0.1", "--duration", "5m")
    assert str(opts.url) == "http://collector:8080/wattmon"  # a Wattmon URL needs a path
    assert (opts.rate, opts.duration_secs, opts.devices, opts.concurrency) == (0.1, 300, 10, 256)
    opts = options("https://c/site?token=s", "--protocol", "json", "--insecure")
    assert str(opts.url) == "https://c/site?token=s" and not opts.verify_tls
    assert mac_of(0x0A0B0C) == "02:00:00:0a:0b:0c"
    assert device_numbers(1, 3) == device_numbers(1, 3) != device_numbers(2, 3)
    assert len(set(device_numbers(5, 1000))) == 1000


def test_unwritable_record_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record = tmp_path / "missing" / "record.jsonl"
    assert main(["simulate", "http://127.0.0.1:9/x", "--record", str(record)]) == 2
    assert "No such file" in capsys.readouterr().err
