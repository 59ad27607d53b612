"""What a running app holds besides its storage: the live config (swapped by
SIGHUP) and the requests in flight (which a stop waits for)."""

from __future__ import annotations

import asyncio
from collections import Counter

from ingestd.config import Config
from ingestd.ingest.access import RateLimiter, RoutePolicy, networks
from ingestd.protocols import jsonpost, wattmon


class LiveConfig:
    """The running config and what is compiled from it; SIGHUP swaps both."""

    def __init__(self, config: Config) -> None:
        self.limiters = {
            wattmon.PROTOCOL: RateLimiter(0, 1),
            jsonpost.PROTOCOL: RateLimiter(0, 1),
        }
        self.set(config)

    def set(self, config: Config) -> None:
        self.current = config
        self.trusted_proxies = networks(config.server.trusted_proxies)
        self.policies = {
            wattmon.PROTOCOL: RoutePolicy.of(config.wattmon),
            jsonpost.PROTOCOL: RoutePolicy.of(config.json),
        }
        macs = config.wattmon.allowed_macs
        self.allowed_macs = frozenset(wattmon.normalise_mac(m.encode()) for m in macs) or None
        self.allowed_streams = frozenset(config.json.allowed_streams) or None
        for protocol, section in (
            (wattmon.PROTOCOL, config.wattmon),
            (jsonpost.PROTOCOL, config.json),
        ):
            self.limiters[protocol].configure(section.rate_limit_per_min, section.rate_limit_burst)


class InFlight:
    """Requests being handled, so a stop can wait for them to finish."""

    def __init__(self) -> None:
        self.count = 0
        self.busy_connections: Counter[object] = Counter()
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self, connection: object) -> None:
        self.count += 1
        self.busy_connections[connection] += 1
        self._idle.clear()

    def leave(self, connection: object) -> None:
        self.count -= 1
        self.busy_connections[connection] -= 1
        if self.busy_connections[connection] <= 0:
            del self.busy_connections[connection]
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()
