"""Steps shared by the daemon and its worker processes: at start, the open
file limit; at stop, the drain of requests in flight."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource

from aiohttp import web

from ingestd.http.keys import IN_FLIGHT

# The daemon's logger: a drain logs as it did when it lived in daemon.py.
log = logging.getLogger("ingestd")


def raise_open_file_limit() -> None:
    """Every device connection and open device file is a descriptor: use the
    hard limit (systemd's LimitNOFILE=), not the small default soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def drain(runner: web.AppRunner, app: web.Application, timeout_secs: float) -> None:
    """Stop accepting, then let requests in flight finish, bodies included.

    aiohttp's own cleanup stops reading from open connections at once, so a
    device whose body was still arriving would get no answer; wait for the
    handlers first, within the shutdown timeout.
    """
    for site in list(runner.sites):
        await site.stop()
    in_flight = app[IN_FLIGHT]
    if runner.server is not None:
        for connection in runner.server.connections:
            if connection not in in_flight.busy_connections:
                connection.force_close()  # idle keep-alive: nothing to finish
    if in_flight.count:
        log.info("draining requests=%d", in_flight.count)
        try:
            async with asyncio.timeout(timeout_secs):
                await in_flight.wait_idle()
        except TimeoutError:
            log.warning("drain_timeout requests=%d: cancelling them", in_flight.count)
