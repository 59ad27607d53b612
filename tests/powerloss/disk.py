"""The test's side of `durable_fs`: mount it in a child process, cut the power,
mount the durable image that is left.

Each power cut starts a new generation: `WORK/gen-N/live` is the directory
generation N runs on (the image the previous cut left), `WORK/gen-N/grave`
pins its inodes, and `WORK/mnt` is where the filesystem is mounted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

FS_SCRIPT = Path(__file__).with_name("durable_fs.py")
TIMEOUT = 60.0


@dataclass(frozen=True)
class Cut:
    generation: int  # the generation that was cut
    kept_ops: int
    lost_ops: int
    files: int
    dirs: int


class DurableDisk:
    """`await disk.mount()`, run things on `disk.mountpoint`, then
    `await disk.freeze()`, kill them, and `await disk.cut()` (which mounts
    the image left)."""

    def __init__(self, work: Path, *, mode: str = "strict", torn: bool = False) -> None:
        self.work = work
        self.mode = mode
        self.torn = torn
        self.mountpoint = work / "mnt"
        self.generation = 0
        self.cuts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._answers: asyncio.Queue[str] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self.tripped = asyncio.Event()  # an armed freeze went off

    @property
    def live(self) -> Path:
        """The live directory of the current generation (read it only while
        nothing writes through the mount)."""
        return self.work / f"gen-{self.generation}" / "live"

    async def mount(self) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.live.mkdir(parents=True, exist_ok=True)
        args = [str(self.live), str(self.live.with_name("grave")), str(self.mountpoint)]
        args += ["--mode", self.mode] + (["--torn"] if self.torn else [])
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(FS_SCRIPT),
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        self.tripped = asyncio.Event()
        self._answers = asyncio.Queue()
        self._reader = asyncio.create_task(self._read_answers())
        assert await self._answer() == "ready"

    async def _read_answers(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        while line := await self._proc.stdout.readline():
            text = line.decode().strip()
            if text == "tripped":
                self.tripped.set()
            else:
                await self._answers.put(text)
        await self._answers.put("")  # the process ended

    async def _answer(self) -> str:
        async with asyncio.timeout(TIMEOUT):
            answer = await self._answers.get()
        if not answer:
            raise AssertionError("durable_fs exited")
        return answer

    async def _command(self, line: str) -> str:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(line.encode() + b"\n")
        await self._proc.stdin.drain()
        return await self._answer()

    async def freeze(self) -> None:
        """The power goes: every operation from now on fails with EIO."""
        assert await self._command("freeze") == "frozen"

    async def arm(self, event: str, count: int) -> None:
        """Freeze by itself right after the `count`-th next `event`:
        "sync" (fsync of a file or a directory, not fdatasync), "datasync"
        (fdatasync of a file) or "create" (a new file). `tripped` is set then."""
        assert await self._command(f"arm {event} {count}") == "armed"

    async def stats(self) -> dict[str, int]:
        answer = await self._command("stats")
        return json.loads(answer.removeprefix("stats "))  # type: ignore[no-any-return]

    async def cut(self, seed: int) -> Cut:
        """Write the durable image, unmount, and mount the image as the next
        generation. Whatever used the mount must be dead by now."""
        target = self.work / f"gen-{self.generation + 1}" / "live"
        answer = await self._command(f"cut {target} {seed}")
        assert answer.startswith("cut "), answer
        report = json.loads(answer.removeprefix("cut "))
        await self.unmount()
        cut = Cut(self.generation, **report)
        self.generation += 1
        self.cuts += 1
        await self.mount()
        return cut

    async def unmount(self) -> None:
        if self._proc is None:
            return
        proc, self._proc = self._proc, None
        await asyncio.to_thread(
            subprocess.run,
            ["fusermount3", "-u", "-z", str(self.mountpoint)],
            check=False,
            capture_output=True,
        )
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            async with asyncio.timeout(TIMEOUT):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if self._reader is not None:
            await self._reader

    async def __aenter__(self) -> DurableDisk:
        await self.mount()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.unmount()


def fresh_work(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o755)
    return path
