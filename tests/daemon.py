"""Run the real daemon as a subprocess and read its log lines."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

LISTENING = re.compile(rb"listening address=(\S+):(\d+)")
# What systemd hands a service it starts: the daemon under test must not
# think systemd started it, whatever runs the tests.
SYSTEMD_VARS = (
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
)


def without_systemd(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without systemd's variables, plus `extra`
    (a test that plays systemd passes them there)."""
    env = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARS}
    env.update(extra or {})
    return env


def serve_command(*args: str) -> list[str]:
    """`ingestd serve` with `args`, as this interpreter runs it."""
    return [sys.executable, "-m", "ingestd", "serve", *args]


def children(pid: int) -> list[int]:
    """The processes `pid` started (its workers), from /proc; none once it is gone."""
    found = []
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                found += [int(child) for child in fh.read().split()]
    return found


class DaemonProcess:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.port = 0
        self.scheme = "http"

    @classmethod
    async def start(
        cls,
        *args: str,
        env: dict[str, str] | None = None,
        pass_fds: Sequence[int] = (),
        argv: Sequence[str] | None = None,
    ) -> DaemonProcess:
        command = argv or serve_command(*args)
        proc = await asyncio.create_subprocess_exec(
            *command,
            stderr=asyncio.subprocess.PIPE,
            env=without_systemd(env),
            pass_fds=pass_fds,
        )
        daemon = cls(proc)
        line = await daemon.wait_for(b"listening address=")
        match = LISTENING.search(line.encode())
        assert match, line
        daemon.port = int(match[2])
        if "tls=on" in line:
            daemon.scheme = "https"
        return daemon

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    async def wait_for(self, needle: bytes, timeout: float = 15) -> str:
        """Read log lines until one contains `needle`; return it."""
        assert self.proc.stderr is not None
        async with asyncio.timeout(timeout):
            while True:
                raw = await self.proc.stderr.readline()
                if not raw:
                    raise AssertionError(f"daemon exited before {needle!r}: {self.lines}")
                line = raw.decode(errors="replace")
                self.lines.append(line)
                if needle in raw:
                    return line

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    async def stop(self, timeout: float = 30) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        assert self.proc.stderr is not None
        async with asyncio.timeout(timeout):
            rest = await self.proc.stderr.read()
            self.lines += rest.decode(errors="replace").splitlines(keepends=True)
            return await self.proc.wait()

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
