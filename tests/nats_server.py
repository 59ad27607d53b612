"""A real nats-server with JetStream, as a subprocess on a loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
from pathlib import Path

NATS_SERVER = shutil.which("nats-server") or (
    "/usr/sbin/nats-server" if Path("/usr/sbin/nats-server").exists() else None
)
_LISTENING = re.compile(rb"Listening for client connections on [^\s]+:(\d+)")
READY_TIMEOUT_SECS = 15.0


class NatsServer:
    """`-p -1` lets the server pick a free port; a restart reuses that port
    (and the store directory), as a real server coming back would."""

    def __init__(
        self, store_dir: Path, *, max_payload: int | None = None, token: str | None = None
    ) -> None:
        assert NATS_SERVER is not None
        self.store_dir = store_dir
        self.max_payload = max_payload
        self.token = token
        self.port = -1
        self.lines: list[str] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        assert self.port > 0, "start the server first"
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        """Start (or restart) and wait until it accepts clients."""
        assert NATS_SERVER is not None
        extra: list[str] = []
        if self.max_payload is not None:  # no flag for it: a config file
            self.store_dir.mkdir(parents=True, exist_ok=True)
            conf = self.store_dir / "server.conf"
            conf.write_text(f"max_payload: {self.max_payload}\n")
            extra = ["-c", str(conf)]
        if self.token is not None:
            extra += ["--auth", self.token]
        for attempt in range(20):
            proc = await asyncio.create_subprocess_exec(
                NATS_SERVER,
                *extra,
                "-js",
                "-sd",
                str(self.store_dir),
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            if await self._wait_ready(proc):
                self._proc = proc
                self._reader = asyncio.create_task(self._drain(proc))
                return
            # The old port may still be held for a moment after a kill.
            await proc.wait()
            await asyncio.sleep(0.1 * (attempt + 1))
        raise AssertionError(f"nats-server did not start: {self.lines[-5:]}")

    async def _wait_ready(self, proc: asyncio.subprocess.Process) -> bool:
        assert proc.stderr is not None
        try:
            async with asyncio.timeout(READY_TIMEOUT_SECS):
                while True:
                    raw = await proc.stderr.readline()
                    if not raw:
                        return False
                    self.lines.append(raw.decode(errors="replace"))
                    match = _LISTENING.search(raw)
                    if match:
                        self.port = int(match[1])
                    if b"Server is ready" in raw:
                        return True
        except TimeoutError:
            proc.kill()
            return False

    async def _drain(self, proc: asyncio.subprocess.Process) -> None:
        """Keep reading the log, so a full pipe never stalls the server."""
        assert proc.stderr is not None
        while raw := await proc.stderr.readline():
            self.lines.append(raw.decode(errors="replace"))

    async def kill(self) -> None:
        """SIGKILL: no clean shutdown, as a crash or a power cut of the process."""
        await self._stop(signal.SIGKILL)

    async def pause(self) -> None:
        """SIGSTOP: the server hangs with its connections open (a slow server).

        Returns once every thread of it is stopped."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)
        tasks = Path(f"/proc/{self._proc.pid}/task")
        async with asyncio.timeout(READY_TIMEOUT_SECS):
            # A few tiny /proc reads; no event tells when a signal took effect.
            while not all(_stopped(t / "stat") for t in tasks.iterdir()):  # noqa: ASYNC110, ASYNC240
                await asyncio.sleep(0.01)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    async def stop(self) -> None:
        await self._stop(signal.SIGTERM)

    async def _stop(self, signum: int) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.returncode is None:
            proc.send_signal(signum)
            proc.send_signal(signal.SIGCONT)  # in case it was paused
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._proc = None


def _stopped(stat: Path) -> bool:
    try:
        # The state follows the parenthesised command name.
        return stat.read_text().rpartition(")")[2].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return True  # the thread is gone
