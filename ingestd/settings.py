"""What a protocol module needs to declare its config section, in a leaf.

The loader (`ingestd.config`) builds each registered protocol's `[name]`
section from the protocol's own dataclass, so it imports the protocols;
they import these pieces from here rather than from the loader.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import ClassVar, Literal


class ConfigError(Exception):
    """The config file cannot be used; the message names the key."""


@dataclass(frozen=True, slots=True)
class Access:
    """Who may use an endpoint; empty settings mean everyone."""

    # A shared secret, given as ?token=, as the password (or user) of basic
    # auth in the URL, or as `Authorization: Bearer`. `token_file` keeps it
    # out of the config file.
    token: str = ""
    token_file: str = ""
    allowed_networks: tuple[str, ...] = ()  # CIDR, e.g. "10.20.0.0/16"


@dataclass(frozen=True, slots=True)
class RouteAccess(Access):
    """Who may post to a device route, and how often: the settings every
    protocol's section has. A protocol with settings of its own subclasses it."""

    # Settings of a protocol section that SIGHUP does not apply: the sink
    # opens at start. Every other setting applies on reload.
    RESTART_ONLY: ClassVar[frozenset[str]] = frozenset({"sink"})

    # Where acknowledged records go: the per-device files, a NATS JetStream
    # stream, or both (OK only once every one of them has the record).
    sink: Literal["file", "jetstream", "both"] = "file"
    # Blocks per minute per device (token bucket); 0: no limit.
    rate_limit_per_min: float = 0.0
    rate_limit_burst: int = 10


# The daemon's own paths, never a device's: a POST to one gets 405, and a
# path under the prefix (room for more of the daemon's API) is never a stream.
RESERVED_PATHS = ("/healthz", "/metrics", "/", "/status", "/api/devices")
# The daemon's own API, and one device's page (ingestd.http.device_view).
RESERVED_PREFIXES = ("/api/", "/devices/")


def is_reserved(path: str) -> bool:
    return path in RESERVED_PATHS or path.startswith(RESERVED_PREFIXES)


def check_networks(name: str, values: tuple[str, ...]) -> None:
    for value in values:
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError as exc:
            raise ConfigError(f"{name}: {value!r} is not an address or CIDR network") from exc


def check_positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{name}: must be greater than 0, got {value}")


def read_setting_file(name: str, path: str) -> str:
    """The text of a file a setting names (`token_file`), or ConfigError."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc}") from exc
