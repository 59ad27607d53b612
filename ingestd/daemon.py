"""The running daemon: listen, notify systemd, reload on SIGHUP, drain on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import time
from collections.abc import Callable

from aiohttp import web

from ingestd.app import DEVICES, IN_FLIGHT, PIPELINE, SINK, make_app, reload_config
from ingestd.config import Config, ConfigError, parse_listen
from ingestd.systemd import Notifier, listen_sockets
from ingestd.tls import reload_certificate, server_context

log = logging.getLogger("ingestd")

STATUS_INTERVAL_SECS = 5.0


class Daemon:
    def __init__(self, config: Config, load: Callable[[], Config]) -> None:
        """`load` re-reads the config file with the command line applied."""
        self._config = config
        self._load = load
        self._notifier = Notifier()
        self._stop = asyncio.Event()
        self._app = make_app(config)
        self._ssl: ssl.SSLContext | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> int:
        """Serve until SIGTERM or SIGINT, then drain; a second SIGINT exits at once."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_stop_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self._spawn, self._reload)

        config = self._config
        runner = web.AppRunner(
            self._app,
            handle_signals=False,
            access_log=None,
            shutdown_timeout=config.server.shutdown_timeout_secs,
            keepalive_timeout=config.server.keepalive_timeout_secs,
            max_line_size=config.server.max_header_bytes,
            max_field_size=config.server.max_header_bytes,
        )
        try:
            if config.server.tls_cert:
                self._ssl = server_context(config.server.tls_cert, config.server.tls_key)
            await runner.setup()  # opens storage: replays the log after a crash
        except (OSError, ssl.SSLError) as exc:
            log.error("startup_failed error=%s", ascii(str(exc)))
            return 1
        try:
            await self._start_sites(runner)
        except OSError as exc:
            log.error("listen_failed address=%s error=%s", config.server.listen, exc.strerror)
            await runner.cleanup()
            return 1
        for address in runner.addresses:
            log.info(
                "listening address=%s tls=%s data_dir=%s",
                _address(address), "on" if self._ssl else "off", ascii(str(config.data_dir)),
            )
        self._notifier.ready(self._status())
        self._spawn(self._report_status)
        if self._notifier.watchdog_secs:
            self._spawn(self._watchdog)

        await self._stop.wait()
        self._notifier.stopping()
        for task in self._tasks:
            task.cancel()
        await self._drain(runner)
        await runner.cleanup()
        self._notifier.close()
        log.info("stopped: all queued records stored, files closed")
        return 0

    async def _drain(self, runner: web.AppRunner) -> None:
        """Stop accepting, then let requests in flight finish, bodies included.

        aiohttp's own cleanup stops reading from open connections at once, so
        a device whose body was still arriving would get no answer; wait for
        the handlers first, within the shutdown timeout.
        """
        for site in list(runner.sites):
            await site.stop()
        in_flight = self._app[IN_FLIGHT]
        if runner.server is not None:
            for connection in runner.server.connections:
                if connection not in in_flight.busy_connections:
                    connection.force_close()  # idle keep-alive: nothing to finish
        if in_flight.count:
            log.info("draining requests=%d", in_flight.count)
            try:
                async with asyncio.timeout(self._config.server.shutdown_timeout_secs):
                    await in_flight.wait_idle()
            except TimeoutError:
                log.warning("drain_timeout requests=%d: cancelling them", in_flight.count)

    async def _start_sites(self, runner: web.AppRunner) -> None:
        sockets = listen_sockets()
        if sockets:  # socket activation: systemd holds the listening sockets
            for sock in sockets:
                await web.SockSite(runner, sock, ssl_context=self._ssl).start()
            return
        host, port = parse_listen(self._config.server.listen)
        await web.TCPSite(runner, host, port, ssl_context=self._ssl, backlog=2048).start()

    def _on_stop_signal(self, signum: int) -> None:
        if self._stop.is_set() and signum == signal.SIGINT:
            log.error("forced_exit: second SIGINT, queued records are not stored")
            os._exit(1)
        log.info("stopping signal=%s", signal.Signals(signum).name)
        self._stop.set()

    def _spawn(self, job: Callable[[], object]) -> None:
        task = asyncio.ensure_future(job())  # type: ignore[arg-type]
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
                    log.error("reload_refused error=%s: keeping the running config", ascii(str(exc)))
                    return
            changed, needs_restart = reload_config(self._app, new)
            await self._app[SINK].reopen()
            log.info(
                "reloaded changed=%s needs_restart=%s",
                ",".join(changed) or "-", ",".join(needs_restart) or "-",
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


def _address(address: object) -> str:
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address)

