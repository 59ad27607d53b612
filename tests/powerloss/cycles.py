"""Power-cut cycles against the real daemon on a `DurableDisk`.

Each cycle: start `ingestd serve` on the mount (a random `workers` of 1 or 2),
check the data directory against the ledger, resend what was never answered
and some of what was, put load on it (Wattmon devices, a new device, JSON
streams; small files, so they rotate; old files, so housekeeping gzips them),
then cut the power at a chosen kind of moment: the daemon's process group is
SIGKILLed and only the durable image is kept for the next cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from disk import Cut, DurableDisk
from fleet import Block, Device, Refused, Stream, Tally, check_store, post_block, post_doc

CUT_KINDS = ("random", "new_device", "rotation", "checkpoint", "clean_stop", "recovery")
LISTENING = re.compile(r"listening address=127\.0\.0\.1:(\d+)\b")
# The daemon must not think systemd started it, whatever runs the tests.
ENV = {
    k: v
    for k, v in os.environ.items()
    if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")
}
START_TIMEOUT = 30.0
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=20)
# Files are made this much older at each cut (the power stays off a while),
# so housekeeping finds settled closed files to gzip in the next cycle.
OUTAGE_SECS = 120
# Resends of answered records are drawn from each sender's most recent ones:
# a resend is recognised among a device's last storage.dedup_window_blocks
# (1000) records only, and a long run sends more than that.
RESEND_WITHIN = 500


class Ingestd:
    """`ingestd serve` in a process group of its own (with its workers)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.port = 0
        self.listening = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, data_dir: Path, config: Path) -> Ingestd:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ingestd",
            "serve",
            "--config",
            str(config),
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(data_dir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=ENV,
            start_new_session=True,
        )
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while raw := await self.proc.stderr.readline():
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            match = LISTENING.search(line)
            if match and not self.listening.is_set():
                self.port = int(match[1])
                self.listening.set()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def kill_group(self) -> None:
        """The power cut, as the processes see it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        await self.proc.wait()
        await self._reader

    async def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            code = await self.proc.wait()
            await self._reader
        return code

    def log(self, n: int = 30) -> str:
        return "\n".join(self.lines[-n:])


@dataclass
class RunReport:
    cycles: int = 0
    cuts: dict[str, int] = field(default_factory=dict)
    tally: Tally = field(default_factory=Tally)
    acked: int = 0
    sent: int = 0
    elapsed: float = 0.0
    events: list[str] = field(default_factory=list)

    def summary(self) -> str:
        t = self.tally
        return (
            f"cycles={self.cycles} {t.counts()} "
            f"acked={self.acked} sent={self.sent} elapsed={self.elapsed:.1f}s "
            f"cuts={','.join(f'{k}:{v}' for k, v in sorted(self.cuts.items()))}"
        )


def write_config(path: Path, *, workers: int, fsync: str) -> Path:
    path.write_text(
        "[server]\n"
        f"workers = {workers}\n"
        "shutdown_timeout_secs = 5\n"
        "[storage]\n"
        f'fsync = "{fsync}"\n'
        "max_file_bytes = 2048\n"
        "checkpoint_interval_secs = 0.5\n"
        "housekeeping_interval_secs = 0.5\n"
        "compress = true\n"
    )
    return path


def age_files(root: Path, secs: int) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            st = path.stat()
            os.utime(path, ns=(st.st_atime_ns - secs * 10**9, st.st_mtime_ns - secs * 10**9))


class Cycles:
    def __init__(
        self,
        work: Path,
        *,
        mode: str = "strict",
        torn: bool = False,
        seed: int = 1,
        fsync: str = "always",
        kinds: tuple[str, ...] = CUT_KINDS,
        workers: tuple[int, ...] = (1, 2),
        devices: int = 10,
        streams: int = 3,
        round_robin: bool = False,
        log: Callable[[str], None] = lambda _line: None,
    ) -> None:
        self.round_robin = round_robin  # each kind in turn, not at random
        self.disk = DurableDisk(work, mode=mode, torn=torn)
        self.work = work
        self.rng = random.Random(seed)
        self.fsync = fsync
        self.kinds = kinds
        self.workers = workers
        self.devices = [Device(i, random.Random(self.rng.random())) for i in range(devices)]
        self.streams = [Stream(f"meter-{i}") for i in range(streams)]
        self.report = RunReport()
        self.log = log
        self._arm_at_start = False

    @property
    def data_dir(self) -> Path:
        return self.disk.mountpoint

    async def run(self, cycles: int) -> RunReport:
        started = time.monotonic()
        await self.disk.mount()
        try:
            for number in range(cycles):
                kind = (
                    self.kinds[number % len(self.kinds)]
                    if self.round_robin
                    else self.rng.choice(self.kinds)
                )
                await self._cycle(number, kind)
            await self._finish()
        finally:
            await self.disk.unmount()
            self.report.elapsed = time.monotonic() - started
            self.report.acked = sum(len(d.acked) for d in self.devices) + sum(
                len(s.acked) for s in self.streams
            )
            self.report.sent = sum(len(d.blocks) for d in self.devices) + sum(
                len(s.docs) for s in self.streams
            )
        return self.report

    def _check(self, where: str, *, complete: bool = False) -> Tally:
        tally = check_store(self.disk.live, self.devices, self.streams, complete=complete)
        self.report.tally.add(tally, f"{where}: ")
        if not tally.clean:
            details = [*tally.problems, *sorted(tally.corrupt)]
            self.log(f"{where}: {tally.counts()}\n  " + "\n  ".join(details[:10]))
        return tally

    async def _start(self) -> Ingestd | None:
        """The daemon, listening; None when an armed cut went off first (it
        is then already cut)."""
        workers = self.rng.choice(self.workers)
        config = write_config(self.work / "ingestd.toml", workers=workers, fsync=self.fsync)
        daemon = await Ingestd.start(self.data_dir, config)
        listening = asyncio.create_task(daemon.listening.wait())
        tripped = asyncio.create_task(self.disk.tripped.wait())
        exited = asyncio.create_task(daemon.proc.wait())
        try:
            await asyncio.wait(
                [listening, tripped, exited],
                timeout=START_TIMEOUT,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for task in (listening, tripped, exited):
                task.cancel()
        if self.disk.tripped.is_set():
            await self._cut(daemon, "recovery", froze=True)
            return None
        if not daemon.listening.is_set():
            await daemon.kill_group()
            raise AssertionError(f"daemon did not start (workers={workers}):\n{daemon.log()}")
        return daemon

    async def _cut(self, daemon: Ingestd, kind: str, *, froze: bool) -> Cut:
        if not froze:
            await self.disk.freeze()
        await daemon.kill_group()
        cut = await self.disk.cut(self.rng.randrange(2**32))
        await asyncio.to_thread(age_files, self.disk.live, OUTAGE_SECS)
        self.report.cuts[kind] = self.report.cuts.get(kind, 0) + 1
        self.log(f"cut {kind} gen={cut.generation} kept={cut.kept_ops} lost_ops={cut.lost_ops}")
        return cut

    async def _cycle(self, number: int, kind: str) -> None:
        self.report.cycles += 1
        if self._arm_at_start:
            # A second cut in a row: within the recovery's syncs, or the
            # first checkpoint after it.
            await self.disk.arm("sync", self.rng.randint(1, 4))
            self._arm_at_start = False
        daemon = await self._start()
        if daemon is None:
            return
        self._check(f"cycle {number} after restart")
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
            if not self.disk.tripped.is_set():
                await self._resend(session, daemon.base)
            await self._load_until_cut(session, daemon, kind)

    async def _resend(self, session: aiohttp.ClientSession, base: str) -> None:
        """What was never answered, and a sample of what was (stored once)."""
        sends = []
        for device in self.devices:
            if device.pending is not None:
                sends.append((device, device.pending))
            recent = sorted(device.acked)[-RESEND_WITHIN:]
            for seq in self.rng.sample(recent, k=min(2, len(recent))):
                sends.append((device, device.blocks[seq]))
        docs = []
        for stream in self.streams:
            if stream.pending is not None:
                docs.append((stream, stream.pending))
            recent_docs = sorted(stream.acked)[-RESEND_WITHIN:]
            for n in self.rng.sample(recent_docs, k=min(2, len(recent_docs))):
                docs.append((stream, n))

        async def block(device: Device, b: Block) -> None:
            with contextlib.suppress(Refused):
                await post_block(session, base, b)
                device.acknowledge(b)

        async def doc(stream: Stream, n: int) -> None:
            with contextlib.suppress(Refused):
                await post_doc(session, base, stream, n)
                stream.acknowledge(n)

        await asyncio.gather(*(block(d, b) for d, b in sends), *(doc(s, n) for s, n in docs))

    async def _load_until_cut(
        self, session: aiohttp.ClientSession, daemon: Ingestd, kind: str
    ) -> None:
        acks = 0
        enough = asyncio.Event()
        threshold = self.rng.randint(30, 200)
        stop = asyncio.Event()

        def acked() -> None:
            nonlocal acks
            acks += 1
            if acks >= threshold:
                enough.set()

        async def device_loop(device: Device) -> None:
            while not stop.is_set():
                block = device.next_block()
                try:
                    await post_block(session, daemon.base, block)
                except Refused:
                    return
                device.acknowledge(block)
                acked()

        async def stream_loop(stream: Stream) -> None:
            while not stop.is_set():
                n = stream.next_doc()
                try:
                    await post_doc(session, daemon.base, stream, n)
                except Refused:
                    return
                stream.acknowledge(n)
                acked()

        tasks = [asyncio.create_task(device_loop(d)) for d in self.devices]
        tasks += [asyncio.create_task(stream_loop(s)) for s in self.streams]
        froze = False
        try:
            async with asyncio.timeout(120):
                if self.disk.tripped.is_set():
                    froze = True
                elif kind in ("rotation", "checkpoint"):
                    await self.disk.arm(
                        "create" if kind == "rotation" else "sync", self.rng.randint(1, 12)
                    )
                    await self._wait_any(self.disk.tripped.wait(), tasks)
                    froze = self.disk.tripped.is_set()
                elif kind == "new_device":
                    await self._wait_any(enough.wait(), tasks)
                    device = Device(len(self.devices), random.Random(self.rng.random()))
                    self.devices.append(device)
                    block = device.next_block()
                    with contextlib.suppress(Refused):
                        await post_block(session, daemon.base, block)
                        device.acknowledge(block)
                    # The cut comes right after the new device's first OK.
                else:
                    await self._wait_any(enough.wait(), tasks)
                    await asyncio.sleep(self.rng.uniform(0, 0.3))
                if kind == "clean_stop":
                    stop.set()
                    code = await daemon.stop()
                    self.log(f"clean stop exit={code}")
                if kind == "recovery":
                    self._arm_at_start = True
                if not froze and self.disk.tripped.is_set():
                    froze = True
                await self._cut(daemon, kind, froze=froze)
                await asyncio.gather(*tasks)
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(daemon.proc.pid, signal.SIGKILL)

    @staticmethod
    async def _wait_any(what: Coroutine[Any, Any, Any], tasks: list[asyncio.Task[None]]) -> None:
        waiter = asyncio.ensure_future(what)
        try:
            await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        for task in tasks:
            if task.done() and not task.cancelled():
                task.result()  # a sender's failed assertion, if any

    async def _finish(self) -> None:
        """No more cuts: every sender gets its backlog in, then a clean stop."""
        if self._arm_at_start:
            await self.disk.arm("sync", self.rng.randint(1, 4))
            self._arm_at_start = False
            daemon = await self._start()
            if daemon is not None:
                await self.disk.tripped.wait()
                await self._cut(daemon, "recovery", froze=True)
        daemon = await self._start()
        assert daemon is not None
        self._check("final restart")
        async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session:
            for _ in range(5):
                await self._resend(session, daemon.base)
                if all(d.pending is None for d in self.devices) and all(
                    s.pending is None for s in self.streams
                ):
                    break
        code = await daemon.stop()
        if code != 0:
            self.report.events.append(f"final stop exit {code}: {daemon.log()}")
        self._check("final", complete=True)
