"""`ingestd simulate`: a fleet of emulated devices posting to a collector.

Wattmon loggers post a form (`key`, `md5sum`, `data`) and resend the same
block until the body is exactly `OK`; JSON pushers (Allegro multimeters) post
a document to a path naming their stream and retry it until a 2xx. Faults can
be injected, every block's fate can be recorded (`--record`), and a summary
is printed at the end.

Error kinds in the summary: `http_<status>`; `not_ok` (Wattmon: a 2xx whose
body is not exactly `OK`); `timeout`; `connect` (refused, unreachable, TLS);
`disconnected`, `reset` (the connection dropped mid-request); `bad_response`;
`client` (anything else aiohttp raises).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import queue
import random
import signal
import sys
import threading
import time
import urllib.parse
from array import array
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import IO, Any

import aiohttp
import uvloop
from yarl import URL

PROTOCOLS = ("wattmon", "json")
HEADER = "Time,V,I,P"
FORM = "application/x-www-form-urlencoded"
# 02:... is a locally administered unicast MAC: never a real vendor's.
MAC_PREFIX = (0x02, 0x00, 0x00)
MAX_DEVICES = 1 << 24
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


# -- arguments -----------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """`30s`, `5m`, `1h`, `250ms` or plain seconds (`90`, `1.5`) to seconds > 0."""
    value = text.strip().lower()
    unit = next((u for u in ("ms", "s", "m", "h") if value.endswith(u)), "")
    number = value[: len(value) - len(unit)].strip()
    try:
        seconds = float(number) * _UNITS[unit or "s"]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid duration {text!r} (expected e.g. 30s, 5m, 1h or seconds)"
        ) from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"duration must be positive, got {text!r}")
    return seconds


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a probability: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"probability must be in [0, 1], got {text!r}")
    return value


def collector_url(text: str) -> URL:
    try:
        url = URL(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"invalid URL {text!r}: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise argparse.ArgumentTypeError(
            f"invalid URL {text!r}: expected http://HOST[:PORT][/PATH] or https://..."
        )
    return url


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `simulate` subcommand's options."""
    arg = parser.add_argument
    arg(
        "url",
        type=collector_url,
        metavar="URL",
        help="wattmon: the export URL (http://HOST:8080/wattmon; /wattmon if no path); "
        "json: the base URL, each device posts to URL/mm-<n>",
    )
    arg("--protocol", choices=PROTOCOLS, default="wattmon", help="device kind (wattmon)")
    arg("--devices", metavar="N", type=positive_int, default=10, help="fleet size (10)")
    arg(
        "--rate",
        metavar="R",
        type=positive_float,
        default=1.0,
        help="posts per second per device, e.g. 0.1 (1)",
    )
    arg(
        "--duration",
        metavar="D",
        type=parse_duration,
        default=30.0,
        help="how long to send: 30s, 5m, 1h or seconds (30s)",
    )
    arg(
        "--concurrency",
        metavar="N",
        type=positive_int,
        default=256,
        help="requests in flight at most (256)",
    )
    arg(
        "--timeout",
        metavar="SECS",
        type=positive_float,
        default=10.0,
        help="seconds per request (10)",
    )
    arg(
        "--backoff-base",
        metavar="SECS",
        type=positive_float,
        default=1.0,
        help="first retry delay, doubled per failure, with jitter (1)",
    )
    arg(
        "--backoff-cap",
        metavar="SECS",
        type=positive_float,
        default=60.0,
        help="longest retry delay (60)",
    )
    arg(
        "--rows", metavar="N", type=positive_int, default=10, help="CSV rows per Wattmon block (10)"
    )
    arg(
        "--seed",
        metavar="N",
        type=int,
        default=0,
        help="MACs, stream names, data and faults derive from it (0)",
    )
    arg(
        "--idempotency-key",
        action="store_true",
        help="json: send an Idempotency-Key header, so resends are stored once",
    )
    arg("--insecure", action="store_true", help="https: do not verify the certificate")
    fault = parser.add_argument_group("fault injection (probabilities, 0..1)").add_argument
    fault(
        "--corrupt-md5",
        type=probability,
        default=0.0,
        metavar="P",
        help="wattmon: a post carries a wrong md5sum (answered 400; the resend is right)",
    )
    fault(
        "--duplicate-resend",
        type=probability,
        default=0.0,
        metavar="P",
        help="after a success, post the same block once more, as when the answer is lost "
        "(json: stored twice unless --idempotency-key)",
    )
    fault(
        "--slow-upload",
        type=probability,
        default=0.0,
        metavar="P",
        help="send a post's body in chunks over 1-2 s",
    )
    fault(
        "--malformed-csv",
        type=probability,
        default=0.0,
        metavar="P",
        help="wattmon: a block has a row with an extra column (quarantined, answered OK)",
    )
    out = parser.add_argument_group("output").add_argument
    out("--json", action="store_true", help="print the summary as JSON")
    out(
        "--record",
        metavar="FILE",
        help="write every block as a JSON line, with whether it was acknowledged",
    )
    out("--quiet", action="store_true", help="no progress on stderr")
    out(
        "--progress-every",
        metavar="SECS",
        type=positive_float,
        default=10.0,
        help="progress line period when stderr is not a terminal (10)",
    )
    out(
        "--fail-on-error",
        action="store_true",
        help="exit 1 if a post failed (injected faults aside) or a block was left unacknowledged",
    )


@dataclass(frozen=True, slots=True)
class Options:
    url: URL
    protocol: str
    devices: int
    rate: float
    duration_secs: float
    concurrency: int = 256
    timeout_secs: float = 10.0
    backoff_base_secs: float = 1.0
    backoff_cap_secs: float = 60.0
    rows: int = 10
    seed: int = 0
    idempotency_key: bool = False
    corrupt_md5: float = 0.0
    duplicate_resend: float = 0.0
    slow_upload: float = 0.0
    malformed_csv: float = 0.0
    record: str | None = None
    progress: bool = True
    progress_every_secs: float = 10.0
    verify_tls: bool = True

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Options:
        if args.devices > MAX_DEVICES:
            raise ValueError(f"--devices: at most {MAX_DEVICES}")
        if args.backoff_cap < args.backoff_base:
            raise ValueError("--backoff-cap must be at least --backoff-base")
        if args.protocol == "json" and (args.corrupt_md5 or args.malformed_csv):
            raise ValueError("--corrupt-md5 and --malformed-csv apply to --protocol wattmon only")
        if args.protocol == "wattmon" and args.idempotency_key:
            raise ValueError("--idempotency-key applies to --protocol json only")
        url = args.url
        if args.protocol == "wattmon" and url.path in ("", "/"):
            url = url.with_path("/wattmon", keep_query=True)
        return cls(
            url=url,
            protocol=args.protocol,
            devices=args.devices,
            rate=args.rate,
            duration_secs=args.duration,
            concurrency=args.concurrency,
            timeout_secs=args.timeout,
            backoff_base_secs=args.backoff_base,
            backoff_cap_secs=args.backoff_cap,
            rows=args.rows,
            seed=args.seed,
            idempotency_key=args.idempotency_key,
            corrupt_md5=args.corrupt_md5,
            duplicate_resend=args.duplicate_resend,
            slow_upload=args.slow_upload,
            malformed_csv=args.malformed_csv,
            record=args.record,
            progress=not args.quiet,
            verify_tls=not args.insecure,
            progress_every_secs=args.progress_every,
        )


def run(args: argparse.Namespace) -> int:
    """Entry point of `ingestd simulate`: 0 when it ran, 2 on bad options."""
    try:
        options = Options.from_args(args)
    except ValueError as exc:
        sys.stderr.write(f"ingestd simulate: error: {exc}\n")
        return 2
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        try:
            summary = runner.run(Simulation(options).run())
        except OSError as exc:  # the record file cannot be written
            sys.stderr.write(f"ingestd simulate: error: {exc}\n")
            return 2
    sys.stdout.write(json.dumps(summary, indent=2) + "\n" if args.json else format_summary(summary))
    sys.stdout.flush()
    if args.fail_on_error and (summary["unexpected_errors"] or summary["unacknowledged"]):
        return 1
    return 0


# -- what the devices send -----------------------------------------------------------


def device_numbers(seed: int, count: int) -> list[int]:
    """Distinct 24-bit device numbers, the same for the same seed."""
    base = random.Random(seed).randrange(MAX_DEVICES)
    return [(base + i) % MAX_DEVICES for i in range(count)]


def mac_of(number: int) -> str:
    return ":".join(f"{b:02x}" for b in (*MAC_PREFIX, *number.to_bytes(3, "big")))


@dataclass(slots=True)
class Block:
    """One unit a device delivers: a Wattmon CSV block or a JSON document."""

    url: URL
    body: bytes  # what a correct post sends
    headers: dict[str, str]
    record: dict[str, Any]
    corrupt_body: bytes | None = None  # wattmon: the same form, wrong md5sum


class Stream:
    """A small seeded random stream (SplitMix64), one per device and purpose.

    A `random.Random` holds about 2.8 KB of state; a fleet of 100,000 would
    need over half a GB for its two streams each.
    """

    __slots__ = ("state",)
    MASK = (1 << 64) - 1

    def __init__(self, seed: str) -> None:
        self.state = int.from_bytes(hashlib.blake2b(seed.encode(), digest_size=8).digest())

    def random(self) -> float:
        """A float in [0, 1)."""
        self.state = z = (self.state + 0x9E3779B97F4A7C15) & self.MASK
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & self.MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & self.MASK
        return ((z ^ (z >> 31)) >> 11) * 2.0**-53

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.random()

    def randrange(self, stop: int) -> int:
        return int(self.random() * stop)


class Device:
    """A device's identity and data: numbered blocks with increasing timestamps."""

    def __init__(self, options: Options, index: int, number: int, started: float) -> None:
        self.options = options
        self.index = index
        # Two streams: the data stay the same whatever faults are asked for.
        self.rng = Stream(f"{options.seed}-{index}")
        self.faults = Stream(f"{options.seed}-{index}-faults")
        self.seq = 0
        self.clock = int(started)  # the timestamp of the next row
        # Rows spread over the posting period, in whole seconds (the CSV's resolution).
        self.row_step = max(1, round(1 / options.rate / options.rows))
        self.acknowledged = 0
        if options.protocol == "wattmon":
            self.key = mac_of(number)
            self.name = self.key.replace(":", "")
            self.url = options.url
        else:
            self.key = f"mm-{number}"
            path = f"{options.url.path.rstrip('/')}/{self.key}"
            self.url = options.url.with_path(path, keep_query=True)
            self.name = path[1:].replace("/", "_")  # the daemon's stream name

    def next_block(self) -> Block:
        self.seq += 1
        if self.options.protocol == "wattmon":
            return self._csv_block()
        return self._json_document()

    def _csv_block(self) -> Block:
        rng = self.rng
        rows = []
        for _ in range(self.options.rows):
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.clock))
            self.clock += self.row_step
            volts = 230 + rng.uniform(-5, 5)
            amps = rng.uniform(0, 20)
            rows.append(f"{stamp},{volts:.1f},{amps:.2f},{volts * amps:.1f}")
        malformed = rng.random() < self.options.malformed_csv
        if malformed:
            rows[rng.randrange(len(rows))] += ",0"
        data = (HEADER + "\n" + "\n".join(rows) + "\n").encode()
        md5 = hashlib.md5(data, usedforsecurity=False).hexdigest()
        wrong = hashlib.md5(data + b"~", usedforsecurity=False).hexdigest()
        record = {
            "protocol": "wattmon",
            "device": self.name,
            "key": self.key,
            "seq": self.seq,
            "md5": md5,
            "header": HEADER,
            "rows": rows,
            "malformed": malformed,
        }
        return Block(
            self.url,
            _form(self.key, md5, data),
            {"Content-Type": FORM},
            record,
            corrupt_body=_form(self.key, wrong, data),
        )

    def _json_document(self) -> Block:
        rng = self.rng
        doc_id = f"{self.key}-{self.seq}"
        now = self.clock
        self.clock += max(1, round(1 / self.options.rate))
        document = {
            "id": doc_id,
            "timestamp": now,
            "interfaces": [
                {
                    "name": f"eth{port}",
                    "rx_bytes": rng.randrange(10**9),
                    "tx_bytes": rng.randrange(10**9),
                    "rx_packets": rng.randrange(10**6),
                    "tx_packets": rng.randrange(10**6),
                    "utilization": round(rng.random(), 4),
                }
                for port in range(2)
            ],
        }
        headers = {"Content-Type": "application/json"}
        if self.options.idempotency_key:
            headers["Idempotency-Key"] = doc_id
        record = {
            "protocol": "json",
            "device": self.key,
            "stream": self.name,
            "path": self.url.path,
            "seq": self.seq,
            "id": doc_id,
            "document": document,
        }
        body = json.dumps(document, separators=(",", ":")).encode()
        return Block(self.url, body, headers, record)


def _form(key: str, md5: str, data: bytes) -> bytes:
    return urllib.parse.urlencode({"key": key, "md5sum": md5, "data": data}).encode()


async def _trickle(body: bytes, seconds: float) -> AsyncIterator[bytes]:
    pieces = 8
    size = max(1, math.ceil(len(body) / pieces))
    for start in range(0, len(body), size):
        if start:
            await asyncio.sleep(seconds / pieces)
        yield body[start : start + size]


# -- the run -------------------------------------------------------------------------


@dataclass
class Stats:
    sent: int = 0
    acknowledged: int = 0
    retried: int = 0
    duplicates_sent: int = 0
    duplicates_acknowledged: int = 0
    unacknowledged: int = 0  # posted, never acknowledged
    not_sent: int = 0  # due, but the run ended while the post waited for a free slot
    in_flight: int = 0
    injected_errors: int = 0  # corrupted posts answered with an error, as they should be
    errors: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    latencies: array[float] = field(default_factory=lambda: array("d"))


class Recorder:
    """JSON lines written by a thread of its own, so the loop never waits on disk."""

    def __init__(self, file: IO[str]) -> None:
        self._file = file
        self._lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write, name="simulate-record", daemon=True)
        self._thread.start()
        self.error: OSError | None = None

    def add(self, entry: dict[str, Any]) -> None:
        self._lines.put(json.dumps(entry, separators=(",", ":")) + "\n")

    def _write(self) -> None:
        try:
            with self._file:
                while (line := self._lines.get()) is not None:
                    self._file.write(line)
        except OSError as exc:
            self.error = exc

    async def close(self) -> None:
        self._lines.put(None)
        await asyncio.to_thread(self._thread.join)
        if self.error is not None:
            raise self.error


class Simulation:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.stats = Stats()
        self.per_device: list[int] = []
        self._stopped = False
        self._sleeping: set[asyncio.Task[None]] = set()  # devices waiting for their next post
        self._semaphore = asyncio.Semaphore(options.concurrency)
        self._recorder: Recorder | None = None
        self._session: aiohttp.ClientSession | None = None
        self._deadline = 0.0

    async def run(self) -> dict[str, Any]:
        options = self.options
        if options.record:
            file = await asyncio.to_thread(open, options.record, "w", encoding="utf-8")
            self._recorder = Recorder(file)
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGINT, self._on_signal)
            loop.add_signal_handler(signal.SIGTERM, self._on_signal)
        started = loop.time()
        self._deadline = started + options.duration_secs
        wall = time.time()
        devices = [
            Device(options, i, number, wall)
            for i, number in enumerate(device_numbers(options.seed, options.devices))
        ]
        # ssl=True is aiohttp's default: verify the server's certificate.
        connector = aiohttp.TCPConnector(limit=options.concurrency, ssl=options.verify_tls)
        timeout = aiohttp.ClientTimeout(total=options.timeout_secs)
        progress = asyncio.create_task(self._progress(started), name="simulate-progress")
        try:
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                self._session = session
                async with asyncio.TaskGroup() as group:
                    for device in devices:
                        offset = device.index / options.devices / options.rate
                        group.create_task(self._device(device, started + offset))
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(signum)
            progress.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await progress
            if self._recorder is not None:
                await self._recorder.close()
        self.per_device = [device.acknowledged for device in devices]
        return self.summary(loop.time() - started)

    def _on_signal(self) -> None:
        """First signal: stop sending, finish what is in flight, summarise. Second: exit."""
        if self._stopped:
            os._exit(130)
        self._stopped = True
        for task in self._sleeping:
            task.cancel()

    async def _wait_until(self, when: float) -> bool:
        """Sleep until `when`; False if the run ends first."""
        if when >= self._deadline or self._stopped:
            return False
        delay = when - asyncio.get_running_loop().time()
        if delay <= 0:
            return True
        task = asyncio.current_task()
        assert task is not None
        self._sleeping.add(task)
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            # Cancelled by a stop signal: end this device; by anything else: go on.
            if not self._stopped or task.uncancel():
                raise
            return False
        finally:
            self._sleeping.discard(task)
        return not self._stopped

    async def _device(self, device: Device, first: float) -> None:
        loop = asyncio.get_running_loop()
        period = 1 / self.options.rate
        due = first
        while await self._wait_until(due):
            if not await self._deliver(device, device.next_block()):
                return  # the run ended while the block was still unacknowledged
            due = max(due + period, loop.time())

    async def _deliver(self, device: Device, block: Block) -> bool:
        """Post the block until it is acknowledged (True) or the run ends (False)."""
        options, stats = self.options, self.stats
        loop = asyncio.get_running_loop()
        attempts = 0
        last_corrupt = False
        while True:
            # A transmission error is not repeated: the resend after one is right.
            corrupt = (
                block.corrupt_body is not None
                and not last_corrupt
                and device.faults.random() < options.corrupt_md5
            )
            result = await self._post(device, block, corrupt=corrupt)
            if result is None:  # the run ended before the post could leave
                break
            error, latency = result
            if attempts:
                stats.retried += 1
            elif block.record.get("malformed"):
                stats.faults["malformed_csv"] += 1
            attempts += 1
            last_corrupt = corrupt
            if corrupt:
                stats.faults["corrupt_md5"] += 1
                if error is not None:
                    stats.injected_errors += 1
                else:
                    stats.faults["corrupt_md5_accepted"] += 1  # the collector should refuse it
            if error is None:
                return await self._acknowledged(device, block, attempts, latency)
            delay = min(options.backoff_cap_secs, options.backoff_base_secs * 2 ** (attempts - 1))
            delay *= device.faults.uniform(0.5, 1.0)  # jitter, so a fleet does not resend in step
            if not await self._wait_until(loop.time() + delay):
                break
        if attempts:
            stats.unacknowledged += 1
        else:
            stats.not_sent += 1
        self._record(
            block, acknowledged=False, attempts=attempts, duplicate_resend=None, latency_ms=None
        )
        return False

    async def _acknowledged(
        self, device: Device, block: Block, attempts: int, latency: float
    ) -> bool:
        options, stats = self.options, self.stats
        stats.acknowledged += 1
        stats.latencies.append(latency)
        device.acknowledged += 1
        duplicate = None
        if options.duplicate_resend and device.faults.random() < options.duplicate_resend:
            result = await self._post(device, block, corrupt=False)
            if result is not None:
                stats.duplicates_sent += 1
                stats.faults["duplicate_resend"] += 1
                duplicate = result[0] or "ok"
                if result[0] is None:
                    stats.duplicates_acknowledged += 1
        self._record(
            block,
            acknowledged=True,
            attempts=attempts,
            duplicate_resend=duplicate,
            latency_ms=round(latency * 1000, 3),
        )
        return True

    def _record(self, block: Block, **fate: Any) -> None:
        if self._recorder is not None:
            self._recorder.add({**block.record, **fate})

    async def _post(
        self, device: Device, block: Block, *, corrupt: bool
    ) -> tuple[str | None, float] | None:
        """One POST: (None, latency) on success, (error kind, latency) on failure,
        None if the run ended while it waited for a free slot (never sent)."""
        assert self._session is not None
        options, stats = self.options, self.stats
        body = block.corrupt_body if corrupt and block.corrupt_body else block.body
        headers = dict(block.headers)
        data: bytes | AsyncIterator[bytes] = body
        slow = options.slow_upload and device.faults.random() < options.slow_upload
        if slow:
            headers["Content-Length"] = str(len(body))  # a device knows its size: no chunking
            data = _trickle(body, device.faults.uniform(1.0, 2.0))
        async with self._semaphore:
            if self._stopped or asyncio.get_running_loop().time() >= self._deadline:
                return None
            stats.sent += 1
            stats.in_flight += 1
            if slow:
                stats.faults["slow_upload"] += 1
            started = time.monotonic()
            try:
                async with self._session.post(block.url, data=data, headers=headers) as resp:
                    answer = await resp.read()
                    status = resp.status
                error = _judge(self.options.protocol, status, answer)
            except TimeoutError:
                error = "timeout"
            except aiohttp.ClientConnectorError:
                error = "connect"
            except aiohttp.ServerDisconnectedError:
                error = "disconnected"
            except (aiohttp.ClientOSError, ConnectionError):
                error = "reset"  # reset by the peer, broken pipe
            except aiohttp.ClientPayloadError:
                error = "bad_response"
            except (aiohttp.ClientError, OSError):
                error = "client"
            finally:
                stats.in_flight -= 1
            latency = time.monotonic() - started
        if error is not None:
            stats.errors[error] += 1
        return error, latency

    async def _progress(self, started: float) -> None:
        if not self.options.progress:
            return
        tty = sys.stderr.isatty()
        interval = 0.5 if tty else self.options.progress_every_secs
        loop = asyncio.get_running_loop()
        try:
            while True:
                await asyncio.sleep(interval)
                line = self._progress_line(loop.time() - started)
                sys.stderr.write(f"\r{line}\x1b[K" if tty else f"{line}\n")
                sys.stderr.flush()
        finally:
            if tty:
                sys.stderr.write("\n")
                sys.stderr.flush()

    def _progress_line(self, elapsed: float) -> str:
        s = self.stats
        total = self.options.duration_secs
        done = min(1.0, elapsed / total)
        bar = "#" * round(done * 20)
        return (
            f"simulate [{bar:<20}] {elapsed:.0f}/{total:.0f}s sent={s.sent} "
            f"acked={s.acknowledged} retried={s.retried} errors={sum(s.errors.values())} "
            f"in_flight={s.in_flight}"
        )

    def summary(self, elapsed: float) -> dict[str, Any]:
        s = self.stats
        options = self.options
        latencies = sorted(s.latencies)
        per_device = self.per_device or [0]
        errors = sum(s.errors.values())
        return {
            "protocol": options.protocol,
            "url": str(options.url),
            "devices": options.devices,
            "rate_per_device": options.rate,
            "duration_secs": options.duration_secs,
            "elapsed_secs": round(elapsed, 3),
            "acknowledged_per_sec": round(s.acknowledged / elapsed, 1) if elapsed else 0.0,
            "sent": s.sent,
            "acknowledged": s.acknowledged,
            "retried": s.retried,
            "duplicates_sent": s.duplicates_sent,
            "duplicates_acknowledged": s.duplicates_acknowledged,
            "unacknowledged": s.unacknowledged,
            "not_sent": s.not_sent,
            "errors": dict(sorted(s.errors.items())),
            "errors_total": errors,
            "unexpected_errors": errors - s.injected_errors,
            "latency_ms": {
                name: round(_percentile(latencies, p) * 1000, 3)
                for name, p in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))
            },
            "acknowledged_per_device": {"min": min(per_device), "max": max(per_device)},
            "faults": dict(sorted(s.faults.items())),
        }


def _judge(protocol: str, status: int, answer: bytes) -> str | None:
    """None when the device counts the answer as success, else the error kind."""
    if protocol == "wattmon":
        # The device reads the body, not the status: only exactly `OK` ends a block.
        if answer == b"OK":
            return None
        return f"http_{status}" if status >= 300 else "not_ok"
    return None if 200 <= status < 300 else f"http_{status}"


def _percentile(ordered: list[float] | array[float], p: float) -> float:
    """Nearest rank: the smallest value with at least p% of them at or below it."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def format_summary(summary: dict[str, Any]) -> str:
    lat = summary["latency_ms"]
    per = summary["acknowledged_per_device"]
    errors = " ".join(f"{k}={v}" for k, v in summary["errors"].items()) or "-"
    faults = " ".join(f"{k}={v}" for k, v in summary["faults"].items()) or "-"
    return (
        f"ingestd simulate: {summary['protocol']} to {summary['url']}, "
        f"{summary['devices']} devices at {summary['rate_per_device']:g}/s "
        f"for {summary['elapsed_secs']:.1f}s\n"
        f"  sent            {summary['sent']}\n"
        f"  acknowledged    {summary['acknowledged']} "
        f"({summary['acknowledged_per_sec']:g}/s; per device min {per['min']} max {per['max']})\n"
        f"  retried         {summary['retried']}\n"
        f"  duplicates      {summary['duplicates_sent']} sent, "
        f"{summary['duplicates_acknowledged']} acknowledged\n"
        f"  unacknowledged  {summary['unacknowledged']} "
        f"(and {summary['not_sent']} due but not sent: waiting for a free slot at the end)\n"
        f"  errors          {summary['errors_total']} ({errors}); "
        f"unexpected {summary['unexpected_errors']}\n"
        f"  latency ms      p50 {lat['p50']:.1f}  p90 {lat['p90']:.1f}  "
        f"p99 {lat['p99']:.1f}  max {lat['max']:.1f}\n"
        f"  faults          {faults}\n"
    )
