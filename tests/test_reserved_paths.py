"""The daemon's own paths are never streams.

`/`, `/status`, `/healthz`, `/metrics` and `/api/devices` answer GET (and
HEAD); any other method gets `405 ERROR: ...` with an Allow header. Nothing
under `/api/` is a stream: an unknown one is `404 ERROR: ...`. Each request is
sent in the fast path's shape and chunked (aiohttp's), on a real server, and
nothing may be stored either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import make_config
from test_fastpath import Answer, chunked, connect, post, read_answer, stored

STATE_PATHS = ["/", "/status", "/healthz", "/metrics", "/api/devices"]
JSON_TYPE = "application/json"


def request(method: str, path: str, shape: str) -> bytes:
    """A request with a small JSON body, Content-Length or chunked."""
    build = post if shape == "fast" else chunked
    return build(path, b'{"a": 1}', JSON_TYPE).replace(b"POST ", f"{method} ".encode(), 1)


async def send(client: Any, data: bytes) -> Answer:
    async with connect(client) as (reader, writer):
        writer.write(data)
        return await read_answer(reader)


@pytest.mark.parametrize("shape", ["fast", "chunked"])
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize("path", [*STATE_PATHS, "/status?x=1"])
async def test_other_methods_on_a_state_path_get_405_and_store_nothing(
    start_client: Any, tmp_path: Path, path: str, method: str, shape: str
) -> None:
    data_dir = tmp_path / "data"
    client = await start_client(make_config(data_dir))
    answer = await send(client, request(method, path, shape))
    assert answer.status == 405, (answer.status, answer.text)
    assert answer.text.startswith("ERROR: "), answer.text
    allowed = {m.strip() for m in answer.headers["allow"].split(",")}
    assert "GET" in allowed and method not in allowed
    await client.close()
    assert not (data_dir / "json").exists(), stored(data_dir)


@pytest.mark.parametrize("shape", ["fast", "chunked"])
@pytest.mark.parametrize("method", ["POST", "GET"])
@pytest.mark.parametrize("path", ["/api/", "/api/streams", "/api/devices/x", "/api/a/b"])
async def test_paths_under_api_are_never_streams(
    start_client: Any, tmp_path: Path, path: str, method: str, shape: str
) -> None:
    data_dir = tmp_path / "data"
    client = await start_client(make_config(data_dir))
    answer = await send(client, request(method, path, shape))
    assert answer.status == 404, (answer.status, answer.text)
    assert answer.text.startswith("ERROR: "), answer.text
    await client.close()
    assert not (data_dir / "json").exists(), stored(data_dir)


@pytest.mark.parametrize("path", STATE_PATHS)
async def test_state_paths_still_answer_get(start_client: Any, tmp_path: Path, path: str) -> None:
    client = await start_client(make_config(tmp_path / "data"))
    response = await client.get(path)
    assert response.status == 200, await response.text()


async def test_paths_beside_the_reserved_ones_are_streams(
    start_client: Any, tmp_path: Path
) -> None:
    """Only the exact paths and the /api/ prefix are reserved: `/statusx`,
    `/api` and `/metrics-site-a` are streams as any other name."""
    data_dir = tmp_path / "data"
    client = await start_client(make_config(data_dir))
    for path in ("/statusx", "/api", "/metrics-site-a", "/healthz2"):
        answer = await send(client, request("POST", path, "fast"))
        assert (answer.status, answer.text) == (200, "OK"), path
    await client.close()
    assert sorted(p.name for p in (data_dir / "json").iterdir()) == [
        "api",
        "healthz2",
        "metrics-site-a",
        "statusx",
    ]
