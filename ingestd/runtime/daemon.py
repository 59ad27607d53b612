"""The running daemon: listen, notify systemd, reload on SIGHUP, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import time
from collections.abc import Callable, Coroutine

from aiohttp import web

from ingestd.config import Config, ConfigError, parse_listen
from ingestd.http.app import make_app, reload_config
from ingestd.http.fastpath import make_runner
from ingestd.http.keys import DEVICES, PIPELINE, SINK
from ingestd.runtime.lifecycle import drain, raise_open_file_limit
from ingestd.runtime.logs import flush_logs
from ingestd.runtime.supervisor import WorkerError, WorkerPool, bind
from ingestd.runtime.systemd import Notifier, listen_sockets
from ingestd.runtime.tls import reload_certificate, server_context

log = logging.getLogger("ingestd")

STATUS_INTERVAL_SECS = 5.0


class Daemon:
    def __init__(self, config: Config, load: Callable[[], Config], args: list[str]) -> None:
        """`load` re-reads the config file with the command line applied;
        `args` are those command-line options, for worker processes."""
        self._config = config
        self._load = load
        self._args = args
        self._workers: WorkerPool | None = None
        self._notifier = Notifier()
        self._stop = asyncio.Event()
        self._worker_count = worker_count(config.server.workers, usable_cores())
        shards = self._worker_count if self._worker_count > 1 else None
        self._app = make_app(config, shards=shards)
        self._ssl: ssl.SSLContext | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> int:
        """Serve until SIGTERM or SIGINT, then drain; a second SIGINT exits at once."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_stop_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self._spawn, self._reload)
        raise_open_file_limit()

        config = self._config
        runner = make_runner(self._app, config.server)
        # Every start-up error names its setting and file: check-config has
        # vetted them, but files can change in between.
        if config.server.tls_cert:
            try:
                self._ssl = server_context(config.server.tls_cert, config.server.tls_key)
            except (OSError, ssl.SSLError) as exc:
                log.error(
                    "startup_failed setting=server.tls_cert,server.tls_key cert=%s key=%s error=%s",
                    ascii(config.server.tls_cert),
                    ascii(config.server.tls_key),
                    describe_error(exc),
                )
                return 1
        try:
            # Opens storage (or, with workers, locks the data dir): replays
            # the log after a crash.
            await runner.setup()
        except OSError as exc:
            log.error(
                "startup_failed setting=storage.data_dir data_dir=%s error=%s",
                ascii(str(config.data_dir)),
                describe_error(exc),
            )
            return 1
        try:
            addresses = await self._start_sites(runner)
        except (OSError, WorkerError) as exc:
            log.error(
                "listen_failed address=%s setting=server.listen error=%s",
                config.server.listen,
                describe_error(exc),
            )
            if self._workers is not None:
                await self._workers.stop(5)
                self._workers.cleanup()
            await runner.cleanup()
            return 1
        for address in addresses:
            log.info(
                "listening address=%s tls=%s workers=%d data_dir=%s",
                _address(address),
                "on" if self._ssl else "off",
                self._workers.count if self._workers else 1,
                ascii(str(config.data_dir)),
            )
        self._notifier.ready(self._status())
        self._spawn(self._report_status)
        if self._notifier.watchdog_secs:
            self._spawn(self._watchdog)

        await self._stop.wait()
        self._notifier.stopping()
        for task in self._tasks:
            task.cancel()
        if self._workers is not None:
            await self._workers.stop(self._config.server.shutdown_timeout_secs + 5)
        await drain(runner, self._app, self._config.server.shutdown_timeout_secs)
        await runner.cleanup()
        if self._workers is not None:
            self._workers.cleanup()
        self._notifier.close()
        log.info("stopped: all queued records stored, files closed")
        return 0

    async def _start_sites(self, runner: web.AppRunner) -> list[object]:
        """Listen; return the addresses. With workers, they serve the sockets."""
        sockets = listen_sockets()  # socket activation: systemd holds them
        count = self._worker_count
        if count > 1:
            if not sockets:
                sockets = [bind(self._config.server.listen)]
            self._workers = WorkerPool(self._app, runner, self._args, count)
            await self._workers.start(sockets)
            return [sock.getsockname() for sock in sockets]
        for sock in sockets:
            await web.SockSite(runner, sock, ssl_context=self._ssl).start()
        if not sockets:
            host, port = parse_listen(self._config.server.listen)
            await web.TCPSite(runner, host, port, ssl_context=self._ssl, backlog=2048).start()
        return list(runner.addresses)

    def _on_stop_signal(self, signum: int) -> None:
        if self._stop.is_set() and signum == signal.SIGINT:
            log.error("forced_exit: second SIGINT, queued records are not stored")
            flush_logs()
            os._exit(1)
        log.info("stopping signal=%s", signal.Signals(signum).name)
        self._stop.set()

    def _spawn(self, job: Callable[[], Coroutine[object, object, None]]) -> None:
        task = asyncio.ensure_future(job())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload(self) -> None:
        """SIGHUP: re-read the config, reload the certificate, reopen files."""
        self._notifier.reloading()
        try:
            try:
                new = await asyncio.to_thread(self._load)  # reads files
            except ConfigError as exc:
                log.error("reload_refused error=%s: keeping the running config", ascii(str(exc)))
                return
            if self._ssl is not None and new.server.tls_cert:
                try:
                    reload_certificate(self._ssl, new.server.tls_cert, new.server.tls_key)
                except (OSError, ssl.SSLError) as exc:
                    log.error(
                        "reload_refused error=%s: keeping the running config", ascii(str(exc))
                    )
                    return
            changed, needs_restart = reload_config(self._app, new)
            if SINK in self._app:  # with workers, each reopens its own
                await self._app[SINK].reopen()
            if self._workers is not None:
                await self._workers.reload()
            log.info(
                "reloaded changed=%s needs_restart=%s",
                ",".join(changed) or "-",
                ",".join(needs_restart) or "-",
            )
        finally:
            self._notifier.send("READY=1", f"STATUS={self._status()}")

    async def _watchdog(self) -> None:
        """WATCHDOG=1 at half the interval, only while the writer keeps up."""
        interval = self._notifier.watchdog_secs
        assert interval is not None
        while True:
            if self._app[PIPELINE].making_progress(within_secs=interval):
                self._notifier.watchdog()
            else:
                log.error("writer_stalled: withholding the watchdog ping")
            await asyncio.sleep(interval / 2)

    async def _report_status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL_SECS)
            self._notifier.status(self._status())

    def _status(self) -> str:
        pipeline = self._app[PIPELINE]
        stats = pipeline.stats
        now = time.monotonic()
        rate = self._rate(stats.records_stored, now)
        return (
            f"devices={len(self._app[DEVICES])} records/s={rate:.0f} "
            f"queue={pipeline.depth} storage={'ok' if stats.storage_ok else 'failing'}"
        )

    _last: tuple[float, int] | None = None

    def _rate(self, total: int, now: float) -> float:
        last, self._last = self._last, (now, total)
        if last is None or now <= last[0]:
            return 0.0
        return (total - last[1]) / (now - last[0])


def describe_error(exc: BaseException) -> str:
    """An OSError as its reason and the file it is about, quoted and escaped."""
    if isinstance(exc, OSError) and exc.strerror:
        if exc.filename is not None:
            return ascii(f"{exc.strerror}: {exc.filename}")
        return ascii(exc.strerror)
    return ascii(str(exc))


def _address(address: object) -> str:
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address)


def usable_cores() -> int:
    """The cores this process may run on: its affinity (systemd's
    CPUAffinity=, a container's cpuset, taskset), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def worker_count(configured: int, cores: int) -> int:
    """`server.workers`, with 0 (the default) resolved for this machine.

    One worker per core, a single process on one core. Even on two cores
    shared with the load generator, two workers measured 1.23-1.49x the
    posts/s of one process with 256 or 1,024 posts in flight (as a busy
    fleet on slow links has), and parity within the noise with 64
    (0.85-1.10x across sets; docs/performance.md, "Worker mode by
    concurrency").
    """
    if configured:
        return configured
    return max(1, cores)
