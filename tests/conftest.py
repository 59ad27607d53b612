"""Shared fixtures: a real app on an ephemeral port, storing under tmp_path."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import subprocess
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from blockbuster import BlockBuster, blockbuster_ctx

from ingestd.config import Config, StorageConfig, validate
from ingestd.http.app import make_app
from ingestd.http.fastpath import IngestRunner, make_runner
from ingestd.http.keys import CONFIG


@pytest.fixture(autouse=True)
def blockbuster() -> Iterator[BlockBuster]:
    """Fail any test in which the event loop makes a blocking call."""
    with blockbuster_ctx("ingestd") as bb:
        yield bb


class FakeClock:
    """A clock the test moves by hand (rotation by period)."""

    def __init__(self, now: float = 1_795_248_000.0) -> None:  # 2026-11-21T08:00:00Z
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_config(
    data_dir: Path,
    *,
    server: dict[str, Any] | None = None,
    wattmon: dict[str, Any] | None = None,
    **storage: Any,
) -> Config:
    """A config storing under `data_dir`, with some settings changed."""
    config = Config(storage=StorageConfig(data_dir=str(data_dir), **storage))
    config = dataclasses.replace(
        config,
        server=dataclasses.replace(config.server, **(server or {})),
        wattmon=dataclasses.replace(config.wattmon, **(wattmon or {})),
    )
    return validate(config)


class FastTestServer(TestServer):
    """aiohttp's test server with the daemon's runner, built from the app's
    server settings: device posts take the fast path (ingestd.http.fastpath),
    everything else aiohttp's, as in production."""

    async def _make_runner(self, **kwargs: Any) -> IngestRunner:
        return make_runner(self.app, self.app[CONFIG].current.server, **kwargs)


@pytest.fixture
def start_client(tmp_path: Path, clock: FakeClock) -> Callable[..., Any]:
    """`await start_client(config=None, **storage)` -> a TestClient on a real server."""
    clients: list[TestClient] = []

    async def start(config: Config | None = None, **settings: Any) -> TestClient:
        config = config or make_config(tmp_path / "data", **settings)
        client = TestClient(FastTestServer(make_app(config, clock=clock)))
        await client.start_server()
        clients.append(client)
        return client

    start.clients = clients  # type: ignore[attr-defined]
    return start


@pytest.fixture
async def client(start_client: Callable[..., Any]) -> AsyncIterator[TestClient]:
    client = await start_client()
    yield client
    await client.close()


@pytest.fixture(autouse=True)
async def _close_clients(start_client: Callable[..., Any]) -> AsyncIterator[None]:
    yield
    for client in start_client.clients:
        await client.close()


def wattmon_form(mac: str, data: bytes | str, md5: str | None = "auto") -> str:
    """The urlencoded body a Wattmon device sends."""
    raw = data.encode() if isinstance(data, str) else data
    fields: dict[str, str | bytes] = {"key": mac, "data": raw}
    if md5 == "auto":
        fields["md5sum"] = hashlib.md5(raw).hexdigest()
    elif md5 is not None:
        fields["md5sum"] = md5
    return urllib.parse.urlencode(fields)


FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@contextlib.contextmanager
def small_tmpfs(tmp_path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (e.g. "512k") that a test can fill up; skips the
    test where mounting is not allowed (it needs root)."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
