"""Worker mode's guarantees, seen from outside: HTTP, files, signals, processes.

Which process stores a device is not assumed anywhere: one writer for all
workers, or storage sharded by device over the workers, must both pass. Many
devices post on a new connection each, so the kernel spreads the posts over
every worker. Each test keeps a ledger of what every device sent and what was
answered `OK`, then reads the data directory back: acknowledged blocks once,
in send order, never partial, one header per file. The fleet view, /metrics
and /healthz may lag the posts in worker mode: they are polled.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import re
import signal
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from conftest import FORM, small_tmpfs, wattmon_form
from daemon import DaemonProcess, children, write_config

from ingestd.ingest.shards import shard_of

DEVICES = 40
HEADER = "Time,Device,Seq,Row,Value"
POLL_SECS = 10.0  # how long a lagging view may take to catch up


# -- the devices ------------------------------------------------------------------


@dataclass
class Device:
    """A Wattmon logger: numbered blocks of 1-3 rows, resent until `OK`."""

    index: int
    sent: list[int] = field(default_factory=list)
    acked: set[int] = field(default_factory=set)

    @property
    def mac(self) -> str:
        return f"02000000{self.index:04x}"

    def rows(self, seq: int) -> list[str]:
        return [
            f"2026-11-21 {seq // 3600 % 24:02d}:{seq // 60 % 60:02d}:{seq % 60:02d},"
            f"{self.index},{seq},{row},{(self.index * 7919 + seq * 31 + row) % 100_000}"
            for row in range(1 + (self.index + seq) % 3)
        ]

    def form(self, seq: int) -> str:
        return wattmon_form(self.mac, "\n".join([HEADER, *self.rows(seq)]) + "\n")

    def new_block(self) -> int:
        self.sent.append(len(self.sent))
        return self.sent[-1]

    @property
    def pending(self) -> int | None:
        """The last block sent and not yet answered `OK`: sent again before a new one."""
        return self.sent[-1] if self.sent and self.sent[-1] not in self.acked else None


def fleet() -> list[Device]:
    return [Device(i) for i in range(DEVICES)]


@dataclass(frozen=True)
class Answer:
    status: int  # 0: no answer (connection refused, reset or timed out)
    text: str
    retry_after: str | None = None

    @property
    def ok(self) -> bool:
        # A device stops resending on exactly `OK`: a 200 must say so.
        if self.status == 200:
            assert self.text == "OK", f"200 with body {self.text!r}"
        return self.status == 200

    def check_refusal(self) -> None:
        """A refusal a device answers by sending again later."""
        if self.status:
            assert self.status >= 500, (self.status, self.text)
            assert self.text.startswith("ERROR"), (self.status, self.text)


def new_connections(timeout_secs: float = 10.0) -> aiohttp.ClientSession:
    """Devices on cellular links: a new connection for every request."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True, limit=100),
        timeout=aiohttp.ClientTimeout(total=timeout_secs),
    )


async def post(session: aiohttp.ClientSession, url: str, device: Device, seq: int) -> Answer:
    try:
        async with session.post(f"{url}/wattmon", data=device.form(seq), headers=FORM) as resp:
            return Answer(resp.status, await resp.text(), resp.headers.get("Retry-After"))
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return Answer(0, repr(exc))


async def send_until_ok(
    session: aiohttp.ClientSession, url: str, device: Device, seq: int
) -> list[Answer]:
    """Send one block until it is answered `OK`; return the refusals."""
    refusals = []
    pause = 0.05
    while not (answer := await post(session, url, device, seq)).ok:
        answer.check_refusal()
        refusals.append(answer)
        await asyncio.sleep(pause)
        pause = min(0.5, pause * 2)
    device.acked.add(seq)
    return refusals


async def send_new_blocks(url: str, devices: list[Device], count: int) -> None:
    """`count` new blocks from every device, devices at once, each until `OK`."""

    async def one(device: Device) -> None:
        for _ in range(count):
            await send_until_ok(session, url, device, device.new_block())

    async with new_connections() as session, asyncio.timeout(30):
        await asyncio.gather(*(one(device) for device in devices))


async def resend_everything(url: str, devices: list[Device]) -> None:
    """Every block ever sent, again, in send order per device, until `OK`."""

    async def one(device: Device) -> None:
        for seq in list(device.sent):
            await send_until_ok(session, url, device, seq)

    async with new_connections() as session, asyncio.timeout(30):
        await asyncio.gather(*(one(device) for device in devices))


async def keep_posting(
    session: aiohttp.ClientSession, url: str, device: Device, stop: asyncio.Event
) -> None:
    """Post block after block; a refused one is sent again until `OK`."""
    while not stop.is_set():
        seq = device.pending if device.pending is not None else device.new_block()
        answer = await post(session, url, device, seq)
        if answer.ok:
            device.acked.add(seq)
        else:
            answer.check_refusal()
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def load(url: str, devices: list[Device], timeout_secs: float = 10.0) -> AsyncIterator[None]:
    """Every device posting at once until the block exits."""
    stop = asyncio.Event()
    async with new_connections(timeout_secs) as session:
        tasks = [asyncio.create_task(keep_posting(session, url, d, stop)) for d in devices]
        try:
            yield
            for task in tasks:
                if task.done():
                    task.result()  # a failed assertion about an answer
        finally:
            stop.set()
            async with asyncio.timeout(timeout_secs + 5):
                await asyncio.gather(*tasks)


async def until(
    predicate: Callable[[], bool], what: str | Callable[[], str], timeout_secs: float = 30.0
) -> None:
    """Poll `predicate` until it holds; fail with `what` after the timeout."""
    deadline = time.monotonic() + timeout_secs
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(what() if callable(what) else what)
        await asyncio.sleep(0.05)


def acks(devices: list[Device]) -> int:
    return sum(len(d.acked) for d in devices)


# -- reading the data directory back ------------------------------------------------


def stored_blocks(data_dir: Path, device: Device) -> list[int]:
    """The device's blocks in file order. Fails on a partial line, a partial
    or altered block, a block across two files, a foreign line, or a file
    without exactly one header, on its first line."""
    folder = data_dir / "wattmon" / device.mac
    if not folder.is_dir():
        return []
    seqs = []
    # Day files, then their size rotations (`_0001`): name order is write order.
    for path in sorted(folder.iterdir(), key=lambda p: p.name.encode()):
        if path.name.startswith("."):  # the daemon's own (keys, first seen)
            continue
        blob = path.read_bytes()
        if path.name.endswith(".gz"):
            blob = gzip.decompress(blob)
        text = blob.decode()
        assert text.endswith("\n"), f"{path}: partial last line {text[-80:]!r}"
        lines = text.split("\n")[:-1]
        assert lines[0] == HEADER, f"{path}: first line {lines[0]!r}"
        rows = lines[1:]
        assert HEADER not in rows, f"{path}: a second header"
        i = 0
        while i < len(rows):
            cells = rows[i].split(",")
            assert len(cells) == 5 and cells[1] == str(device.index) and cells[3] == "0", (
                f"{path}: {rows[i]!r} does not start a block"
            )
            seq = int(cells[2])
            assert seq in device.sent, f"{path}: block {seq} was never sent"
            expected = device.rows(seq)
            got = rows[i : i + len(expected)]
            assert got == expected, f"{path}: block {seq} partial or altered: {got}"
            seqs.append(seq)
            i += len(expected)
    return seqs


def check_store(data_dir: Path, devices: list[Device], *, complete: bool = False) -> None:
    """Each acknowledged block once, in send order; unacknowledged ones once or
    not at all. With `complete`, every block sent must be there."""
    problems = []
    macs = {device.mac for device in devices}
    root = data_dir / "wattmon"
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.name not in macs:
            problems.append(f"{folder.name}: a folder no device wrote to")
    for device in devices:
        seqs = stored_blocks(data_dir, device)
        twice = sorted({seq for seq in seqs if seqs.count(seq) > 1})
        if twice:
            problems.append(f"{device.mac}: blocks stored more than once: {twice}")
        elif seqs != sorted(seqs):
            problems.append(f"{device.mac}: blocks out of send order: {seqs}")
        must = set(device.sent) if complete else device.acked
        missing = sorted(must - set(seqs))
        if missing:
            problems.append(f"{device.mac}: acknowledged blocks missing: {missing}")
    assert not problems, "\n".join(problems[:20])


def data_files(data_dir: Path) -> dict[str, bytes]:
    """Every device file's bytes (not the daemon's own dot files)."""
    root = data_dir / "wattmon"
    return {
        str(path.relative_to(data_dir)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    }


# -- processes ------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    found = children(pid)
    for child in list(found):
        found += descendants(child)
    return found


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat from the state on (the name may hold spaces); [] if gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return []


def alive(pid: int) -> bool:
    """Running or stopped; a zombie (killed, not yet reaped) is dead."""
    fields = stat_fields(pid)
    return bool(fields) and fields[0] not in ("Z", "X")


def identity(pid: int) -> tuple[int, str] | None:
    """The pid with its start time: the same process, not a later one given its pid."""
    fields = stat_fields(pid)
    return (pid, fields[19]) if fields else None


class Daemon:
    """`ingestd serve` whose log is read all the time, so that a busy daemon
    never blocks on a full pipe."""

    def __init__(self, process: DaemonProcess, config: Path) -> None:
        self.process = process
        self.config = config
        self.url = process.url
        self.pid = process.proc.pid
        self._next_line = len(process.lines)
        self._reader = asyncio.create_task(self._read(), name="ingestd-log")

    async def _read(self) -> None:
        stream = self.process.proc.stderr
        assert stream is not None
        while raw := await stream.readline():
            self.process.lines.append(raw.decode(errors="replace"))

    async def wait_for(self, needle: str, timeout_secs: float = 15.0) -> str:
        """The next log line with `needle` (lines already matched are skipped)."""
        lines = self.process.lines
        async with asyncio.timeout(timeout_secs):
            while True:
                for i in range(self._next_line, len(lines)):
                    if needle in lines[i]:
                        self._next_line = i + 1
                        return lines[i]
                self._next_line = len(lines)
                if self._reader.done():
                    raise AssertionError(f"daemon exited before {needle!r}: {self.log()}")
                await asyncio.sleep(0.05)

    def workers(self) -> list[int]:
        return children(self.pid)

    async def kill(self) -> None:
        """SIGKILL the main process alone, as the OOM killer or `kill -9` would."""
        self.process.kill()
        await self.exited(10)

    async def stop(self) -> int:
        """SIGTERM; the exit code once the main process and its log are done."""
        if self.process.proc.returncode is None:
            self.process.signal(signal.SIGTERM)
        code = await self.exited(40)
        try:
            async with asyncio.timeout(10):
                await self._reader  # ends when every process has let go of the log
        except TimeoutError:
            raise AssertionError(f"processes outlived the main one: {self.log()}") from None
        return code

    async def exited(self, timeout_secs: float) -> int:
        # Not proc.wait(): before Python 3.12 it also waits for the log pipe,
        # which processes outliving the main one may hold forever.
        await until(
            lambda: self.process.proc.returncode is not None,
            f"the main process is still running after {timeout_secs} s",
            timeout_secs,
        )
        code = self.process.proc.returncode
        assert code is not None
        return code

    def log(self) -> str:
        return "".join(self.process.lines[-40:])


Start = Callable[..., Awaitable[Daemon]]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    """`await start(data_dir, workers=2, extra="", env=None)`: every process
    it started is killed at the end if still there."""
    started: list[Daemon] = []
    ours: set[tuple[int, str]] = set()  # every process of theirs seen, as `identity`

    def remember(daemon: Daemon) -> None:
        for pid in [daemon.pid, *descendants(daemon.pid)]:
            if (seen := identity(pid)) is not None:
                ours.add(seen)

    async def run(
        data_dir: Path, workers: int = 2, extra: str = "", env: dict[str, str] | None = None
    ) -> Daemon:
        config = write_config(
            tmp_path / f"ingestd-{len(started)}.toml", f"[server]\nworkers = {workers}\n{extra}"
        )
        process = await DaemonProcess.start(
            "--config",
            str(config),
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(data_dir),
            env=env,
        )
        daemon = Daemon(process, config)
        started.append(daemon)
        await asyncio.to_thread(remember, daemon)
        return daemon

    yield run
    for daemon in started:
        await asyncio.to_thread(remember, daemon)
    for pid, start_time in ours:
        if identity(pid) == (pid, start_time):  # still that process: kill it
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for daemon in started:
        with contextlib.suppress(AssertionError):
            await daemon.stop()


# -- 1. kill -9 of the main process ----------------------------------------------------


@pytest.mark.parametrize("workers_after", [2, 1], ids=["restart-2-workers", "restart-1-process"])
async def test_main_process_killed_under_load_loses_and_duplicates_nothing(
    tmp_path: Path, start: Start, workers_after: int
) -> None:
    data_dir = tmp_path / "data"
    # Small files and frequent checkpoints: the kill lands among rotations
    # and background syncs, with the write-ahead log(s) holding frames.
    storage = "[storage]\nmax_file_bytes = 4096\ncheckpoint_interval_secs = 0.2\n"
    daemon = await start(data_dir, workers=2, extra=storage)
    devices = fleet()
    async with load(daemon.url, devices):
        await until(lambda: acks(devices) >= 400, "load never got going")
        family = await asyncio.to_thread(descendants, daemon.pid)
        assert len(family) >= 2, family
        await daemon.kill()
    assert any(d.pending is not None for d in devices), "the kill cut no post short"
    # The workers die with the main process: nothing may keep serving,
    # holding the port or the data directory.
    await until(
        lambda: not any(alive(pid) for pid in family),
        lambda: f"processes outlived the main one: {[pid for pid in family if alive(pid)]}",
        timeout_secs=POLL_SECS,
    )
    await daemon.stop()

    daemon = await start(data_dir, workers=workers_after, extra=storage)
    # Recovery is done once it listens: every acknowledged block is back.
    await asyncio.to_thread(check_store, data_dir, devices)
    await resend_everything(daemon.url, devices)
    assert await daemon.stop() == 0, daemon.log()
    await asyncio.to_thread(check_store, data_dir, devices, complete=True)


# -- 2. kill -9 of one worker ------------------------------------------------------------


async def test_a_worker_killed_under_load_loses_and_duplicates_nothing(
    tmp_path: Path, start: Start
) -> None:
    data_dir = tmp_path / "data"
    daemon = await start(data_dir, workers=2)
    devices = fleet()
    async with load(daemon.url, devices):
        await until(lambda: acks(devices) >= 300, "load never got going")
        workers = daemon.workers()
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGKILL)
        # Every device gets more blocks through after the kill: the
        # devices of a killed shard, if there are shards, too.
        after_kill = {d.mac: len(d.acked) for d in devices}
        await until(
            lambda: all(len(d.acked) >= after_kill[d.mac] + 5 for d in devices),
            "some devices never got a block stored after the worker was killed",
        )
    # Whatever was refused or cut off at the kill was sent again until OK.
    assert all(device.pending is None for device in devices)

    # Resends of every stored block, reaching any worker, change nothing.
    before = await asyncio.to_thread(data_files, data_dir)
    await resend_everything(daemon.url, devices)
    assert await asyncio.to_thread(data_files, data_dir) == before
    assert await daemon.stop() == 0, daemon.log()
    await asyncio.to_thread(check_store, data_dir, devices, complete=True)


async def test_healthz_is_503_while_a_killed_workers_shard_is_down(
    tmp_path: Path, start: Start
) -> None:
    """Until its replacement says hello, the killed worker's devices cannot
    be stored: the health check says so, then recovers by itself."""
    daemon = await start(tmp_path / "data", workers=2)
    seen: list[int] = []
    async with new_connections() as session:

        async def health() -> int:
            async with session.get(f"{daemon.url}/healthz") as resp:
                await resp.read()
                return resp.status

        async def shards_down() -> int:
            async with session.get(f"{daemon.url}/metrics") as resp:
                text = await resp.text()
            return len(re.findall(r"^ingestd_shard_up\{shard=\"\d\"\} 0\.0$", text, re.M))

        assert await health() == 200
        assert await shards_down() == 0
        os.kill(daemon.workers()[0], signal.SIGKILL)
        down: list[int] = []
        for _ in range(200):  # the restart waits 1 s, then the worker starts
            seen.append(await health())
            down.append(await shards_down())
            if 503 in seen and seen[-1] == 200:
                break
            await asyncio.sleep(0.05)
    assert 503 in seen, seen
    assert 1 in down, down  # the killed worker's shard, while it was down
    assert seen[-1] == 200, seen
    async with new_connections() as session, session.get(f"{daemon.url}/metrics") as resp:
        metrics = await resp.text()
    # Which shard was down shows per shard; both serve again.
    assert "ingestd_worker_exits_total 1.0" in metrics, metrics
    assert 'ingestd_shard_up{shard="0"} 1.0' in metrics, metrics
    assert 'ingestd_shard_up{shard="1"} 1.0' in metrics, metrics
    assert await daemon.stop() == 0, daemon.log()


# -- 3. the worker count changes across restarts -----------------------------------------


async def test_restarts_with_two_one_two_workers_store_resends_once(
    tmp_path: Path, start: Start
) -> None:
    data_dir = tmp_path / "data"
    devices = fleet()
    for workers in (2, 1, 2):
        daemon = await start(data_dir, workers=workers)
        before = await asyncio.to_thread(data_files, data_dir)
        await resend_everything(daemon.url, devices)
        assert await asyncio.to_thread(data_files, data_dir) == before, (
            f"a resend was stored again with workers = {workers}"
        )
        await send_new_blocks(daemon.url, devices, 4)
        assert await daemon.stop() == 0, daemon.log()
        await asyncio.to_thread(check_store, data_dir, devices, complete=True)
    assert all(len(device.sent) == 12 for device in devices)


# -- 4. SIGHUP reaches every shard -------------------------------------------------------------


async def test_sighup_rate_limit_holds_per_device_across_workers(
    tmp_path: Path, start: Start
) -> None:
    data_dir = tmp_path / "data"
    daemon = await start(data_dir, workers=2)
    devices = fleet()
    await send_new_blocks(daemon.url, devices, 3)  # no limit yet: 3 in a row are fine
    config = daemon.config
    config.write_text(
        config.read_text() + "[wattmon]\nrate_limit_per_min = 1.0\nrate_limit_burst = 2\n"
    )
    daemon.process.signal(signal.SIGHUP)
    await daemon.wait_for("reloaded")

    # Devices that posted before the reload, and devices new after it.
    limited = devices[:8] + [Device(DEVICES + i) for i in range(8)]

    async def four_in_a_row(device: Device) -> list[Answer]:
        answers = []
        for _ in range(4):
            seq = device.new_block()
            answer = await post(session, daemon.url, device, seq)
            if answer.ok:
                device.acked.add(seq)
            answers.append(answer)
        return answers

    async with new_connections() as session:
        results = await asyncio.gather(*(four_in_a_row(device) for device in limited))
    assert await daemon.stop() == 0, daemon.log()
    for device, answers in zip(limited, results, strict=True):
        statuses = [answer.status for answer in answers]
        assert statuses == [200, 200, 429, 429], (device.mac, answers)
        assert all(answer.text.startswith("ERROR") for answer in answers[2:]), answers
    await asyncio.to_thread(check_store, data_dir, devices + limited[8:])
    for device in limited:
        assert len(await asyncio.to_thread(stored_blocks, data_dir, device)) == len(device.acked)


async def chunked_post(url: str, path: str, body: bytes, wait_secs: float) -> tuple[int, bool]:
    """POST `body` chunked on a new connection, the head first: (status,
    whether the answer came before any of the body was sent)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        try:
            status_line = await asyncio.wait_for(reader.readline(), wait_secs)
            before_body = True
        except TimeoutError:
            # (An answer may be on its way: then the server may close first.)
            with contextlib.suppress(ConnectionError):
                writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
                await writer.drain()
            status_line = await asyncio.wait_for(reader.readline(), 15)
            before_body = False
        return int(status_line.split()[1]), before_body
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def test_json_stream_limit_holds_across_workers_and_its_owner_checks_before_the_body(
    tmp_path: Path, start: Start
) -> None:
    """A JSON stream's rate limit counts each post once whichever worker
    takes it, and a worker that stores the stream refuses an over-limit
    post before its body (the non-owner reads the body and hands it over)."""
    daemon = await start(
        tmp_path / "data",
        workers=2,
        extra="[json]\nrate_limit_per_min = 1.0\nrate_limit_burst = 2\n",
    )
    # Four streams stored by each worker: whichever worker accepts a
    # connection owns half of them.
    streams = [s for s in (f"mm-{n}" for n in range(64)) if shard_of("json", s, 2) == 0][:4]
    streams += [s for s in (f"mm-{n}" for n in range(64)) if shard_of("json", s, 2) == 1][:4]

    async def four_in_a_row(stream: str) -> list[int]:
        return [
            (await chunked_post(daemon.url, f"/{stream}", b'{"n": %d}' % n, 0.0))[0]
            for n in range(4)
        ]

    sequences = await asyncio.gather(*(four_in_a_row(stream) for stream in streams))
    assert sequences == [[200, 200, 429, 429]] * len(streams), daemon.log()

    # Every bucket is empty now: each further post is refused, by its
    # owner before the body, or after it once handed over.
    answers = await asyncio.gather(
        *(chunked_post(daemon.url, f"/{s}", b'{"n": 9}', 1.0) for s in streams for _ in range(6))
    )
    assert {status for status, _ in answers} == {429}, answers
    assert any(before for _, before in answers), "no worker refused before the body"
    assert await daemon.stop() == 0, daemon.log()


# -- 5. a full disk in worker mode --------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs that the test fills up (needs root to mount)."""
    with small_tmpfs(tmp_path, "16m") as mount:
        yield mount


def fill_up(path: Path) -> None:
    """Write zeros until the filesystem has no byte left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 20, 1 << 12, 1):
            with contextlib.suppress(OSError):  # ENOSPC: on with smaller writes
                while True:
                    os.write(fd, bytes(size))
    finally:
        os.close(fd)


async def health(url: str) -> int:
    async with new_connections() as session, session.get(f"{url}/healthz") as resp:
        await resp.read()
        return resp.status


async def poll_health(url: str, status: int) -> None:
    seen = []
    async with asyncio.timeout(POLL_SECS + 5):
        for _ in range(int(POLL_SECS / 0.2)):
            seen.append(await health(url))
            if seen[-1] == status:
                return
            await asyncio.sleep(0.2)
    raise AssertionError(f"/healthz never answered {status}: {seen[-5:]}")


async def test_full_disk_refuses_with_503_and_recovers_in_worker_mode(
    tmp_path: Path, small_fs: Path, start: Start
) -> None:
    data_dir = small_fs / "data"
    daemon = await start(data_dir, workers=2)
    devices = fleet()
    await send_new_blocks(daemon.url, devices, 2)  # every device has its files
    filler = small_fs / "filler"
    await asyncio.to_thread(fill_up, filler)

    async def until_refused(device: Device) -> None:
        # A device fills what is left of its file's last page, then is refused.
        for _ in range(200):
            seq = device.new_block()
            answer = await post(session, daemon.url, device, seq)
            if answer.ok:
                device.acked.add(seq)
                continue
            assert answer.status == 503, (device.mac, answer)
            assert answer.text.startswith("ERROR"), answer
            assert answer.retry_after is not None and int(answer.retry_after) > 0, answer
            return
        raise AssertionError(f"{device.mac}: 200 blocks stored on a full disk")

    async with new_connections() as session, asyncio.timeout(30):
        await asyncio.gather(*(until_refused(device) for device in devices))
    await poll_health(daemon.url, 503)
    # Nothing refused was stored, not even in part.
    await asyncio.to_thread(check_store, data_dir, devices)

    filler.unlink()
    await poll_health(daemon.url, 200)
    async with new_connections() as session, asyncio.timeout(30):
        await asyncio.gather(*(send_until_ok(session, daemon.url, d, d.sent[-1]) for d in devices))
    await send_new_blocks(daemon.url, devices, 2)
    assert await daemon.stop() == 0, daemon.log()
    await asyncio.to_thread(check_store, data_dir, devices, complete=True)


# -- 6. the watchdog sees every worker -------------------------------------------------------

UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid
WATCHDOG_SECS = 2.0


class NotifySocket:
    """The datagram socket systemd listens on. Each message is kept with its
    sender's pid: with the unit's `NotifyAccess=main`, systemd takes only the
    main process's."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.messages: list[tuple[float, int, str]] = []  # (monotonic, pid, text)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._sock.bind(str(path))
        self._sock.settimeout(0.1)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._receive, name="notify-socket")
        self._thread.start()

    def _receive(self) -> None:
        while not self._closing.is_set():
            try:
                data, ancillary, _, _ = self._sock.recvmsg(4096, socket.CMSG_SPACE(UCRED.size))
            except TimeoutError:
                continue
            pid = 0
            for level, kind, payload in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                    pid = UCRED.unpack(payload[: UCRED.size])[0]
            self.messages.append((time.monotonic(), pid, data.decode(errors="replace")))

    def pings(self, pid: int) -> list[float]:
        """When `pid` sent WATCHDOG=1."""
        return [
            at
            for at, sender, text in list(self.messages)
            if sender == pid and "WATCHDOG=1" in text.split("\n")
        ]

    def close(self) -> None:
        self._closing.set()
        self._thread.join()
        self._sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


async def test_watchdog_pings_stop_while_a_worker_is_stalled(
    tmp_path: Path, start: Start, notify: NotifySocket
) -> None:
    data_dir = tmp_path / "data"
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": str(int(WATCHDOG_SECS * 1e6))}
    daemon = await start(data_dir, workers=2, env=env)
    devices = fleet()
    # Posts that reach the stalled worker hang: the devices give up after an
    # interval and send again.
    async with load(daemon.url, devices, timeout_secs=WATCHDOG_SECS):
        await until(
            lambda: all(d.acked for d in devices) and len(notify.pings(daemon.pid)) >= 3,
            lambda: f"no load or no pings from the main process: {notify.messages[-5:]}",
        )
        [victim, *_] = daemon.workers()
        stopped_at = time.monotonic()
        os.kill(victim, signal.SIGSTOP)
        try:
            # systemd restarts a service silent for one interval: such a
            # silence must begin within three intervals of the stall.
            last_ping = stopped_at
            while time.monotonic() < stopped_at + 4 * WATCHDOG_SECS:
                last_ping = max([stopped_at, *notify.pings(daemon.pid)])
                if time.monotonic() - last_ping >= WATCHDOG_SECS:
                    break
                await asyncio.sleep(0.05)
            if time.monotonic() - last_ping < WATCHDOG_SECS:
                late = [
                    round(t - stopped_at, 2) for t in notify.pings(daemon.pid) if t > stopped_at
                ]
                pytest.fail(f"the main process kept pinging with a worker stopped: at +{late} s")
        finally:
            with contextlib.suppress(ProcessLookupError):  # replaced by the daemon
                os.kill(victim, signal.SIGCONT)
        resumed_at = time.monotonic()
        await until(
            lambda: any(at > resumed_at for at in notify.pings(daemon.pid)),
            "no ping after the worker was continued",
            timeout_secs=3 * WATCHDOG_SECS,
        )
        # Every device, the stalled worker's too, gets blocks stored again.
        resumed = {d.mac: len(d.acked) for d in devices}
        await until(
            lambda: all(len(d.acked) >= resumed[d.mac] + 2 for d in devices),
            "some devices got nothing stored after the worker was continued",
        )
    assert await daemon.stop() == 0, daemon.log()
    await asyncio.to_thread(check_store, data_dir, devices)


# -- 7. the fleet view and /metrics see every shard -----------------------------------------------


async def get_text(url: str) -> str:
    async with new_connections() as session, session.get(url) as resp:
        assert resp.status == 200, (url, resp.status)
        return await resp.text()


def metric(text: str, name: str) -> float | None:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match[1]) if match else None


async def test_fleet_view_and_metrics_count_every_shard(tmp_path: Path, start: Start) -> None:
    daemon = await start(tmp_path / "data", workers=2)
    devices = fleet()

    async def send(device: Device) -> None:
        for _ in range(1 + device.index % 5):  # a different count per device
            await send_until_ok(session, daemon.url, device, device.new_block())
        await send_until_ok(session, daemon.url, device, 0)  # a resend: a duplicate

    async with new_connections() as session, asyncio.timeout(30):
        await asyncio.gather(*(send(device) for device in devices))
    expected = {
        d.mac: {"blocks": len(d.sent), "rows": sum(len(d.rows(s)) for s in d.sent), "dups": 1}
        for d in devices
    }
    stored = sum(len(d.sent) for d in devices)
    want_metrics = {
        "ingestd_records_stored_total": float(stored),
        "ingestd_duplicates_suppressed_total": float(DEVICES),
        "ingestd_devices_seen": float(DEVICES),
    }

    async def observe() -> tuple[dict[str, dict[str, int]], dict[str, float | None]]:
        listed = await get_text(f"{daemon.url}/api/devices")
        fleet_seen = {
            d["id"]: {"blocks": d["blocks"], "rows": d["rows"], "dups": d["duplicates"]}
            for d in json.loads(listed)["devices"]
        }
        text = await get_text(f"{daemon.url}/metrics")
        return fleet_seen, {name: metric(text, name) for name in want_metrics}

    async with asyncio.timeout(POLL_SECS + 10):
        for _ in range(int(POLL_SECS / 0.2)):
            fleet_seen, metrics_seen = await observe()
            if fleet_seen == expected and metrics_seen == want_metrics:
                break
            await asyncio.sleep(0.2)
    assert await daemon.stop() == 0, daemon.log()
    wrong = {
        mac: (fleet_seen.get(mac), want)
        for mac, want in expected.items()
        if fleet_seen.get(mac) != want
    }
    assert not wrong, f"fleet view (seen, expected) for {len(wrong)} devices: {wrong}"
    assert set(fleet_seen) == set(expected), sorted(set(fleet_seen) - set(expected))
    assert metrics_seen == want_metrics


async def test_checkpoint_timings_of_the_shards_reach_metrics(tmp_path: Path, start: Start) -> None:
    """Each worker's checkpoints (its shard's own) are timed in the main
    process's /metrics, as one process's are."""
    extra = "[storage]\ncheckpoint_interval_secs = 0.1\n"
    daemon = await start(tmp_path / "data", workers=2, extra=extra)
    devices = fleet()
    syncs = metric(await get_text(f"{daemon.url}/metrics"), "ingestd_checkpoint_sync_seconds_count")
    assert syncs == 0
    async with new_connections() as session, asyncio.timeout(POLL_SECS + 10):
        # A checkpoint starts with a commit once one is due: keep storing.
        for n in range(int(POLL_SECS / 0.05)):
            device = devices[n % len(devices)]
            await send_until_ok(session, daemon.url, device, device.new_block())
            text = await get_text(f"{daemon.url}/metrics")
            syncs = metric(text, "ingestd_checkpoint_sync_seconds_count")
            if syncs:
                break
            await asyncio.sleep(0.05)
    assert await daemon.stop() == 0, daemon.log()
    assert syncs, "no checkpoint timing reached the main process"
