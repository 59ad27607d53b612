"""The device protocols ingestd serves, in one place.

Everything else (the ingest service and the running config, the config
loader, the file sink and its housekeeping, the reader, the fleet view and
device pages, the metrics, the JetStream codec and export) loops over this
table and reads each protocol's `DeviceProtocol` (`base.py`) rather than
naming protocols. Adding one: write its module (a `DeviceProtocol` with its
config section, route and parser) and list it here.

The table is fixed once the daemon runs: the running config compiles each
protocol's route at load, and no request reads this module. `register` is
for a protocol defined outside the package, such as a test's.
"""

from __future__ import annotations

from typing import Any

from ingestd.protocols.base import NAME, RESERVED_NAMES, DeviceProtocol
from ingestd.protocols.jsonpost import JSON
from ingestd.protocols.wattmon import WATTMON

# By name, in the order the fleet view and /metrics list them.
PROTOCOLS: dict[str, DeviceProtocol[Any]] = {p.name: p for p in (WATTMON, JSON)}


def register(protocol: DeviceProtocol[Any]) -> None:
    """Add a protocol (before the app starts); ValueError for a name taken."""
    if not NAME.fullmatch(protocol.name) or protocol.name in RESERVED_NAMES:
        raise ValueError(f"protocol name {protocol.name!r}: a-z, 0-9, _, not a section's")
    if protocol.name in PROTOCOLS:
        raise ValueError(f"protocol {protocol.name!r} is registered already")
    PROTOCOLS[protocol.name] = protocol


def unregister(name: str) -> None:
    del PROTOCOLS[name]


def match_order() -> list[DeviceProtocol[Any]]:
    """The order a post's path is matched in: catch-alls (JSON) last."""
    return sorted(PROTOCOLS.values(), key=lambda protocol: protocol.catch_all)


def valid_id(protocol: str, device_id: str) -> bool:
    """A device id the sink could have written: no id that passes can name
    a path outside its folder."""
    found = PROTOCOLS.get(protocol)
    return found is not None and found.valid_id(device_id)
