"""Requests that are not HTTP get a fixed `ERROR: ...` body, echoing nothing.

aiohttp's parser (llhttp) refuses them before any handler runs; its own error
page quoted the offending bytes back. Each request carries a marker in its
bad part; the answer must start with `ERROR: `, must not contain the marker,
and the log must not carry the bytes unescaped (no multi-line traceback of
the client's text). A head with bare LF line ends gets the same answer from
a connection the fast path reads as from one aiohttp already serves.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from conftest import make_config
from test_fastpath import Answer, connect, get, read_answer, stored

MARK = "zq<script>x"

MALFORMED = {
    "bad-header-token": (
        f"POST /s HTTP/1.1\r\nHost: c\r\nBad Header{MARK}: 1\r\nContent-Length: 2\r\n\r\n{{}}"
    ),
    "bad-chunk-size": (
        "POST /s HTTP/1.1\r\nHost: c\r\nTransfer-Encoding: chunked\r\n\r\n"
        f"{MARK}\r\n{{}}\r\n0\r\n\r\n"
    ),
    "bad-method": f"G{MARK}T / HTTP/1.1\r\nHost: c\r\n\r\n",
    "not-http-at-all": f"{MARK}\r\n\r\n",
    "bad-version": f"POST /s HTTP/{MARK}\r\nHost: c\r\nContent-Length: 2\r\n\r\n{{}}",
    "control-char-in-path": (
        f"POST /s\x01{MARK} HTTP/1.1\r\nHost: c\r\nContent-Length: 2\r\n\r\n{{}}"
    ),
    "two-content-lengths": (
        f"POST /s HTTP/1.1\r\nHost: c\r\nContent-Length: 2\r\nContent-Length: 3{MARK}\r\n\r\n{{}}"
    ),
    "content-length-not-a-number": (
        f"POST /s HTTP/1.1\r\nHost: c\r\nContent-Length: {MARK}\r\n\r\n{{}}"
    ),
    "length-and-chunked": (
        "POST /s HTTP/1.1\r\nHost: c\r\nContent-Length: 5\r\n"
        f"Transfer-Encoding: chunked, {MARK}\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n"
    ),
    "bare-lf-head": f"POST /s HTTP/1.1\nHost: c{MARK}\nContent-Length: 2\n\n{{}}",
    "bare-lf-after-request-line": f"POST /s HTTP/1.1\r\nHost: c{MARK}\nContent-Length: 2\n\n{{}}",
    "bare-cr-in-header": f"POST /s HTTP/1.1\r\nHost: c\r{MARK}\r\nContent-Length: 2\r\n\r\n{{}}",
    "header-too-long": (
        f"POST /s HTTP/1.1\r\nHost: c\r\nX-Big: {MARK}{'a' * 9000}\r\nContent-Length: 2\r\n\r\n{{}}"
    ),
    "request-line-too-long": f"POST /{'a' * 9000}{MARK} HTTP/1.1\r\nHost: c\r\n\r\n",
}


async def send(client: Any, data: bytes, *, after: bytes = b"") -> Answer:
    """`data` on a fresh connection, after `after`'s answer if any."""
    async with connect(client) as (reader, writer):
        if after:
            writer.write(after)
            await read_answer(reader)
        writer.write(data)
        return await read_answer(reader)


def assert_fixed_error(answer: Answer) -> None:
    assert 400 <= answer.status < 500, (answer.status, answer.text)
    assert answer.text.startswith("ERROR: "), answer.text
    assert "zq" not in answer.text and "<script>" not in answer.text, answer.text
    assert answer.headers["content-type"].startswith("text/plain"), answer.headers


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
async def test_malformed_request_gets_a_fixed_error_body(
    start_client: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, raw: str
) -> None:
    data_dir = tmp_path / "data"
    client = await start_client(make_config(data_dir))
    with caplog.at_level(logging.DEBUG):
        answer = await send(client, raw.encode("latin-1"))
    assert_fixed_error(answer)
    await client.close()
    assert not (data_dir / "json").exists(), stored(data_dir)
    for record in caplog.records:
        text = record.getMessage()
        assert "\n" not in text and "\r" not in text, (record.name, text)
        assert record.exc_info is None, (record.name, text)  # a traceback quotes the bytes


@pytest.mark.parametrize(
    "raw",
    [
        MALFORMED["bare-lf-head"],
        MALFORMED["bare-lf-after-request-line"],
        MALFORMED["bare-cr-in-header"],
        "GET /healthz HTTP/1.1\nHost: c\n\n",
    ],
    ids=["bare-lf-head", "bare-lf-after-request-line", "bare-cr-in-header", "bare-lf-get"],
)
async def test_bare_line_ends_get_the_same_answer_on_both_paths(
    start_client: Any, tmp_path: Path, raw: str
) -> None:
    """A fresh connection (read by the fast path first) and one that aiohttp
    already serves (it began with a GET) get the same status and body, and
    get it without waiting for a blank line that never comes."""
    client = await start_client(make_config(tmp_path / "data"))
    fresh = await send(client, raw.encode())
    served = await send(client, raw.encode(), after=get("/healthz"))
    assert "aiohttp" in served.server
    assert_fixed_error(fresh)
    assert (fresh.status, fresh.text, fresh.headers["content-type"]) == (
        served.status,
        served.text,
        served.headers["content-type"],
    )


async def test_aiohttp_keeps_the_configured_header_limit(start_client: Any, tmp_path: Path) -> None:
    """The handler aiohttp's connections get is built with the runner's
    settings: `server.max_header_bytes = 1000` refuses a 1500-byte header on a
    chunked post (aiohttp's parser), with the fixed body, and takes a 500-byte one."""
    data_dir = tmp_path / "data"
    client = await start_client(make_config(data_dir, server={"max_header_bytes": 1000}))

    def chunked_post(header: str) -> bytes:
        return (
            "POST /limit HTTP/1.1\r\nHost: c\r\nTransfer-Encoding: chunked\r\n"
            f"X-Pad: {header}\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n"
        ).encode()

    assert_fixed_error(await send(client, chunked_post("a" * 1500)))
    ok = await send(client, chunked_post("a" * 500))
    assert (ok.status, ok.text) == (200, "OK")


# Refused after the head was read, by aiohttp's machinery around the handler:
# the same fixed bodies.
AFTER_THE_HEAD = {
    "unknown-expectation": (
        f"POST /s HTTP/1.1\r\nHost: c\r\nExpect: {MARK}\r\nContent-Length: 2\r\n\r\n{{}}",
        417,
    ),
    "unknown-expectation-on-a-state-path": (
        f"GET /healthz HTTP/1.1\r\nHost: c\r\nExpect: {MARK}\r\n\r\n",
        417,
    ),
    # Decoded as it is read, by the handler: not gzip at all.
    "gzip-body-that-is-not-gzip": (
        "POST /s HTTP/1.1\r\nHost: c\r\nContent-Encoding: gzip\r\nContent-Length: 11\r\n\r\n"
        f"{MARK}",
        400,
    ),
    "deflate-body-that-is-not-deflate": (
        "POST /wattmon HTTP/1.1\r\nHost: c\r\nContent-Encoding: deflate\r\n"
        f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 11\r\n\r\n{MARK}",
        400,
    ),
}


@pytest.mark.parametrize(("raw", "status"), AFTER_THE_HEAD.values(), ids=AFTER_THE_HEAD.keys())
async def test_refusals_around_the_handler_get_a_fixed_error_body(
    start_client: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, raw: str, status: int
) -> None:
    data_dir = tmp_path / "data"
    client = await start_client(make_config(data_dir))
    with caplog.at_level(logging.DEBUG):
        answer = await send(client, raw.encode())
    assert answer.status == status, answer.text
    assert_fixed_error(answer)
    await client.close()
    assert not (data_dir / "json").exists() and not (data_dir / "wattmon").exists()
    assert all(r.exc_info is None for r in caplog.records), [r.getMessage() for r in caplog.records]


async def test_bad_body_gets_the_same_answer_as_a_bad_head(
    start_client: Any, tmp_path: Path
) -> None:
    """A chunk size refused while the head is parsed and a body refused while
    the handler reads it are the same mistake: the same answer, and the
    connection closes (what follows it cannot be told apart)."""
    client = await start_client(make_config(tmp_path / "data"))
    head_error = await send(client, MALFORMED["bad-chunk-size"].encode())
    body_error = await send(client, AFTER_THE_HEAD["gzip-body-that-is-not-gzip"][0].encode())
    assert (head_error.status, head_error.text) == (body_error.status, body_error.text)
    assert body_error.headers["connection"].lower() == "close"


async def test_expect_100_continue_still_gets_100_continue(
    start_client: Any, tmp_path: Path
) -> None:
    client = await start_client(make_config(tmp_path / "data"))
    body = b'{"a": 1}'
    head = (
        "POST /s HTTP/1.1\r\nHost: c\r\nExpect: 100-Continue\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    async with connect(client) as (reader, writer):
        writer.write(head)
        interim = await read_answer(reader, skip_interim=False)
        writer.write(body)
        answer = await read_answer(reader)
    assert interim.status == 100
    assert (answer.status, answer.text) == (200, "OK")
