"""The main process's side of worker mode: start, watch and stop workers.

See ingestd/runtime/worker.py for what a worker does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Coroutine
from pathlib import Path

from aiohttp import web

from ingestd.config import parse_listen
from ingestd.http.keys import DEVICES, METRICS, SHARDS
from ingestd.runtime.ipc import CONTROL_SOCKET, MAIN_SOCKET, Report, WorkerLinks
from ingestd.runtime.shard_states import apply_report

log = logging.getLogger("ingestd.supervisor")

READY_TIMEOUT_SECS = 30.0
RESTART_DELAY_SECS = 1.0
MAX_RESTART_DELAY_SECS = 30.0


class WorkerError(Exception):
    """Workers did not start."""


def bind(listen: str) -> socket.socket:
    """The public listening socket, bound here and inherited by every worker."""
    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=2048)
    sock.setblocking(False)
    return sock


class WorkerPool:
    def __init__(
        self, app: web.Application, runner: web.AppRunner, args: list[str], count: int
    ) -> None:
        self.count = count
        self._app = app
        self._runner = runner
        self._args = args
        self._runtime = Path(tempfile.mkdtemp(prefix="ingestd-"))  # 0700
        self._links = WorkerLinks(
            self._on_hello, self._on_report, self._on_reloaded, self._on_drained
        )
        self._reloaded: dict[int, asyncio.Event] = {}
        self._drained: dict[int, asyncio.Event] = {}
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._ready: dict[int, asyncio.Event] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        self._fds: list[int] = []
        self._sockets: list[socket.socket] = []
        self._stopping = False
        self._spawn_lock = asyncio.Lock()
        self._restarting: set[int] = set()

    async def start(self, sockets: list[socket.socket]) -> None:
        self._sockets = sockets
        self._fds = [sock.fileno() for sock in sockets]
        # State requests from the workers reach the full app here.
        await web.UnixSite(self._runner, str(self._runtime / CONTROL_SOCKET)).start()
        await self._links.start(self._runtime / MAIN_SOCKET)
        for worker_id in range(self.count):
            await self._spawn(worker_id)
        try:
            async with asyncio.timeout(READY_TIMEOUT_SECS):
                for event in self._ready.values():
                    await event.wait()
        except TimeoutError:
            raise WorkerError("workers did not become ready") from None

    async def _spawn(self, worker_id: int) -> None:
        self._ready[worker_id] = asyncio.Event()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ingestd.runtime.worker",
            *self._args,
            "--worker-id",
            str(worker_id),
            "--workers",
            str(self.count),
            "--runtime-dir",
            str(self._runtime),
            "--fds",
            ",".join(map(str, self._fds)),
            pass_fds=self._fds,
        )
        self._procs[worker_id] = proc
        watcher = asyncio.create_task(self._watch(worker_id, proc))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _watch(self, worker_id: int, proc: asyncio.subprocess.Process) -> None:
        """Start a worker again if it dies while we are serving; until it is
        back, its shard counts as down (/healthz)."""
        code = await proc.wait()
        self._app[SHARDS].on_exit(worker_id, proc.pid)
        if self._stopping:
            return
        log.error("worker_exited worker=%d code=%s: restarting", worker_id, code)
        delay = RESTART_DELAY_SECS
        while True:
            await asyncio.sleep(delay)
            # Under the lock, so a stop cannot miss a worker started meanwhile.
            async with self._spawn_lock:
                if self._stopping:
                    return
                try:
                    self._restarting.add(worker_id)
                    await self._spawn(worker_id)
                    return
                except OSError as exc:  # out of processes or descriptors: try again
                    log.error("worker_start_failed worker=%d error=%s", worker_id, exc)
            delay = min(delay * 2, MAX_RESTART_DELAY_SECS)

    def _on_hello(self, worker_id: int) -> None:
        self._app[SHARDS].on_hello(worker_id)
        event = self._ready.get(worker_id)
        if event is not None:
            event.set()
        if worker_id in self._restarting:
            self._restarting.discard(worker_id)
            log.info("worker_restarted worker=%d", worker_id)
        log.debug("worker_ready worker=%d", worker_id)

    def _on_report(self, report: Report) -> None:
        app = self._app
        apply_report(report, app[SHARDS], app[DEVICES], app[METRICS])

    def _on_drained(self, worker_id: int) -> None:
        event = self._drained.get(worker_id)
        if event is not None:
            event.set()

    def _on_reloaded(self, worker_id: int) -> None:
        event = self._reloaded.get(worker_id)
        if event is not None:
            event.set()

    async def reload(self) -> None:
        """SIGHUP every worker and wait until each has applied the new config."""
        self._reloaded = {
            worker_id: asyncio.Event()
            for worker_id, proc in self._procs.items()
            if proc.returncode is None
        }
        self.signal(signal.SIGHUP)
        try:
            async with asyncio.timeout(READY_TIMEOUT_SECS):
                for event in self._reloaded.values():
                    await event.wait()
        except TimeoutError:
            log.error("workers_did_not_reload")

    def signal(self, signum: int) -> None:
        for proc in self._procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signum)

    async def stop(self, timeout_secs: float) -> None:
        """SIGTERM every worker, let them drain, then tell them to close
        storage: only once all have drained, since until then any of them
        may hand over a post of another's shard."""
        self._stopping = True
        self._app[SHARDS].stop()
        async with self._spawn_lock:  # a restart under way finishes first
            pass
        self._drained = {worker_id: asyncio.Event() for worker_id in self._procs}
        self.signal(signal.SIGTERM)
        for sock in self._sockets:
            sock.close()  # ours only: the workers keep their copies until done
        try:
            async with asyncio.timeout(timeout_secs):
                await asyncio.gather(
                    *(
                        _first_of(self._drained[worker_id].wait(), proc.wait())
                        for worker_id, proc in self._procs.items()
                    )
                )
        except TimeoutError:
            log.error("workers_did_not_drain: closing storage anyway")
        await self._links.tell_close()
        try:
            async with asyncio.timeout(timeout_secs):
                await asyncio.gather(*(proc.wait() for proc in self._procs.values()))
        except TimeoutError:
            log.error("workers_did_not_stop: killing them")
            self.signal(signal.SIGKILL)
            await asyncio.gather(*(proc.wait() for proc in self._procs.values()))
        await self._links.close()

    def cleanup(self) -> None:
        shutil.rmtree(self._runtime, ignore_errors=True)


async def _first_of(*waits: Coroutine[object, object, object]) -> None:
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
