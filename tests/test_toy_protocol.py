"""A third device protocol, declared here and registered for the test only,
flows end to end: config section, post (fast path and aiohttp), stored file,
fleet view, device page, metrics, JetStream framing. Nothing in the package
names it: what it needs it declares in its `DeviceProtocol`."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from ingestd.config import (
    Config,
    ConfigError,
    changed_settings,
    is_reloadable,
    keep_restart_only,
    load_config,
    with_overrides,
)
from ingestd.errors import BlockTooLarge, IngestError, ProtocolError
from ingestd.protocols.base import RESERVED_NAMES, DeviceProtocol, Route, StoredAs
from ingestd.protocols.registry import PROTOCOLS, register, unregister
from ingestd.records import Record
from ingestd.settings import RouteAccess, check_positive
from ingestd.sinks.jetstream import codec

# -- the toy protocol: text lines posted to /lines/<device> ------------------------

PREFIX = "/lines/"
DEVICE = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")


@dataclass(frozen=True, slots=True)
class LinesConfig(RouteAccess):
    max_lines: int = 100


class BadLinesDevice(ProtocolError):
    code = "bad_device"


def _validate(section: LinesConfig) -> None:
    check_positive("lines.max_lines", section.max_lines)


class LinesRoute(Route):
    __slots__ = ("_max_lines",)
    path_names_device = True

    def __init__(self, section: LinesConfig) -> None:
        self._max_lines = section.max_lines

    def matches(self, path: str) -> bool:
        return path.startswith(PREFIX)

    def device_from_path(self, path: str) -> str:
        device = path[len(PREFIX) :]
        if not DEVICE.fullmatch(device):
            raise BadLinesDevice("device name: 1-32 of a-z 0-9 -")
        return device

    def parse(
        self,
        body: bytes,
        content_type: str,
        path: str,
        remote: str,
        idempotency_key: str | None,
        now: float,
    ) -> Record | None:
        device = self.device_from_path(path)
        lines = [line for line in body.splitlines() if line.strip()]
        if len(lines) > self._max_lines:
            raise BlockTooLarge(f"more than {self._max_lines} lines")
        if not lines:
            return None
        return Record("lines", device, now, b"\n".join(lines) + b"\n", count=len(lines))

    def refused_device(self, exc: IngestError, path: str) -> str | None:
        return self.device_from_path(path)


LINES = DeviceProtocol(
    name="lines",
    ext="txt",
    device_id=DEVICE,
    stored_as=StoredAs.TEXT,
    content_type="text/plain; charset=utf-8",
    id_description="a line device's name",
    section=LinesConfig,
    route=LinesRoute,
    validate=_validate,
)


@pytest.fixture
def lines_protocol() -> Iterator[DeviceProtocol[LinesConfig]]:
    register(LINES)
    try:
        yield LINES
    finally:
        unregister(LINES.name)


def write_config(tmp_path: Path, lines_section: str) -> Path:
    path = tmp_path / "ingestd.toml"
    path.write_text(f'[storage]\ndata_dir = "{tmp_path / "data"}"\n\n[lines]\n{lines_section}')
    return path


async def chunks(body: bytes) -> AsyncIterator[bytes]:
    yield body[:3]
    yield body[3:]


# -- end to end ----------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["fast path", "aiohttp"])
async def test_a_registered_protocol_flows_from_post_to_file_to_fleet_view(
    lines_protocol: DeviceProtocol[LinesConfig],
    start_client: Callable[..., Any],
    tmp_path: Path,
    transport: str,
) -> None:
    config = await asyncio.to_thread(load_config, write_config(tmp_path, "max_lines = 3\n"))
    assert config.section("lines") == LinesConfig(max_lines=3)
    client: TestClient = await start_client(config)

    body = b"first\r\nsecond\n\n"
    data = body if transport == "fast path" else chunks(body)  # chunked: aiohttp's
    async with client.post("/lines/dev-1", data=data) as resp:
        assert (resp.status, await resp.text()) == (200, "OK")
        assert (resp.headers["Server"] == "ingestd") == (transport == "fast path")
    async with client.post("/lines/dev-1", data=b"1\n2\n3\n4\n") as resp:
        assert resp.status == 413
        assert (await resp.text()).startswith("ERROR: ")

    folder = tmp_path / "data" / "lines" / "dev-1"
    [stored] = sorted(folder.glob("*.txt"))
    assert stored.name == "2026-11-21.txt"  # the fake clock's day
    assert stored.read_bytes() == b"first\nsecond\n"
    assert not (tmp_path / "data" / "json").exists()  # not taken for a JSON stream

    async with client.get("/api/devices", params={"protocol": "lines"}) as resp:
        assert resp.status == 200
        [device] = (await resp.json())["devices"]
    assert device["id"] == "dev-1"
    assert device["protocol"] == "lines"
    assert (device["blocks"], device["rows"]) == (1, 2)
    assert device["current_file"] == "lines/dev-1/2026-11-21.txt"
    assert device["last_error"] == "too_large"

    async with client.get("/api/devices/dev-1", params={"protocol": "lines"}) as resp:
        page = await resp.json()
    assert [(f["name"], f["rows"]) for f in page["files"]] == [("2026-11-21.txt", 2)]
    assert page["formats"] == ["ndjson", "json"]
    async with client.get("/api/devices/dev-1/data", params={"protocol": "lines"}) as resp:
        assert await resp.text() == '{"line":"first"}\n{"line":"second"}\n'
    async with client.get("/api/devices/dev-1/files/2026-11-21.txt?protocol=lines") as resp:
        assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
        assert await resp.read() == b"first\nsecond\n"

    async with client.get("/metrics") as resp:
        metrics = await resp.text()
    assert 'ingestd_requests_total{outcome="stored",protocol="lines"} 1.0' in metrics
    assert 'ingestd_devices_known{protocol="lines"} 1.0' in metrics


async def test_a_stored_device_of_the_protocol_is_found_by_the_start_up_scan(
    lines_protocol: DeviceProtocol[LinesConfig], start_client: Callable[..., Any], tmp_path: Path
) -> None:
    folder = tmp_path / "data" / "lines" / "dev-2"
    folder.mkdir(parents=True)
    (folder / "2026-11-20.txt").write_bytes(b"older\n")
    config = await asyncio.to_thread(load_config, write_config(tmp_path, ""))
    client: TestClient = await start_client(config)
    async with client.get("/api/devices") as resp:
        document = await resp.json()
    assert document["summary"]["scan"] in ("running", "done")
    while document["summary"]["scan"] == "running":
        async with client.get("/api/devices") as resp:
            document = await resp.json()
    assert [(d["protocol"], d["id"]) for d in document["devices"]] == [("lines", "dev-2")]


# -- its config section ------------------------------------------------------------------


def test_its_config_section_is_typed_checked_and_reloadable(
    lines_protocol: DeviceProtocol[LinesConfig], tmp_path: Path
) -> None:
    assert load_config(write_config(tmp_path, "")).section("lines") == LinesConfig()
    with pytest.raises(ConfigError, match=r"lines\.max_lines: expected int"):
        load_config(write_config(tmp_path, 'max_lines = "many"\n'))
    with pytest.raises(ConfigError, match=r"unknown key lines\.nope"):
        load_config(write_config(tmp_path, "nope = 1\n"))
    with pytest.raises(ConfigError, match=r"lines\.max_lines: must be greater than 0"):
        load_config(write_config(tmp_path, "max_lines = 0\n"))
    with pytest.raises(ConfigError, match=r"lines\.rate_limit_burst: must be greater than 0"):
        load_config(write_config(tmp_path, "rate_limit_burst = 0\n"))
    assert is_reloadable("lines.max_lines")
    assert not is_reloadable("lines.sink")


def test_its_section_is_kept_through_overrides_and_reloads(
    lines_protocol: DeviceProtocol[LinesConfig], tmp_path: Path
) -> None:
    old = load_config(write_config(tmp_path, "max_lines = 3\n"))
    overridden = with_overrides(old, listen="127.0.0.1:0", data_dir=None)
    assert overridden.section("lines") == LinesConfig(max_lines=3)
    new = load_config(write_config(tmp_path, 'max_lines = 5\nsink = "jetstream"\n'))
    assert changed_settings(old, new) == ["lines.sink", "lines.max_lines"]
    # SIGHUP applies max_lines; the sink waits for a restart.
    assert keep_restart_only(old, new).section("lines") == LinesConfig(max_lines=5)


def test_unregistered_its_section_is_refused_and_its_path_is_a_json_stream(
    tmp_path: Path,
) -> None:
    """Without the registration nothing of it works: the test above depends on it."""
    with pytest.raises(ConfigError, match="unknown key lines"):
        load_config(write_config(tmp_path, "max_lines = 3\n"))
    assert "lines" not in PROTOCOLS


async def test_unregistered_a_post_to_its_path_is_a_json_document(
    start_client: Callable[..., Any], tmp_path: Path
) -> None:
    client: TestClient = await start_client()
    async with client.post("/lines/dev-1", data=b"first\n") as resp:
        assert resp.status == 400  # not JSON
    assert not (tmp_path / "data" / "lines").exists()


def test_a_protocol_cannot_take_a_name_in_use() -> None:
    for name in ("wattmon", "server", "quarantine", "Lines", ""):
        with pytest.raises(ValueError, match="protocol"):
            register(dataclasses.replace(LINES, name=name))
    # The config's other sections are all reserved.
    others = {f.name for f in dataclasses.fields(Config)} - set(PROTOCOLS)
    assert others <= RESERVED_NAMES


# -- JetStream -----------------------------------------------------------------------


def test_its_records_travel_through_jetstream_and_back(
    lines_protocol: DeviceProtocol[LinesConfig],
) -> None:
    record = Record("lines", "dev-1", 1_795_248_000.25, b"a\nb\n", count=2)
    subject, headers, body = codec.message(record, "ingestd")
    assert subject == "ingestd.lines.dev-1"
    assert codec.record_from(headers, body) == dataclasses.replace(
        record, dedup_key=headers[codec.KEY]
    )
    with pytest.raises(ValueError, match="bad device id"):
        codec.record_from({**headers, codec.DEVICE: "../x"}, body)
