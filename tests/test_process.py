"""The real daemon as a subprocess: CLI exit codes, SIGTERM drain, SIGKILL crash loop.

Every load test keeps a ledger of what each simulated device sent and what was
answered `OK`, then reads the data directory back record by record: acknowledged
blocks must be there exactly once, unacknowledged ones whole and once or not at
all, in send order, with no torn line and one header per CSV file.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import random
import re
import signal
import subprocess
import sys
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from daemon import without_systemd

import ingestd
from ingestd.sinks.file.wal import read_log

DAEMON = (sys.executable, "-m", "ingestd")
ENV = without_systemd()
START_TIMEOUT = 15.0
# Above server.shutdown_timeout_secs (25 s), which bounds a drain.
STOP_TIMEOUT = 30.0
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=15)
LISTENING = re.compile(r"listening address=127\.0\.0\.1:(\d+)\b")

HEADER = "Time,Device,Seq,Row,Value"
HEADER_B = "Time,Device,Seq,Row,Power"  # a device whose export changed: a new file
HEADERS = (HEADER, HEADER_B)
# Closed files may be gzipped by housekeeping (after a minute's rest).
CSV_NAME = re.compile(r"\d{4}-\d{2}-\d{2}(_\d{4})?\.csv(\.gz)?")
JSONL_NAME = re.compile(r"\d{4}-\d{2}-\d{2}(_\d{4})?\.jsonl(\.gz)?")
RFC3339_MS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def wattmon_form(mac: str, data: str, md5: str | None = None) -> str:
    """The urlencoded body a Wattmon device sends (md5 of `data` unless given)."""
    md5 = md5 or hashlib.md5(data.encode()).hexdigest()
    return urllib.parse.urlencode({"key": mac, "md5sum": md5, "data": data})


# -- the daemon process ------------------------------------------------------------


class Daemon:
    """`ingestd serve` on an ephemeral port; stderr is collected line by line."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int, lines: list[str]) -> None:
        self.proc = proc
        self.port = port
        self.lines = lines
        self.base = f"http://127.0.0.1:{port}"
        self._new_line = asyncio.Condition()
        self._eof = False
        self._reader = asyncio.create_task(self._read_rest(), name="ingestd-stderr")

    @classmethod
    async def start(cls, data_dir: Path, config: Path | None = None) -> Daemon:
        args = [*DAEMON, "serve", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir)]
        if config is not None:
            args += ["--config", str(config)]
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=ENV,
        )
        assert proc.stderr is not None
        lines: list[str] = []
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while True:
                    raw = await proc.stderr.readline()
                    if not raw:
                        await proc.wait()
                        raise AssertionError(
                            f"daemon exited {proc.returncode} before listening: {lines}"
                        )
                    lines.append(raw.decode(errors="replace").rstrip("\n"))
                    match = LISTENING.search(lines[-1])
                    if match:
                        return cls(proc, int(match[1]), lines)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise

    async def _read_rest(self) -> None:
        assert self.proc.stderr is not None
        while raw := await self.proc.stderr.readline():
            async with self._new_line:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._new_line.notify_all()
        async with self._new_line:
            self._eof = True
            self._new_line.notify_all()  # waiters give up

    async def wait_for_line(self, text: str) -> str:
        async with asyncio.timeout(10), self._new_line:
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                if self._eof:
                    raise AssertionError(f"no log line with {text!r}: {self.log()}")
                await self._new_line.wait()

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    async def stop(self) -> int:
        """SIGTERM, then the exit code; fails if it takes over STOP_TIMEOUT."""
        self.signal(signal.SIGTERM)
        return await self.wait()

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.wait()

    async def wait(self) -> int:
        async with asyncio.timeout(STOP_TIMEOUT):
            code = await self.proc.wait()
            await self._reader
        return code

    def log(self) -> str:
        return "\n".join(self.lines[-40:])


@pytest.fixture
async def start_daemon() -> AsyncIterator[Callable[..., Awaitable[Daemon]]]:
    """`await start_daemon(data_dir, config=None)`; any left running is killed."""
    daemons: list[Daemon] = []

    async def start(data_dir: Path, config: Path | None = None) -> Daemon:
        daemon = await Daemon.start(data_dir, config)
        daemons.append(daemon)
        return daemon

    yield start
    for daemon in daemons:
        if daemon.proc.returncode is None:
            await daemon.kill()
        elif not daemon._reader.done():
            await daemon.wait()


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*DAEMON, *args], capture_output=True, text=True, timeout=timeout, check=False, env=ENV
    )


# -- what the devices sent ---------------------------------------------------------


@dataclass(frozen=True)
class Block:
    mac: str  # as the device sends it: 00:11:22:33:44:55
    seq: int
    data: str  # the CSV as sent (header, rows; CRLF in some blocks)
    header: str
    rows: tuple[str, ...]  # the row lines as they must be stored

    @property
    def form(self) -> str:
        return wattmon_form(self.mac, self.data)


@dataclass
class Device:
    """A Wattmon logger: numbered blocks, resent until answered `OK`."""

    index: int
    rng: random.Random
    blocks: dict[int, Block] = field(default_factory=dict)
    acked: set[int] = field(default_factory=set)
    pending: Block | None = None

    @property
    def mac(self) -> str:
        return "02:00:00:00:" + f"{self.index:04x}"[:2] + ":" + f"{self.index:04x}"[2:]

    @property
    def folder(self) -> str:
        return self.mac.replace(":", "")

    def next_block(self) -> Block:
        if self.pending is None:
            seq = len(self.blocks)
            rows = tuple(
                f"2026-11-21 08:{seq // 60 % 60:02d}:{seq % 60:02d},{self.folder},{seq},{i},"
                f"{self.rng.randrange(10**6)}"
                for i in range(self.rng.randint(1, 5))
            )
            eol = "\r\n" if seq % 2 else "\n"
            # Every fifth device switches its CSV header every seventh block.
            header = HEADERS[self.index % 5 == 0 and seq // 7 % 2]
            data = eol.join((header, *rows)) + eol
            self.pending = Block(self.mac, seq, data, header, rows)
            self.blocks[seq] = self.pending
        return self.pending

    def acknowledge(self, block: Block) -> None:
        self.acked.add(block.seq)
        if self.pending is block:
            self.pending = None


@dataclass
class Stream:
    """A JSON pusher; with `keyed`, each document carries an Idempotency-Key."""

    name: str
    keyed: bool
    docs: dict[int, dict[str, object]] = field(default_factory=dict)
    acked: set[int] = field(default_factory=set)
    pending: int | None = None

    def next_doc(self) -> int:
        if self.pending is None:
            n = len(self.docs)
            self.docs[n] = {"stream": self.name, "n": n, "v": [n * 0.5, None, True], "s": "é\n"}
            self.pending = n
        return self.pending

    def acknowledge(self, n: int) -> None:
        self.acked.add(n)
        if self.pending == n:
            self.pending = None


class Refused(Exception):
    """A request that was not answered `OK` (the device would keep its data)."""


async def post_block(session: aiohttp.ClientSession, base: str, block: Block) -> None:
    await _post(session, f"{base}/wattmon", block.form.encode(), FORM)


async def post_doc(session: aiohttp.ClientSession, base: str, stream: Stream, n: int) -> None:
    headers = {"Content-Type": "application/json"}
    if stream.keyed:
        headers["Idempotency-Key"] = f"{stream.name}-{n}"
    await _post(session, f"{base}/{stream.name}", json.dumps(stream.docs[n]).encode(), headers)


async def _post(
    session: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> None:
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            text = await resp.read()
            status = resp.status
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise Refused(repr(exc)) from exc
    if status == 200:
        # A device stops resending only on exactly `OK`.
        assert text == b"OK", f"200 with body {text!r}"
        return
    # Under load or at shutdown the only refusal is "retry later".
    assert status == 503 and text.startswith(b"ERROR: "), (status, text)
    raise Refused(f"{status} {text!r}")


class Counter:
    """Acknowledgements so far; `reached` is set at a threshold."""

    def __init__(self, threshold: int) -> None:
        self.count = 0
        self.threshold = threshold
        self.reached = asyncio.Event()

    def add(self) -> None:
        self.count += 1
        if self.count >= self.threshold:
            self.reached.set()

    async def wait(self, posters: list[asyncio.Task[None]]) -> None:
        """Until the threshold; fails if the posters all end first."""
        waiter = asyncio.create_task(self.reached.wait())
        try:
            await asyncio.wait([waiter, *posters], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        for task in posters:
            if task.done():
                task.result()  # a poster's failed assertion, if any
        assert self.reached.is_set(), f"load ended after {self.count} acknowledgements"


async def run_device(
    device: Device,
    session: aiohttp.ClientSession,
    base: str,
    acks: Counter,
    *,
    max_posts: int,
    resend_ratio: float = 0.0,
) -> None:
    """Post blocks one after another until refused (the daemon went away)."""
    for _ in range(max_posts):
        if device.acked and device.rng.random() < resend_ratio:
            old = device.blocks[device.rng.choice(sorted(device.acked))]
            try:
                await post_block(session, base, old)
            except Refused:
                return
            continue
        block = device.next_block()
        try:
            await post_block(session, base, block)
        except Refused:
            return
        device.acknowledge(block)
        acks.add()


async def run_stream(
    stream: Stream, session: aiohttp.ClientSession, base: str, acks: Counter, *, max_posts: int
) -> None:
    for _ in range(max_posts):
        n = stream.next_doc()
        try:
            await post_doc(session, base, stream, n)
        except Refused:
            if not stream.keyed:
                stream.pending = None  # no key, no safe resend: move on
            return
        stream.acknowledge(n)
        acks.add()


async def resend_acknowledged(
    session: aiohttp.ClientSession,
    base: str,
    devices: list[Device],
    streams: list[Stream],
    rng: random.Random,
) -> None:
    """Resends of stored records: each answered `OK`, none stored again."""
    with_acks = [d for d in devices if d.acked]
    blocks = [
        device.blocks[seq]
        for device in rng.sample(with_acks, k=min(8, len(with_acks)))
        for seq in rng.sample(sorted(device.acked), k=min(2, len(device.acked)))
    ]
    docs = [(s, n) for s in streams for n in rng.sample(sorted(s.acked), k=min(2, len(s.acked)))]
    async with asyncio.timeout(15):
        await asyncio.gather(
            *(post_block(session, base, block) for block in blocks),
            *(post_doc(session, base, stream, n) for stream, n in docs),
        )


def client_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=CLIENT_TIMEOUT, connector=aiohttp.TCPConnector(limit=200))


# -- reading the data directory back -------------------------------------------------


def data_files(data_dir: Path) -> dict[str, bytes]:
    """Every device file (not the log, not the key lists), by relative path."""
    out = {}
    for protocol in ("wattmon", "json"):
        root = data_dir / protocol
        if root.is_dir():
            for path in sorted(root.rglob("*")):
                if path.is_file() and not path.name.startswith("."):
                    out[str(path.relative_to(data_dir))] = path.read_bytes()
    return out


def file_lines(
    folder: Path, name_pattern: re.Pattern[str], problems: list[str]
) -> list[tuple[str, str, str]]:
    """(file name, its CSV header, line) for a device's files in byte-sorted name order."""
    lines: list[tuple[str, str, str]] = []
    for path in sorted(folder.iterdir(), key=lambda p: p.name.encode()):
        if path.name.startswith("."):
            continue
        where = f"{folder.parent.name}/{folder.name}/{path.name}"
        if not name_pattern.fullmatch(path.name):
            problems.append(f"{where}: unexpected file name")
            continue
        blob = path.read_bytes()
        if path.suffix == ".gz":
            blob = gzip.decompress(blob)
        if not blob:
            problems.append(f"{where}: empty file")
            continue
        if not blob.endswith(b"\n"):
            problems.append(f"{where}: torn last line {blob[-60:]!r}")
        if b"\r" in blob:
            problems.append(f"{where}: CR left in the file")
        text = blob.decode("utf-8", "replace")
        these = text.split("\n")
        if these[-1] == "":
            these.pop()
        header = ""
        if name_pattern is CSV_NAME:
            header = these[0]
            if header not in HEADERS:
                problems.append(f"{where}: first line is not a header: {header!r}")
            headers = [line for line in these if line in HEADERS]
            if len(headers) != 1:
                problems.append(f"{where}: {len(headers)} header lines")
            these = [line for line in these if line not in HEADERS]
        lines += [(path.name, header, line) for line in these]
    return lines


def check_store(
    data_dir: Path, devices: list[Device], streams: list[Stream], *, complete: bool = False
) -> None:
    """Acked records once; unacked ones whole and once, or absent; send order kept.

    With `complete`, every record ever sent must be there (all were acked).
    """
    problems: list[str] = []
    by_folder = {d.folder: d for d in devices}
    root = data_dir / "wattmon"
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.name not in by_folder:
            problems.append(f"wattmon/{folder.name}: a folder no device wrote to")
    for device in devices:
        folder = root / device.folder
        stored: list[int] = []  # block seqs in the order their rows appear
        runs: list[list[str]] = []
        headers: list[str] = []  # the header of the file each run is in
        last_file = ""
        if folder.is_dir():
            for name, header, line in file_lines(folder, CSV_NAME, problems):
                cells = line.split(",")
                if len(cells) != 5 or cells[1] != device.folder or not cells[2].isdigit():
                    problems.append(f"{device.folder}/{name}: foreign line {line!r}")
                    continue
                seq, start = int(cells[2]), cells[3] == "0"
                # A block is one append to one file: a new file, a new seq or
                # a row 0 starts the next one.
                if start or not stored or (stored[-1], last_file) != (seq, name):
                    stored.append(seq)
                    runs.append([])
                    headers.append(header)
                runs[-1].append(line)
                last_file = name
        for seq, rows, header in zip(stored, runs, headers, strict=True):
            block = device.blocks.get(seq)
            if block is None:
                problems.append(f"{device.folder}: rows of a block never sent: {rows}")
            elif tuple(rows) != block.rows:
                problems.append(f"{device.folder}: block {seq} partial or altered: {rows}")
            elif header != block.header:
                problems.append(f"{device.folder}: block {seq} under header {header!r}")
        counts = {seq: stored.count(seq) for seq in set(stored)}
        twice = sorted(seq for seq, c in counts.items() if c > 1)
        if twice:
            problems.append(f"{device.folder}: blocks stored more than once: {twice}")
        if stored != sorted(set(stored)):
            problems.append(f"{device.folder}: blocks out of send order: {stored}")
        must = set(device.blocks) if complete else device.acked
        missing = sorted(must - set(stored))
        if missing:
            problems.append(f"{device.folder}: acknowledged blocks missing: {missing}")

    for stream in streams:
        folder = data_dir / "json" / stream.name
        seen: list[int] = []
        if folder.is_dir():
            for name, _, line in file_lines(folder, JSONL_NAME, problems):
                try:
                    record = json.loads(line)
                    n = record["body"]["n"]
                    assert record["body"] == stream.docs[n]
                    assert record["path"] == f"/{stream.name}"
                    assert record["remote"] == "127.0.0.1"
                    assert RFC3339_MS.fullmatch(record["received_at"])
                except (ValueError, KeyError, TypeError, AssertionError):
                    problems.append(f"json/{stream.name}/{name}: bad line {line[:200]!r}")
                    continue
                seen.append(n)
        if seen != sorted(set(seen)):
            problems.append(f"json/{stream.name}: documents twice or out of order: {seen}")
        must = set(stream.docs) if complete else stream.acked
        missing = sorted(must - set(seen))
        if missing:
            problems.append(f"json/{stream.name}: acknowledged documents missing: {missing}")

    assert not problems, "\n".join(problems[:30])


async def start_upload(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, part: bytes, length: int
) -> None:
    """Begin a Wattmon post and send `part` of its body: the request is then in flight."""
    writer.write(
        b"POST /wattmon HTTP/1.1\r\nHost: ingestd\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % length
    )
    # The 100 answer comes from the request's own handling, past the headers.
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(part)
    await writer.drain()


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """Status line and body of one HTTP/1.1 response; (b"", b"") if the peer hung up."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        assert exc.partial == b"", exc.partial
        return b"", b""
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    assert length, head
    status = head[: head.index(b"\r\n") + 2]
    return status, await reader.readexactly(int(length[1]))


def wal_size(data_dir: Path) -> int:
    """Frames the write-ahead log still holds: none after a clean stop."""
    return len(read_log(data_dir)[1])


# -- 1. the command line -----------------------------------------------------------------


def test_version() -> None:
    done = run_cli("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"ingestd {ingestd.__version__}\n"


VALID_CONFIG = """\
[server]
listen = "[::1]:8081"
max_body_bytes = 1048576
shutdown_timeout_secs = 10

[storage]
data_dir = "/var/lib/ingestd"
fsync = "never"
rotate_period = "hour"
max_file_bytes = 4096
dedup_window_secs = 86400

[wattmon]
paths = ["/wattmon"]
require_md5 = true

[json]
enabled = false

[log]
level = "warning"
format = "json"
"""


@pytest.mark.parametrize("text", [VALID_CONFIG, ""], ids=["full", "empty"])
def test_check_config_accepts(tmp_path: Path, text: str) -> None:
    path = tmp_path / "ingestd.toml"
    path.write_text(text)
    done = run_cli("check-config", str(path))
    assert (done.returncode, done.stdout, done.stderr) == (0, f"{path}: OK\n", "")


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ('[storage]\nfsyncc = "always"\n', "storage.fsyncc"),
        ("[bogus]\nx = 1\n", "bogus"),
        ('[server]\nlisten = "127.0.0.1:80"\nport = 80\n', "server.port"),
        ('[storage]\nmax_open_files = "many"\n', "storage.max_open_files"),
        ("[storage]\nmax_open_files = true\n", "storage.max_open_files"),
        ("[server]\nlisten = 8080\n", "server.listen"),
        ("[wattmon]\nrequire_md5 = 1\n", "wattmon.require_md5"),
        ('[wattmon]\npaths = "/wattmon"\n', "wattmon.paths"),
        ('[storage]\nfsync = "sometimes"\n', "storage.fsync"),
        ("[storage]\nmax_file_bytes = 0\n", "storage.max_file_bytes"),
        ('[server]\nlisten = "localhost"\n', "server.listen"),
        ('[server]\nlisten = "127.0.0.1:99999"\n', "server.listen"),
        ('storage = "data"\n', "storage"),
    ],
    ids=[
        "unknown-key",
        "unknown-table",
        "unknown-server-key",
        "str-for-int",
        "bool-for-int",
        "int-for-str",
        "int-for-bool",
        "str-for-list",
        "bad-choice",
        "zero-size",
        "listen-no-port",
        "listen-port-range",
        "value-for-table",
    ],
)
def test_check_config_refuses(tmp_path: Path, text: str, names: str) -> None:
    path = tmp_path / "ingestd.toml"
    path.write_text(text)
    done = run_cli("check-config", str(path))
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stdout == ""
    assert done.stderr.startswith("ingestd: ") and names in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("text", "expect"),
    [("[server\n", "not valid TOML"), (None, "ingestd.toml")],
    ids=["bad-toml", "missing-file"],
)
def test_check_config_unreadable(tmp_path: Path, text: str | None, expect: str) -> None:
    path = tmp_path / "ingestd.toml"
    if text is not None:
        path.write_text(text)
    done = run_cli("check-config", str(path))
    assert done.returncode == 2
    assert expect in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_serve_refuses_bad_config_before_starting(tmp_path: Path) -> None:
    path = tmp_path / "ingestd.toml"
    path.write_text("[storage]\nbogus = 1\n")
    data = tmp_path / "data"
    done = run_cli(
        "serve", "--config", str(path), "--listen", "127.0.0.1:0", "--data-dir", str(data)
    )
    assert done.returncode == 2 and "storage.bogus" in done.stderr, done.stderr
    done = run_cli("serve", "--listen", "nowhere", "--data-dir", str(data))
    assert done.returncode == 2 and "server.listen" in done.stderr, done.stderr
    assert not data.exists()


async def test_serve_exits_1_when_the_port_is_taken(tmp_path: Path) -> None:
    # Hold a listening socket bound to port 0: its port is surely taken.
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            *DAEMON,
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--data-dir",
            str(tmp_path / "data"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=ENV,
        )
        async with asyncio.timeout(START_TIMEOUT):
            _, err = await proc.communicate()
    assert proc.returncode == 1, err
    assert f"listen_failed address=127.0.0.1:{port}" in err.decode(), err


# -- 2. SIGTERM --------------------------------------------------------------------------


# Each mode named: the default (`workers = 0`) would pick one by the machine's cores.
@pytest.mark.parametrize("workers", [1, 2], ids=["1-process", "2-workers"])
async def test_sigterm_finishes_a_request_held_mid_upload(tmp_path, start_daemon, workers) -> None:
    """A device half way through its body at SIGTERM still gets `OK`, stored."""
    data_dir = tmp_path / "data"
    config = tmp_path / "ingestd.toml"
    # Short, so the bug costs 3 s, not 25; still ample for one small block.
    config.write_text(f"[server]\nworkers = {workers}\nshutdown_timeout_secs = 3\n")
    daemon = await start_daemon(data_dir, config)
    block = Device(1, random.Random(1)).next_block()
    body = block.form.encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    try:
        async with asyncio.timeout(10):
            # A device between two posts: its keep-alive connection is idle.
            idle_writer.write(b"GET /healthz HTTP/1.1\r\nHost: ingestd\r\n\r\n")
            assert await read_response(idle_reader) == (b"HTTP/1.1 200 OK\r\n", b"OK")
            await start_upload(reader, writer, body[: len(body) // 2], len(body))
            daemon.signal(signal.SIGTERM)
            await daemon.wait_for_line("stopping signal=SIGTERM")
            # The daemon closes idle connections once it has stopped accepting:
            # from then on it only drains.
            assert await idle_reader.read() == b""
            writer.write(body[len(body) // 2 :])
            await writer.drain()
            status, answer = await read_response(reader)
    finally:
        for w in (writer, idle_writer):
            w.close()
            with contextlib.suppress(ConnectionError):
                await w.wait_closed()
    assert (status, answer) == (b"HTTP/1.1 200 OK\r\n", b"OK"), daemon.log()
    assert await daemon.wait() == 0, daemon.log()
    assert "stopped" in daemon.lines[-1], daemon.log()
    device = Device(1, random.Random(1))
    device.next_block()
    device.acknowledge(device.blocks[0])
    await asyncio.to_thread(check_store, data_dir, [device], [], complete=True)
    assert await asyncio.to_thread(wal_size, data_dir) == 0


@pytest.mark.parametrize(
    ("signum", "workers"),
    [(signal.SIGTERM, 1), (signal.SIGTERM, 2), (signal.SIGINT, 2)],
    ids=["SIGTERM-1-process", "SIGTERM-2-workers", "SIGINT-2-workers"],
)
async def test_stop_signal_under_load_stores_every_acknowledged_record(
    tmp_path, start_daemon, signum, workers
) -> None:
    data_dir = tmp_path / "data"
    config = tmp_path / "ingestd.toml"
    config.write_text(f"[server]\nworkers = {workers}\n")
    rng = random.Random(20261121)
    devices = [Device(i, random.Random(rng.random())) for i in range(50)]
    streams = [Stream(f"meter-{i}", keyed=False) for i in range(5)]
    daemon = await start_daemon(data_dir, config)
    acks = Counter(threshold=1000)
    after_signal = 0

    async with client_session() as session:
        tasks = [
            asyncio.create_task(run_device(d, session, daemon.base, acks, max_posts=300))
            for d in devices
        ] + [
            asyncio.create_task(run_stream(s, session, daemon.base, acks, max_posts=300))
            for s in streams
        ]
        try:
            async with asyncio.timeout(30):
                await acks.wait(tasks)
                at_signal = acks.count
                daemon.signal(signum)
                code = await daemon.wait()
                after_signal = acks.count - at_signal
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()

    assert code == 0, daemon.log()
    assert any(f"stopping signal={signum.name}" in line for line in daemon.lines)
    assert "stopped" in daemon.lines[-1], daemon.log()
    assert after_signal > 0, "no request was in flight at the signal"
    await asyncio.to_thread(check_store, data_dir, devices, streams)
    assert await asyncio.to_thread(wal_size, data_dir) == 0

    # The keys were saved at the clean stop: resends are still recognised.
    daemon = await start_daemon(data_dir)
    before = await asyncio.to_thread(data_files, data_dir)
    async with client_session() as session:
        await resend_acknowledged(session, daemon.base, devices, [], rng)
    assert await daemon.stop() == 0, daemon.log()
    assert await asyncio.to_thread(data_files, data_dir) == before


@pytest.mark.parametrize("workers", [1, 2], ids=["1-process", "2-workers"])
async def test_second_sigint_exits_at_once_and_a_restart_recovers(
    tmp_path, start_daemon, workers
) -> None:
    """SIGINT twice: exit 1 without draining; the log brings back every acked block."""
    data_dir = tmp_path / "data"
    config = tmp_path / "ingestd.toml"
    config.write_text(f"[server]\nworkers = {workers}\n")
    daemon = await start_daemon(data_dir, config)
    devices = [Device(i, random.Random(i)) for i in range(5)]
    async with client_session() as session, asyncio.timeout(15):
        for _ in range(3):
            for device in devices:
                block = device.next_block()
                await post_block(session, daemon.base, block)
                device.acknowledge(block)
    held = devices[0].next_block()  # never answered: stored whole or not at all
    body = held.form.encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
    try:
        async with asyncio.timeout(10):
            await start_upload(reader, writer, body[:10], len(body))
            daemon.signal(signal.SIGINT)
            await daemon.wait_for_line("stopping signal=SIGINT")
            # The drain now waits on the held request; a second SIGINT cuts it.
            daemon.signal(signal.SIGINT)
            assert await daemon.wait() == 1, daemon.log()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    # Workers may still log a line of their own after the main process left.
    assert any("forced_exit" in line for line in daemon.lines), daemon.log()

    daemon = await start_daemon(data_dir, config)
    await asyncio.to_thread(check_store, data_dir, devices, [])
    async with client_session() as session:
        await resend_acknowledged(session, daemon.base, devices, [], random.Random(1))
    assert await daemon.stop() == 0, daemon.log()
    await asyncio.to_thread(check_store, data_dir, devices, [])


# -- 3. SIGKILL -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fsync", "workers"),
    [("always", 1), ("always", 2), ("never", 2)],
    ids=["always-1-process", "always-2-workers", "never-2-workers"],
)
async def test_sigkill_loop_loses_and_duplicates_nothing_acknowledged(
    tmp_path, start_daemon, fsync, workers
) -> None:
    data_dir = tmp_path / "data"
    config = tmp_path / "ingestd.toml"
    # Small files: blocks rotate by size as well as by header, across the crashes.
    # "never" skips the fsyncs, which only power loss needs: a kill must not matter.
    # Checkpoints every 0.2 s: kills land in the middle of background syncs,
    # with both write-ahead logs holding frames.
    config.write_text(
        f"[server]\nworkers = {workers}\n"
        f'[storage]\nmax_file_bytes = 4096\nfsync = "{fsync}"\ncheckpoint_interval_secs = 0.2\n'
    )
    rng = random.Random(7)
    devices = [Device(i, random.Random(rng.random())) for i in range(30)]
    streams = [Stream(f"meter-{i}", keyed=True) for i in range(4)]
    rounds = 5
    for round_no in range(rounds + 1):
        daemon = await start_daemon(data_dir, config)
        # Recovery is done once it listens: the files must be consistent now.
        await asyncio.to_thread(check_store, data_dir, devices, streams)
        async with client_session() as session:
            if round_no:
                before = await asyncio.to_thread(data_files, data_dir)
                await resend_acknowledged(session, daemon.base, devices, streams, rng)
                after = await asyncio.to_thread(data_files, data_dir)
                assert after == before, "a resend of a stored record changed the files"
            if round_no == rounds:
                break
            acks = Counter(threshold=rng.randint(100, 600))
            tasks = [
                asyncio.create_task(
                    run_device(d, session, daemon.base, acks, max_posts=200, resend_ratio=0.15)
                )
                for d in devices
            ] + [
                asyncio.create_task(run_stream(s, session, daemon.base, acks, max_posts=200))
                for s in streams
            ]
            try:
                async with asyncio.timeout(30):
                    await acks.wait(tasks)
                    await asyncio.sleep(rng.uniform(0, 0.2))  # a random moment
                    await daemon.kill()
                    await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
        assert daemon.proc.returncode == -signal.SIGKILL

    # The last start: every device sends what it still holds, then a clean stop.
    async with client_session() as session, asyncio.timeout(15):
        for device in devices:
            if device.pending is not None:
                await post_block(session, daemon.base, device.pending)
                device.acknowledge(device.pending)
        for stream in streams:
            if stream.pending is not None:
                await post_doc(session, daemon.base, stream, stream.pending)
                stream.acknowledge(stream.pending)
    assert await daemon.stop() == 0, daemon.log()
    assert "stopped" in daemon.lines[-1], daemon.log()
    await asyncio.to_thread(check_store, data_dir, devices, streams, complete=True)
    assert await asyncio.to_thread(wal_size, data_dir) == 0
    sent = sum(len(d.blocks) for d in devices)
    assert sent > rounds * 50  # the loop did store real load


# -- 4. refused requests store nothing ---------------------------------------------------


async def test_refused_requests_store_nothing(tmp_path, start_daemon) -> None:
    data_dir = tmp_path / "data"
    daemon = await start_daemon(data_dir)
    device, other = Device(1, random.Random(1)), Device(2, random.Random(2))
    block = device.next_block()
    wrong = hashlib.md5(block.data.encode() + b"x").hexdigest()
    json_headers = {"Content-Type": "application/json"}
    refusals = [
        (
            "/wattmon",
            wattmon_form(block.mac, block.data, md5=wrong),
            FORM,
            400,
            b"ERROR: MD5 sum mismatch",
        ),
        ("/wattmon", wattmon_form("02:00:00:00:00:0", block.data), FORM, 400, b"ERROR: "),
        ("/wattmon", block.form + "&data=x", FORM, 400, b"ERROR: "),
        ("/wattmon", block.form, {"Content-Type": "text/plain"}, 415, b"ERROR: "),
        ("/meter-bad", '{"n": 0,', json_headers, 400, b"ERROR: "),
        ("/meter-bad", '{"n": NaN}', json_headers, 400, b"ERROR: "),
        ("/.hidden", "{}", json_headers, 400, b"ERROR: "),
    ]
    async with client_session() as session, asyncio.timeout(15):
        for path, body, headers, status, prefix in refusals:
            async with session.post(daemon.base + path, data=body, headers=headers) as resp:
                answer = await resp.read()
                assert (resp.status, answer[: len(prefix)]) == (status, prefix), (path, answer)
        # A refusal never reaches the writer, so there is no lag to wait out.
        assert await asyncio.to_thread(data_files, data_dir) == {}
        # The refused block, sent right, is stored once like any other.
        for sender in (device, other):
            sent = sender.next_block()
            await post_block(session, daemon.base, sent)
            sender.acknowledge(sent)
    assert await daemon.stop() == 0, daemon.log()
    await asyncio.to_thread(check_store, data_dir, [device, other], [], complete=True)
    files = await asyncio.to_thread(data_files, data_dir)
    assert {Path(p).parent.as_posix() for p in files} == {
        f"wattmon/{device.folder}",
        f"wattmon/{other.folder}",
    }
    assert not (data_dir / "json").exists()
    assert not (data_dir / "quarantine").exists()
