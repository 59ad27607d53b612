"""The fast path (ingestd.http.fastpath) against a real server on an ephemeral port.

Raw sockets, so the tests choose the exact bytes and see every answer on the
connection. The `Server` header tells which path answered: `ingestd` for the
fast path, `Python/... aiohttp/...` for aiohttp's. Records go through the real
pipeline and file sink under tmp_path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from conftest import FastTestServer, make_config, wattmon_form

from ingestd.http.app import make_app
from ingestd.http.keys import IN_FLIGHT

MAC = "00:1A:2b:3c:4D:5e"
DEVICE = "001a2b3c4d5e"
OTHER_MAC = "66:77:88:99:aa:bb"
BLOCK = "Time,V,I\r\n2026-11-21 08:00:00,230.1,1.5\r\n2026-11-21 08:01:00,230.2,1.6\r\n"
STORED_BLOCK = b"Time,V,I\n2026-11-21 08:00:00,230.1,1.5\n2026-11-21 08:01:00,230.2,1.6\n"
FORM_TYPE = "application/x-www-form-urlencoded"
JSON_TYPE = "application/json"
FAST = "ingestd"
# Short enough to keep the file fast, long enough for a loaded machine.
TIMEOUT = 0.4


# -- requests as bytes ------------------------------------------------------------


def post(
    path: str,
    body: bytes | str,
    content_type: str = FORM_TYPE,
    *,
    version: str = "HTTP/1.1",
    headers: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """A device post in the fast path's shape: a Content-Length and the body."""
    raw = body.encode() if isinstance(body, str) else body
    lines = [f"POST {path} {version}", "Host: collector", f"Content-Type: {content_type}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append(f"Content-Length: {len(raw)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + raw


def chunked(
    path: str,
    body: bytes | str,
    content_type: str = FORM_TYPE,
    *,
    headers: tuple[tuple[str, str], ...] = (),
) -> bytes:
    """The same post with `Transfer-Encoding: chunked`: aiohttp's to answer."""
    raw = body.encode() if isinstance(body, str) else body
    lines = ["POST " + path + " HTTP/1.1", "Host: collector", f"Content-Type: {content_type}"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append("Transfer-Encoding: chunked")
    out = ("\r\n".join(lines) + "\r\n\r\n").encode()
    # Two chunks when there is something to split: a real chunked body.
    half = len(raw) // 2
    for piece in (raw[:half], raw[half:]):
        if piece:
            out += b"%x\r\n" % len(piece) + piece + b"\r\n"
    return out + b"0\r\n\r\n"


def get(path: str, *, close: bool = False) -> bytes:
    extra = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: collector\r\n{extra}\r\n".encode()


# -- answers read off a connection ----------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names, first value
    body: bytes
    all_headers: list[tuple[str, str]] = field(default_factory=list)

    @property
    def server(self) -> str:
        return self.headers.get("server", "")

    @property
    def text(self) -> str:
        return self.body.decode()


async def read_answer(reader: asyncio.StreamReader, *, skip_interim: bool = True) -> Answer:
    """One response: status line, fields, a Content-Length body (or to EOF)."""
    async with asyncio.timeout(5):
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head[:-4].decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ")[1])
            pairs = []
            for line in lines[1:]:
                name, _, value = line.partition(":")
                pairs.append((name.strip().lower(), value.strip()))
            if not (skip_interim and 100 <= status < 200):
                break
        headers: dict[str, str] = {}
        for name, value in pairs:
            headers.setdefault(name, value)
        if 100 <= status < 200:
            body = b""
        elif "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        else:
            body = await reader.read()
    return Answer(status, headers, body, pairs)


async def closed_by_server(reader: asyncio.StreamReader, within: float = 5.0) -> bool:
    """True once the server closes the connection (EOF or reset) within `within`."""
    try:
        async with asyncio.timeout(within):
            return await reader.read(65536) == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


@contextlib.asynccontextmanager
async def connect(client: Any):
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def exchange(client: Any, data: bytes, answers: int = 1) -> list[Answer]:
    """Write `data` on a fresh connection and read `answers` answers."""
    async with connect(client) as (reader, writer):
        writer.write(data)
        await writer.drain()
        return [await read_answer(reader) for _ in range(answers)]


# -- what is on disk --------------------------------------------------------------


def stored(data_dir: Path) -> dict[str, bytes]:
    """Every file the sink keeps for devices (not its own write-ahead log)."""
    if not data_dir.exists():
        return {}
    return {
        str(p.relative_to(data_dir)): p.read_bytes()
        for p in sorted(data_dir.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def wattmon_file(data_dir: Path, device: str = DEVICE) -> Path:
    return data_dir / "wattmon" / device / "2026-11-21.csv"


def json_file(data_dir: Path, stream: str) -> Path:
    return data_dir / "json" / stream / "2026-11-21.jsonl"


def json_bodies(data_dir: Path, stream: str) -> list[Any]:
    path = json_file(data_dir, stream)
    if not path.exists():
        return []
    return [json.loads(line)["body"] for line in path.read_text().splitlines()]


# -- the fast path answers device posts -------------------------------------------


async def test_wattmon_post_is_answered_by_the_fast_path_and_stored(client, tmp_path):
    """A Wattmon form post in the plain shape gets exactly `OK` from the fast
    path (`Server: ingestd`) and its block is in the device's file."""
    [answer] = await exchange(client, post("/wattmon", wattmon_form(MAC, BLOCK)))
    assert (answer.status, answer.body, answer.server) == (200, b"OK", FAST)
    assert answer.headers["content-type"] == "text/plain; charset=utf-8"
    assert wattmon_file(tmp_path / "data").read_bytes() == STORED_BLOCK


async def test_json_post_is_answered_by_the_fast_path_and_stored(client, tmp_path):
    """A JSON document gets `OK` from the fast path and is stored as one line
    with the client's address and the (fake) clock's time."""
    doc = {"interfaces": [{"name": "eth0", "rx": 1}]}
    [answer] = await exchange(client, post("/mm-1/ifstats", json.dumps(doc), JSON_TYPE))
    assert (answer.status, answer.body, answer.server) == (200, b"OK", FAST)
    [line] = json_file(tmp_path / "data", "mm-1_ifstats").read_text().splitlines()
    assert json.loads(line) == {
        "received_at": "2026-11-21T08:00:00.000Z",
        "remote": "127.0.0.1",
        "path": "/mm-1/ifstats",
        "body": doc,
    }


async def test_state_request_hands_the_connection_to_aiohttp_which_keeps_serving_posts(
    client, tmp_path
):
    """On one keep-alive connection: a post answered by the fast path, then
    `GET /healthz` answered by aiohttp, then another post still answered (by
    aiohttp now, the connection being its for good) and stored."""
    data = tmp_path / "data"
    async with connect(client) as (reader, writer):
        writer.write(post("/stream-a", b'{"n": 1}', JSON_TYPE))
        first = await read_answer(reader)
        assert (first.status, first.body, first.server) == (200, b"OK", FAST)

        writer.write(get("/healthz"))
        health = await read_answer(reader)
        assert (health.status, health.body) == (200, b"OK")
        assert "aiohttp" in health.server

        writer.write(post("/stream-a", b'{"n": 2}', JSON_TYPE))
        second = await read_answer(reader)
        assert (second.status, second.body) == (200, b"OK")
        assert "aiohttp" in second.server
    assert json_bodies(data, "stream-a") == [{"n": 1}, {"n": 2}]


async def test_post_after_a_state_request_is_served_by_aiohttp(client, tmp_path):
    """A connection that starts with a GET is aiohttp's: a post after it is
    answered by aiohttp and stored."""
    async with connect(client) as (reader, writer):
        writer.write(get("/healthz") + post("/wattmon", wattmon_form(MAC, BLOCK)))
        health, answer = await read_answer(reader), await read_answer(reader)
    assert (health.status, "aiohttp" in health.server) == (200, True)
    assert (answer.status, answer.body, "aiohttp" in answer.server) == (200, b"OK", True)
    assert wattmon_file(tmp_path / "data").read_bytes() == STORED_BLOCK


@pytest.mark.parametrize("count", [2, 20])
async def test_pipelined_posts_are_answered_in_order_and_stored_once(client, tmp_path, count):
    """Posts written in one go are answered one by one in the order sent (every
    third is a bad document, so the statuses show the order) and each good
    one is stored exactly once, in order."""
    docs = [b'{"i": %d}' % i if i % 3 != 1 else b"{bad %d" % i for i in range(count)]
    data = b"".join(post("/pipe", doc, JSON_TYPE) for doc in docs)
    answers = await exchange(client, data, answers=count)
    assert [a.status for a in answers] == [400 if i % 3 == 1 else 200 for i in range(count)]
    assert {a.server for a in answers} == {FAST}
    assert all(a.text.startswith("ERROR: ") for a in answers if a.status == 400)
    assert json_bodies(tmp_path / "data", "pipe") == [{"i": i} for i in range(count) if i % 3 != 1]


async def test_pipelined_posts_past_the_read_buffer_limit_are_all_served(client, tmp_path):
    """Over 256 KiB of pipelined posts (the fast path stops reading while it
    stores, then resumes): every post is answered, in order, and stored once."""
    count = 300
    pad = "p" * 1000
    data = b"".join(
        post("/many", json.dumps({"i": i, "pad": pad}), JSON_TYPE) for i in range(count)
    )
    assert len(data) > 256 * 1024
    async with connect(client) as (reader, writer):
        writer.write(data)  # buffered by asyncio: the answers are read meanwhile
        got = []
        async with asyncio.timeout(20):
            while len(got) < count:
                got.append(await read_answer(reader))
        await writer.drain()
    assert {(a.status, a.body, a.server) for a in got} == {(200, b"OK", FAST)}
    assert [body["i"] for body in json_bodies(tmp_path / "data", "many")] == list(range(count))


async def test_pipelined_post_then_chunked_post_are_both_answered_and_stored(client, tmp_path):
    """A fast post followed, in the same write, by a chunked one: the first is
    answered by the fast path, the second handed (with its bytes) to aiohttp;
    both are stored once, in order."""
    data = post("/mixed", b'{"n": 1}', JSON_TYPE) + chunked("/mixed", b'{"n": 2}', JSON_TYPE)
    first, second = await exchange(client, data, answers=2)
    assert (first.status, first.server) == (200, FAST)
    assert (second.status, second.body) == (200, b"OK")
    assert "aiohttp" in second.server
    assert json_bodies(tmp_path / "data", "mixed") == [{"n": 1}, {"n": 2}]


async def test_body_in_small_writes_with_pauses_is_stored_once(client, tmp_path):
    """A request trickling in (head and body cut in small pieces, with pauses)
    is put together, answered OK once and stored once."""
    data = post("/wattmon", wattmon_form(MAC, BLOCK))
    async with connect(client) as (reader, writer):
        for start in range(0, len(data), 17):
            writer.write(data[start : start + 17])
            await writer.drain()
            await asyncio.sleep(0.005)
        answer = await read_answer(reader)
        assert (answer.status, answer.body, answer.server) == (200, b"OK", FAST)
        # Nothing more comes: one answer for one request.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await reader.read(1)
    assert wattmon_file(tmp_path / "data").read_bytes() == STORED_BLOCK


async def test_chunked_post_is_handed_to_aiohttp_and_stored(client, tmp_path):
    """Transfer-Encoding is not the fast path's shape: aiohttp answers it and
    the block is stored all the same."""
    [answer] = await exchange(client, chunked("/wattmon", wattmon_form(MAC, BLOCK)))
    assert (answer.status, answer.body) == (200, b"OK")
    assert "aiohttp" in answer.server
    assert wattmon_file(tmp_path / "data").read_bytes() == STORED_BLOCK


async def test_expect_100_continue_post_is_handed_to_aiohttp_and_stored(client, tmp_path):
    """`Expect: 100-continue`: aiohttp sends `100 Continue` before the body is
    sent, then answers OK; the block is stored."""
    form = wattmon_form(MAC, BLOCK).encode()
    request = post("/wattmon", form, headers=(("Expect", "100-continue"),))
    head = request[: -len(form)]
    async with connect(client) as (reader, writer):
        writer.write(head)
        interim = await read_answer(reader, skip_interim=False)
        assert interim.status == 100
        writer.write(form)
        answer = await read_answer(reader)
    assert (answer.status, answer.body) == (200, b"OK")
    assert "aiohttp" in answer.server
    assert wattmon_file(tmp_path / "data").read_bytes() == STORED_BLOCK


async def test_body_over_the_inline_size_is_handed_to_aiohttp_and_stored(client, tmp_path):
    """A body over 64 KiB (parsed off the loop by aiohttp's path) is handed
    over and still stored."""
    doc = json.dumps({"pad": "x" * 70_000}).encode()
    [answer] = await exchange(client, post("/big", doc, JSON_TYPE))
    assert (answer.status, answer.body) == (200, b"OK")
    assert "aiohttp" in answer.server
    assert json_bodies(tmp_path / "data", "big") == [{"pad": "x" * 70_000}]


# -- both paths answer alike --------------------------------------------------------


@dataclass(frozen=True)
class Req:
    path: str
    body: str
    content_type: str = FORM_TYPE
    headers: tuple[tuple[str, str], ...] = ()


def block(minute: int) -> str:
    return f"Time,V\n2026-11-21 08:{minute:02d}:00,{minute}\n"


TOKEN = "s3cret-token"

# name -> (config settings, the requests sent one after the other)
EQUIVALENCE: dict[str, tuple[dict[str, Any], list[Req]]] = {
    "good-block": ({}, [Req("/wattmon", wattmon_form(MAC, BLOCK))]),
    "good-block-resent": ({}, [Req("/wattmon", wattmon_form(MAC, BLOCK))] * 2),
    "bad-md5": ({}, [Req("/wattmon", wattmon_form(MAC, BLOCK, md5="0" * 32))]),
    "missing-key": ({}, [Req("/wattmon", wattmon_form(MAC, BLOCK).split("&", 1)[1])]),
    "key-not-a-mac": ({}, [Req("/wattmon", wattmon_form("not-a-mac", BLOCK))]),
    "empty-data": ({}, [Req("/wattmon", wattmon_form(MAC, ""))]),
    "no-body": ({}, [Req("/wattmon", "")]),
    "json-content-type-on-wattmon": ({}, [Req("/wattmon", '{"key": "x"}', JSON_TYPE)]),
    "unauthorized": ({"wattmon": {"token": TOKEN}}, [Req("/wattmon", wattmon_form(MAC, BLOCK))]),
    "wrong-token": (
        {"wattmon": {"token": TOKEN}},
        [Req("/wattmon", wattmon_form(MAC, BLOCK), headers=(("Authorization", "Bearer nope"),))],
    ),
    "token-in-query": (
        {"wattmon": {"token": TOKEN}},
        [Req(f"/wattmon?token={TOKEN}", wattmon_form(MAC, BLOCK))],
    ),
    "token-as-bearer": (
        {"wattmon": {"token": TOKEN}},
        [
            Req(
                "/wattmon",
                wattmon_form(MAC, BLOCK),
                headers=(("Authorization", f"Bearer {TOKEN}"),),
            )
        ],
    ),
    "rate-limited": (
        {"wattmon": {"rate_limit_per_min": 1.0, "rate_limit_burst": 1}},
        [
            Req("/wattmon", wattmon_form(MAC, block(1))),
            Req("/wattmon", wattmon_form(MAC, block(2))),
        ],
    ),
    "device-not-allowed": (
        {"wattmon": {"allowed_macs": (OTHER_MAC,)}},
        [
            Req("/wattmon", wattmon_form(MAC, BLOCK)),
            Req("/wattmon", wattmon_form(OTHER_MAC, BLOCK)),
        ],
    ),
    "empty-data-device-not-allowed": (
        {"wattmon": {"allowed_macs": (OTHER_MAC,)}},
        [Req("/wattmon", wattmon_form(MAC, "")), Req("/wattmon", wattmon_form(OTHER_MAC, ""))],
    ),
    "wattmon-path-with-a-trailing-slash": (
        {},
        [Req("/wattmon/", wattmon_form(MAC, BLOCK)), Req("/export-script.php/", "key=x")],
    ),
    "network-not-allowed": (
        {"wattmon": {"allowed_networks": ("10.0.0.0/8",)}},
        [Req("/wattmon", wattmon_form(MAC, BLOCK))],
    ),
    "forwarded-for-lines-behind-a-trusted-proxy": (
        {"server": {"trusted_proxies": ("127.0.0.0/8",)}},
        [
            Req(
                "/stream-x",
                "[1]",
                JSON_TYPE,
                (("X-Forwarded-For", "198.51.100.7"), ("X-Forwarded-For", "203.0.113.9")),
            )
        ],
    ),
    "json-good": ({}, [Req("/stream-x", '{"a": [1, 2, {"b": null}]}', JSON_TYPE)]),
    "json-bad-document": ({}, [Req("/stream-x", '{"a": ', JSON_TYPE)]),
    "json-bad-stream-name": ({}, [Req("/" + "a" * 129, "{}", JSON_TYPE)]),
    "json-idempotency-key-twice": (
        {},
        [Req("/stream-x", '{"a": 1}', JSON_TYPE, (("Idempotency-Key", "k-1"),))] * 2,
    ),
    "json-no-idempotency-key-twice": ({}, [Req("/stream-x", '{"a": 1}', JSON_TYPE)] * 2),
}


@pytest.mark.parametrize(("settings", "requests"), EQUIVALENCE.values(), ids=EQUIVALENCE.keys())
async def test_fast_path_and_aiohttp_answer_alike(start_client, tmp_path, settings, requests):
    """Each request sequence, sent once in the fast shape (answered by the fast
    path) and once chunked (answered by aiohttp) to a fresh server each: the
    same statuses, bodies, Content-Type, Retry-After and WWW-Authenticate, and
    the same bytes stored."""
    outcomes = {}
    for shape, build in (("fast", post), ("aiohttp", chunked)):
        data_dir = tmp_path / shape
        client = await start_client(make_config(data_dir, **settings))
        seen = []
        async with connect(client) as (reader, writer):
            for req in requests:
                writer.write(build(req.path, req.body, req.content_type, headers=req.headers))
                answer = await read_answer(reader)
                if shape == "fast":
                    assert answer.server == FAST
                elif shape == "aiohttp":
                    assert "aiohttp" in answer.server
                seen.append(
                    (
                        answer.status,
                        answer.text,
                        answer.headers.get("content-type"),
                        answer.headers.get("retry-after"),
                        answer.headers.get("www-authenticate"),
                    )
                )
        await client.close()
        outcomes[shape] = (seen, stored(data_dir))
    assert outcomes["fast"] == outcomes["aiohttp"]


async def test_equivalence_cases_mean_what_they_say(start_client, tmp_path):
    """The equivalence table is not vacuous: its cases get the answers their
    names say (OK, 400, 401 with WWW-Authenticate, 403, 429 with Retry-After)."""
    expected = {
        "good-block": [200],
        "bad-md5": [400],
        "missing-key": [400],
        "key-not-a-mac": [400],
        "empty-data": [200],
        "unauthorized": [401],
        "token-in-query": [200],
        "rate-limited": [200, 429],
        "device-not-allowed": [403, 200],
        "empty-data-device-not-allowed": [403, 200],
        "wattmon-path-with-a-trailing-slash": [200, 400],
        "network-not-allowed": [403],
        "forwarded-for-lines-behind-a-trusted-proxy": [200],
        "json-bad-document": [400],
        "json-idempotency-key-twice": [200, 200],
    }
    for name, statuses in expected.items():
        settings, requests = EQUIVALENCE[name]
        data_dir = tmp_path / name
        client = await start_client(make_config(data_dir, **settings))
        async with connect(client) as (reader, writer):
            got = []
            for req in requests:
                writer.write(post(req.path, req.body, req.content_type, headers=req.headers))
                got.append(await read_answer(reader))
        await client.close()
        assert [a.status for a in got] == statuses, name
        if name == "unauthorized":
            assert got[0].headers["www-authenticate"] == 'Basic realm="ingestd"'
        if name == "rate-limited":
            assert int(got[1].headers["retry-after"]) >= 1
        if name == "json-idempotency-key-twice":
            assert len(json_bodies(data_dir, "stream-x")) == 1
        if name == "wattmon-path-with-a-trailing-slash":
            assert wattmon_file(data_dir).read_bytes() == STORED_BLOCK
            assert got[1].text.startswith("ERROR") and "MAC" in got[1].text
            assert not (data_dir / "json").exists()
        if name == "forwarded-for-lines-behind-a-trusted-proxy":
            line = json_file(data_dir, "stream-x").read_text()
            assert json.loads(line)["remote"] == "203.0.113.9"


# -- connection handling ----------------------------------------------------------


async def test_http10_post_is_answered_then_the_connection_closes(client, tmp_path):
    """HTTP/1.0 without keep-alive: OK with `Connection: close`, then the
    server closes the connection; the block is stored."""
    async with connect(client) as (reader, writer):
        writer.write(post("/wattmon", wattmon_form(MAC, BLOCK), version="HTTP/1.0"))
        answer = await read_answer(reader)
        assert (answer.status, answer.body, answer.server) == (200, b"OK", FAST)
        assert answer.headers.get("connection", "").lower() == "close"
        assert await closed_by_server(reader)
    assert wattmon_file(tmp_path / "data").read_bytes() == STORED_BLOCK


async def test_connection_close_post_is_answered_then_the_connection_closes(client, tmp_path):
    """HTTP/1.1 with `Connection: close`: answered, then closed by the server."""
    request = post("/s", b"[1]", JSON_TYPE, headers=(("Connection", "close"),))
    async with connect(client) as (reader, writer):
        writer.write(request)
        answer = await read_answer(reader)
        assert (answer.status, answer.server) == (200, FAST)
        assert await closed_by_server(reader)
    assert json_bodies(tmp_path / "data", "s") == [[1]]


async def test_http10_keep_alive_post_is_told_the_connection_stays_open(client, tmp_path):
    """HTTP/1.0 with `Connection: keep-alive`: the answer says
    `Connection: keep-alive`, as aiohttp's does, and a second post on the same
    connection is answered."""
    request = post(
        "/s", b"[1]", JSON_TYPE, version="HTTP/1.0", headers=(("Connection", "keep-alive"),)
    )
    async with connect(client) as (reader, writer):
        writer.write(request)
        answer = await read_answer(reader)
        assert answer.status == 200
        assert answer.headers.get("connection", "").lower() == "keep-alive"
        writer.write(request)
        assert (await read_answer(reader)).status == 200


async def test_aiohttp_tells_an_http10_keep_alive_client_the_connection_stays_open(client):
    """The reference for the test above: aiohttp (a chunked-free GET it answers)
    sends `Connection: keep-alive` to an HTTP/1.0 keep-alive client."""
    async with connect(client) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        answer = await read_answer(reader)
    assert "aiohttp" in answer.server
    assert answer.headers.get("connection", "").lower() == "keep-alive"


async def stored_after(client: Any) -> None:
    """Return once a probe post on a fresh connection is stored: the queue is
    first in, first out, so anything submitted before it is on disk too."""
    [probe] = await exchange(client, post("/probe", b"{}", JSON_TYPE))
    assert probe.status == 200


async def test_nothing_after_a_connection_close_request_is_served(client, tmp_path):
    """A request after one that asked to close (here refused at once) on the
    same write is neither answered nor stored, as aiohttp does."""
    refused = post(
        "/wattmon", wattmon_form(MAC, BLOCK, md5="0" * 32), headers=(("Connection", "close"),)
    )
    behind = post("/after-close", b'{"n": 1}', JSON_TYPE)
    async with connect(client) as (reader, writer):
        writer.write(refused + behind)
        answer = await read_answer(reader)
        assert answer.status == 400
        assert await closed_by_server(reader)
    await stored_after(client)
    assert json_bodies(tmp_path / "data", "after-close") == []


async def test_nothing_after_a_stored_connection_close_request_is_served(client, tmp_path):
    """The same, when the first request is stored before its answer: the
    request behind it is not stored and the connection closes."""
    first = post("/first", b'{"n": 1}', JSON_TYPE, headers=(("Connection", "close"),))
    behind = post("/after-close", b'{"n": 2}', JSON_TYPE)
    async with connect(client) as (reader, writer):
        writer.write(first + behind)
        answer = await read_answer(reader)
        assert (answer.status, answer.server) == (200, FAST)
        assert await closed_by_server(reader)
    await stored_after(client)
    assert json_bodies(tmp_path / "data", "first") == [{"n": 1}]
    assert json_bodies(tmp_path / "data", "after-close") == []


# -- slow and vanishing clients -----------------------------------------------------


def slow_config(tmp_path: Path) -> Any:
    return make_config(
        tmp_path / "data",
        server={"keepalive_timeout_secs": TIMEOUT, "body_timeout_secs": TIMEOUT},
    )


async def test_idle_keep_alive_connection_is_closed_by_the_server(start_client, tmp_path):
    """After an answer, a connection that sends nothing more is closed by the
    server within a few multiples of keepalive_timeout_secs."""
    client = await start_client(slow_config(tmp_path))
    async with connect(client) as (reader, writer):
        writer.write(post("/s", b"[1]", JSON_TYPE))
        assert (await read_answer(reader)).server == FAST
        assert await closed_by_server(reader, within=TIMEOUT * 5)


async def test_connection_that_never_sends_is_closed_by_the_server(start_client, tmp_path):
    """A connection opened and left silent is closed by the server too."""
    client = await start_client(slow_config(tmp_path))
    async with connect(client) as (reader, _writer):
        assert await closed_by_server(reader, within=TIMEOUT * 5)


async def test_head_that_trickles_past_the_keep_alive_timeout_is_cut(start_client, tmp_path):
    """A head sent a byte at a time and never finished does not hold the
    connection: the server closes it within a few multiples of
    keepalive_timeout_secs of the connection opening, although bytes keep
    coming."""
    client = await start_client(slow_config(tmp_path))
    async with connect(client) as (reader, writer):
        writer.write(b"POST /s HTTP/1.1\r\nHost: collector\r\nX-Slow: ")
        closed = False
        async with asyncio.timeout(TIMEOUT * 8):
            while not closed:
                with contextlib.suppress(ConnectionError):
                    writer.write(b"a")
                closed = await closed_by_server(reader, within=TIMEOUT / 8)
    assert closed
    assert stored(tmp_path / "data") == {}


async def test_body_that_stops_half_way_gets_408_and_nothing_is_stored(start_client, tmp_path):
    """A body that stops half way: after body_timeout_secs the server answers
    408 `ERROR: ...`, closes the connection, and stores nothing for the device;
    the server still serves the next post."""
    client = await start_client(slow_config(tmp_path))
    request = post("/wattmon", wattmon_form(MAC, BLOCK))
    async with connect(client) as (reader, writer):
        writer.write(request[: len(request) - 20])
        answer = await read_answer(reader)
        assert answer.status == 408
        assert answer.text.startswith("ERROR: ")
        assert await closed_by_server(reader, within=TIMEOUT * 5)
    assert not (tmp_path / "data" / "wattmon" / DEVICE).exists()
    [ok] = await exchange(client, post("/wattmon", wattmon_form(OTHER_MAC, BLOCK)))
    assert (ok.status, ok.body) == (200, b"OK")


@contextlib.asynccontextmanager
async def quick_stop_client(tmp_path: Path, clock: Any):
    """A server whose stop waits at most half a second for requests in flight (the
    default is a minute), for tests that leave a request unfinished."""
    server = FastTestServer(make_app(make_config(tmp_path / "data"), clock=clock))
    await server.start_server(shutdown_timeout=0.5)
    client = TestClient(server)
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


async def leave_half_way(client: Any) -> None:
    """Send a head and half a body, then close the connection."""
    request = post("/wattmon", wattmon_form(MAC, BLOCK))
    async with connect(client) as (_reader, writer):
        writer.write(request[: len(request) - 60])
        await writer.drain()
        await asyncio.sleep(0.05)


async def test_client_leaving_half_way_through_a_body_stores_nothing(tmp_path, clock):
    """A client that closes its connection half way through a body: nothing is
    stored for it, and the server keeps serving other devices."""
    async with quick_stop_client(tmp_path, clock) as client:
        await leave_half_way(client)
        [ok] = await exchange(client, post("/wattmon", wattmon_form(OTHER_MAC, BLOCK)))
        assert (ok.status, ok.body, ok.server) == (200, b"OK", FAST)
    assert not (tmp_path / "data" / "wattmon" / DEVICE).exists()
    assert wattmon_file(tmp_path / "data", "66778899aabb").read_bytes() == STORED_BLOCK


async def test_client_leaving_half_way_through_a_body_is_not_left_in_flight(tmp_path, clock):
    """A client gone mid-body is no longer counted in flight, so a stop does not
    wait for it."""
    async with quick_stop_client(tmp_path, clock) as client:
        await leave_half_way(client)
        in_flight = client.server.app[IN_FLIGHT]
        async with asyncio.timeout(0.5):
            await in_flight.wait_idle()
        assert in_flight.count == 0


async def test_header_too_large_gets_aiohttps_answer(client, tmp_path):
    """A 9000-byte header value is past what the fast path judges: aiohttp
    answers it (a 4xx) and nothing is stored."""
    request = post("/wattmon", wattmon_form(MAC, BLOCK), headers=(("X-Big", "a" * 9000),))
    async with connect(client) as (reader, writer):
        writer.write(request)
        answer = await read_answer(reader)
    assert 400 <= answer.status < 500
    assert "aiohttp" in answer.server
    assert not (tmp_path / "data" / "wattmon" / DEVICE).exists()
