"""Hostile input against a real server: every case is refused with a 4xx (or the
connection closed, for HTTP that cannot be parsed), stores nothing, creates no
file anywhere, and the daemon answers the next honest request with OK."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import FORM, wattmon_form

from ingestd.sinks.file.device import FIRST_SEEN_NAME

MAC = "001122334455"
BLOCK = "Time,V\n2026-11-21 08:00:00,1\n"
MD5 = hashlib.md5(BLOCK.encode()).hexdigest()
DOC = b'{"a":1}'
BOUNDARY = "XyZzy"
MULTIPART = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
JSON = {"Content-Type": "application/json"}
# Files the data dir keeps for itself, whatever is posted.
INTERNAL = {".ingestd-wal", ".ingestd-wal.1", ".ingestd-lock"}


@dataclass(frozen=True)
class Post:
    """A request the aiohttp client can send: path, body, headers."""

    path: str
    body: bytes
    headers: dict[str, str]


@dataclass(frozen=True)
class Raw:
    """Bytes written as they are to a fresh TCP connection."""

    data: bytes


def raw_post(target: bytes | str, body: bytes = DOC, content_type: str = "application/json") -> Raw:
    if isinstance(target, str):
        target = target.encode()
    head = (
        b"POST "
        + target
        + b" HTTP/1.1\r\nHost: collector\r\n"
        + f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n".encode()
        + b"Connection: close\r\n\r\n"
    )
    return Raw(head + body)


def form(*pairs: tuple[str, str]) -> Post:
    return Post("/wattmon", urllib.parse.urlencode(pairs).encode(), FORM)


def multipart(
    *parts: tuple[str, bytes],
    close: bool = True,
    cut: int | None = None,
    headers: dict[str, str] = MULTIPART,
) -> Post:
    body = b""
    for name, value in parts:
        body += (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value
            + b"\r\n"
        )
    if close:
        body += f"--{BOUNDARY}--\r\n".encode()
    return Post("/wattmon", body[:cut], headers)


GOOD_PARTS = (("key", MAC.encode()), ("md5sum", MD5.encode()), ("data", BLOCK.encode()))
GOOD_FORM = wattmon_form(MAC, BLOCK)

# A request that stores a document if the server ever reads it as a request.
SMUGGLED = b"POST /smuggled HTTP/1.1\r\nHost: collector\r\nContent-Length: 7\r\n\r\n" + DOC
OUTER = b"POST /outer HTTP/1.1\r\nHost: collector\r\n"

CASES: dict[str, Post | Raw] = {
    # -- path traversal in the stream path (the JSON route) -------------------------
    "path-dotdot": raw_post("/../../../tmp/evil"),
    "path-dotdot-deeper": raw_post("/" + "../" * 30 + "evil"),
    "path-dotdot-encoded": raw_post("/%2e%2e%2f%2e%2e%2ftmp%2fevil"),
    "path-dotdot-encoded-upper": raw_post("/%2E%2E%2F%2E%2E%2Fevil"),
    "path-dotdot-slash-encoded": raw_post("/..%2f..%2ftmp%2fevil"),
    "path-dots-encoded": raw_post("/%2e%2e/%2e%2e/tmp/evil"),
    "path-double-encoded": raw_post("/%252e%252e%252fevil"),
    "path-overlong-utf8-dots": raw_post("/%c0%ae%c0%ae%c0%afevil"),
    "path-unicode-one-dot-leader": raw_post("/%e2%80%a4%e2%80%a4%2fevil"),
    "path-nul": raw_post("/evil%00.jsonl"),
    "path-nul-only": raw_post("/%00"),
    "path-backslash-encoded": raw_post("/..%5c..%5cevil"),
    "path-backslash-raw": raw_post(b"/..\\..\\evil"),
    "path-leading-dot-wal": raw_post("/.ingestd-wal"),
    "path-leading-dot-lock": raw_post("/.ingestd-lock"),
    "path-leading-dot": raw_post("/.evil"),
    "path-empty-stream": raw_post("/"),
    "path-name-129-chars": raw_post("/" + "a" * 129),
    "path-name-5000-chars": raw_post("/" + "a" * 5000),
    "path-over-request-line-limit": raw_post("/" + "a" * 9000),
    "path-non-utf8-encoded": raw_post("/%ff%fe%fd"),
    "path-non-utf8-raw": raw_post(b"/\xff\xfe\xfd"),
    "path-absolute-form-dotdot": raw_post("http://collector/../../evil"),
    "path-wattmon-dotdot": raw_post(
        "/wattmon/../../evil", GOOD_FORM.encode(), "application/x-www-form-urlencoded"
    ),
    "path-wattmon-encoded-slash": raw_post(
        "/wattmon%2f..%2f..%2fevil", GOOD_FORM.encode(), "application/x-www-form-urlencoded"
    ),
    # -- path traversal and junk in the Wattmon key --------------------------------
    "key-dotdot": form(("key", "../../../tmp/evil"), ("data", BLOCK)),
    "key-dotdot-encoded": Post("/wattmon", b"key=..%2f..%2fevil&data=x", FORM),
    "key-dots-encoded": Post("/wattmon", b"key=%2e%2e%2f%2e%2e%2fevil&data=x", FORM),
    "key-backslash": Post("/wattmon", b"key=..%5c..%5cevil&data=x", FORM),
    "key-mac-then-dotdot": form(("key", MAC + "/../../evil"), ("data", BLOCK)),
    "key-mac-then-nul": Post("/wattmon", f"key={MAC}%00&data=x".encode(), FORM),
    "key-nul-only": Post("/wattmon", b"key=%00&data=x", FORM),
    "key-100k-chars": form(("key", "a" * 100_000), ("data", BLOCK)),
    "key-non-utf8": Post("/wattmon", b"key=%ff%fe%fd&data=x", FORM),
    "key-non-utf8-raw-body": Post("/wattmon", b"key=\xff\xfe&data=\xff", FORM),
    "md5sum-dotdot": form(("key", MAC), ("md5sum", "../../evil"), ("data", BLOCK)),
    "multipart-filename-dotdot-bad-md5": Post(
        "/wattmon",
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="key"\r\n\r\n{MAC}\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="md5sum"\r\n\r\n{"0" * 32}\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="data"; '
            f'filename="../../evil.csv"\r\n\r\n{BLOCK}\r\n--{BOUNDARY}--\r\n'
        ).encode(),
        MULTIPART,
    ),
    # -- bodies that are not UTF-8 ---------------------------------------------------
    "json-non-utf8": Post("/stream-a", b'{"a":"\xff\xfe"}', JSON),
    "json-utf16": Post("/stream-a", '{"a":1}'.encode("utf-16"), JSON),
    "data-non-utf8-wrong-md5": Post(
        "/wattmon", f"key={MAC}&md5sum={'0' * 32}&data=%ff%fe".encode(), FORM
    ),
    # -- duplicated and many fields ---------------------------------------------------
    "form-duplicate-key": Post("/wattmon", f"{GOOD_FORM}&key=001122334456".encode(), FORM),
    "form-duplicate-data": Post("/wattmon", f"{GOOD_FORM}&data=Time%2CV%0A".encode(), FORM),
    "form-duplicate-md5sum": Post("/wattmon", f"{GOOD_FORM}&md5sum={MD5}".encode(), FORM),
    "form-duplicate-key-first": Post("/wattmon", f"key=001122334456&{GOOD_FORM}".encode(), FORM),
    "form-10000-fields": Post("/wattmon", (GOOD_FORM + "&x=1" * 10_000).encode(), FORM),
    "form-10000-fields-first": Post("/wattmon", ("x=1&" * 10_000 + GOOD_FORM).encode(), FORM),
    "form-10000-empty-fields": Post("/wattmon", (GOOD_FORM + "&" * 10_000).encode(), FORM),
    "multipart-duplicate-key": multipart(*GOOD_PARTS, ("key", b"001122334456")),
    "multipart-10000-fields": multipart(*GOOD_PARTS, *[("x", b"1")] * 10_000),
    # -- truncated and malformed multipart ---------------------------------------------
    "multipart-no-closing-boundary": multipart(*GOOD_PARTS, close=False),
    "multipart-cut-in-part": multipart(*GOOD_PARTS, cut=150),
    "multipart-cut-in-closing-boundary": multipart(*GOOD_PARTS, cut=-5),
    "multipart-only-preamble": multipart(close=False),
    "multipart-no-boundary-param": multipart(
        *GOOD_PARTS, headers={"Content-Type": "multipart/form-data"}
    ),
    "multipart-empty-boundary": multipart(
        *GOOD_PARTS, headers={"Content-Type": "multipart/form-data; boundary="}
    ),
    "multipart-other-boundary": multipart(
        *GOOD_PARTS, headers={"Content-Type": "multipart/form-data; boundary=other"}
    ),
    # -- wrong content types ------------------------------------------------------------
    "wattmon-as-text-plain": Post("/wattmon", GOOD_FORM.encode(), {"Content-Type": "text/plain"}),
    "wattmon-as-json": Post("/wattmon", GOOD_FORM.encode(), JSON),
    "wattmon-as-octet-stream": Post(
        "/wattmon", GOOD_FORM.encode(), {"Content-Type": "application/octet-stream"}
    ),
    "wattmon-json-body": Post("/wattmon", DOC, JSON),
    "json-route-form-body": Post("/stream-a", GOOD_FORM.encode(), FORM),
    "json-route-multipart-body": Post("/stream-a", multipart(*GOOD_PARTS).body, MULTIPART),
    # -- JSON nesting and junk -----------------------------------------------------------
    "json-100k-brackets": Post("/stream-a", b"[" * 100_000, JSON),
    "json-100k-brackets-balanced": Post("/stream-a", b"[" * 100_000 + b"]" * 100_000, JSON),
    "json-100k-objects": Post("/stream-a", b'{"a":' * 100_000, JSON),
    "json-100k-closers": Post("/stream-a", b"]" * 100_000, JSON),
    "json-nan": Post("/stream-a", b'{"a": NaN}', JSON),
    "json-empty": Post("/stream-a", b"", JSON),
    "json-two-documents": Post("/stream-a", b'{"a":1}\n{"b":2}', JSON),
    # -- HTTP request smuggling shapes (raw) ---------------------------------------------
    "smuggle-cl-and-te": Raw(
        OUTER + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED
    ),
    "smuggle-te-and-cl": Raw(
        OUTER
        + b"Transfer-Encoding: chunked\r\nContent-Length: 80\r\n\r\n7\r\n"
        + DOC
        + b"\r\n0\r\n\r\n"
        + SMUGGLED
    ),
    "smuggle-two-cl-differ": Raw(
        OUTER + b"Content-Length: 7\r\nContent-Length: 70\r\n\r\n" + DOC + SMUGGLED
    ),
    "smuggle-two-cl-differ-reversed": Raw(
        OUTER + b"Content-Length: 70\r\nContent-Length: 7\r\n\r\n" + DOC + SMUGGLED
    ),
    "smuggle-te-chunked-identity": Raw(
        OUTER
        + b"Transfer-Encoding: chunked, identity\r\n\r\n7\r\n"
        + DOC
        + b"\r\n0\r\n\r\n"
        + SMUGGLED
    ),
    "smuggle-te-two-lines": Raw(
        OUTER
        + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n7\r\n"
        + DOC
        + b"\r\n0\r\n\r\n"
        + SMUGGLED
    ),
    "smuggle-te-unknown": Raw(
        OUTER + b"Transfer-Encoding: xchunked\r\n\r\n7\r\n" + DOC + b"\r\n0\r\n\r\n"
    ),
    "smuggle-te-space-before-colon": Raw(
        OUTER + b"Transfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n" + SMUGGLED
    ),
    "smuggle-obs-fold": Raw(
        OUTER + b"X-Note: a\r\n folded\r\nContent-Length: 7\r\n\r\n" + DOC + SMUGGLED
    ),
    "smuggle-obs-fold-te": Raw(
        OUTER + b"Transfer-Encoding:\r\n chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n" + SMUGGLED
    ),
    "smuggle-cl-non-digit": Raw(OUTER + b"Content-Length: 7x\r\n\r\n" + DOC + SMUGGLED),
    "smuggle-cl-plus": Raw(OUTER + b"Content-Length: +7\r\n\r\n" + DOC + SMUGGLED),
    "smuggle-cl-negative": Raw(OUTER + b"Content-Length: -1\r\n\r\n" + DOC + SMUGGLED),
    "smuggle-cl-hex": Raw(OUTER + b"Content-Length: 0x7\r\n\r\n" + DOC + SMUGGLED),
    "smuggle-cl-list": Raw(OUTER + b"Content-Length: 7, 70\r\n\r\n" + DOC + SMUGGLED),
    "smuggle-chunk-size-junk": Raw(
        OUTER + b"Transfer-Encoding: chunked\r\n\r\n7;\x00\r\n" + DOC + b"\r\n0\r\n\r\n" + SMUGGLED
    ),
    "smuggle-chunk-size-non-hex": Raw(
        OUTER + b"Transfer-Encoding: chunked\r\n\r\n7x\r\n" + DOC + b"\r\n0\r\n\r\n" + SMUGGLED
    ),
    "smuggle-chunk-bare-lf": Raw(
        OUTER + b"Transfer-Encoding: chunked\r\n\r\n7\n" + DOC + b"\n0\n\n" + SMUGGLED
    ),
    "smuggle-nul-in-header": Raw(
        OUTER + b"X-Note: a\x00b\r\nContent-Length: 7\r\n\r\n" + DOC + SMUGGLED
    ),
    "smuggle-bare-cr-in-header": Raw(
        OUTER + b"X-Note: a\rb\r\nContent-Length: 7\r\n\r\n" + DOC + SMUGGLED
    ),
    "smuggle-space-in-header-name": Raw(OUTER + b"Content Length: 7\r\n\r\n" + DOC + SMUGGLED),
    "header-field-over-limit": Raw(
        OUTER + b"X-Pad: " + b"p" * 9000 + b"\r\nContent-Length: 7\r\n\r\n" + DOC
    ),
    "too-many-header-lines": Raw(
        OUTER
        + b"".join(b"X-H%d: v\r\n" % n for n in range(300))
        + b"Content-Length: 7\r\n\r\n"
        + DOC
    ),
}


def outside_files(tmp_path: Path) -> set[Path]:
    data = tmp_path / "data"
    return {p for p in tmp_path.rglob("*") if p != data and data not in p.parents}


def data_files(tmp_path: Path) -> set[str]:
    """Every file under the data dir but a device folder's first-seen time."""
    data = tmp_path / "data"
    return {
        str(p.relative_to(data))
        for p in data.rglob("*")
        if p.is_file() and p.name != FIRST_SEEN_NAME
    }


async def exchange(port: int, data: bytes, idle: float = 3.0) -> tuple[bytes, bool]:
    """Write `data`, read what comes: (bytes, closed by the server)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = b""
    closed = False
    try:
        writer.write(data)
        await writer.drain()
        while True:
            async with asyncio.timeout(idle):
                chunk = await reader.read(65536)
            if not chunk:
                closed = True
                break
            received += chunk
    except TimeoutError:
        pass
    except ConnectionError:
        closed = True
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return received, closed


def statuses(received: bytes) -> list[int]:
    """The status of every response in a byte stream read off a connection."""
    found = []
    for line in received.split(b"\r\n"):
        if line.startswith(b"HTTP/") and line.count(b" ") >= 1:
            with contextlib.suppress(ValueError):
                found.append(int(line.split(b" ")[1]))
    return found


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_hostile_request_is_refused_and_leaves_no_trace(client, tmp_path, case):
    outside_before = await asyncio.to_thread(outside_files, tmp_path)
    data_before = await asyncio.to_thread(data_files, tmp_path)
    wal_before = (tmp_path / "data" / ".ingestd-wal").read_bytes()

    if isinstance(case, Raw):
        received, closed = await exchange(client.server.port, case.data)
        found = statuses(received)
        assert found or closed, f"no answer and the connection left open: {received[:200]!r}"
        assert all(400 <= status < 500 for status in found), received[:300]
    else:
        resp = await client.post(case.path, data=case.body, headers=case.headers)
        text = await resp.text(errors="replace")
        assert 400 <= resp.status < 500, (resp.status, text[:200])
        assert text.startswith("ERROR")

    assert await asyncio.to_thread(data_files, tmp_path) == data_before <= INTERNAL
    assert (tmp_path / "data" / ".ingestd-wal").read_bytes() == wal_before
    assert await asyncio.to_thread(outside_files, tmp_path) == outside_before

    resp = await client.post("/wattmon", data=GOOD_FORM, headers=FORM)
    assert (resp.status, await resp.text()) == (200, "OK")
    stored = await asyncio.to_thread(data_files, tmp_path)
    assert f"wattmon/{MAC}/2026-11-21.csv" in stored


async def test_raw_helpers_see_an_honest_request_stored(client, tmp_path):
    """The raw-socket helpers themselves: an honest request through them is stored."""
    received, closed = await exchange(client.server.port, raw_post("/stream-a").data)
    assert statuses(received) == [200] and closed
    stored = await asyncio.to_thread(data_files, tmp_path)
    assert stored - INTERNAL == {"json/stream-a/2026-11-21.jsonl"}


async def test_not_utf8_block_with_matching_md5_is_quarantined_inside_data_dir(client, tmp_path):
    """Documented: a block that passes MD5 but is not UTF-8 is kept, answered OK."""
    raw = b"Time,V\n\xff\xfe,1\n"
    body = f"key={MAC}&md5sum={hashlib.md5(raw).hexdigest()}&data=".encode()
    body += urllib.parse.quote_from_bytes(raw).encode()
    before = await asyncio.to_thread(outside_files, tmp_path)
    resp = await client.post("/wattmon", data=body, headers=FORM)
    assert (resp.status, await resp.text()) == (200, "OK")
    quarantine = f"quarantine/wattmon/{MAC}/{hashlib.md5(raw).hexdigest()}"
    stored = await asyncio.to_thread(data_files, tmp_path)
    assert stored - INTERNAL == {f"{quarantine}.csv", f"{quarantine}.json"}
    assert (tmp_path / "data" / f"{quarantine}.csv").read_bytes() == raw
    assert await asyncio.to_thread(outside_files, tmp_path) == before


@pytest.mark.parametrize(
    "path",
    ["/a/../../b", "/a/..%2f..%2fb", "//etc/passwd", "/%2fetc%2fpasswd"],
    ids=["dotdot-after-name", "encoded-dotdot-after-name", "double-slash", "encoded-slash"],
)
async def test_dot_segments_after_a_name_stay_one_folder_inside_json(client, tmp_path, path):
    """Names like `a_.._.._b` are valid: they hold no `/`, so they stay one folder."""
    before = await asyncio.to_thread(outside_files, tmp_path)
    received, _ = await exchange(client.server.port, raw_post(path).data)
    assert statuses(received) in ([200], [400])
    for name in (await asyncio.to_thread(data_files, tmp_path)) - INTERNAL:
        parts = Path(name).parts
        assert len(parts) == 3 and parts[0] == "json" and parts[2] == "2026-11-21.jsonl", name
        assert not parts[1].startswith(".") and "/" not in parts[1]
    assert await asyncio.to_thread(outside_files, tmp_path) == before


async def max_loop_lag(coro):
    """Run `coro`; the longest the event loop went without running a 10 ms ticker."""
    loop = asyncio.get_running_loop()
    lag = 0.0
    done = asyncio.Event()

    async def tick() -> None:
        nonlocal lag
        while not done.is_set():
            before = loop.time()
            await asyncio.sleep(0.01)
            lag = max(lag, loop.time() - before - 0.01)

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.05)
    try:
        result = await coro
    finally:
        done.set()
        await ticker
    return result, lag


EIGHT_MIB = 8 * 1024 * 1024


@pytest.mark.parametrize(
    "path,body,headers",
    [
        ("/stream-a", b"[" * (EIGHT_MIB - 64), JSON),
        # One bad escape at the end sends forms._unquote to the stdlib's Python loop.
        (
            "/wattmon",
            f"key={MAC}&md5sum={'0' * 32}&data=".encode()
            + b"%2C" * ((EIGHT_MIB - 100) // 3)
            + b"%zz",
            FORM,
        ),
    ],
    ids=["json-8mib-of-brackets", "form-8mib-of-escapes-one-invalid"],
)
async def test_max_size_hostile_body_does_not_stall_the_event_loop(client, path, body, headers):
    resp, lag = await max_loop_lag(client.post(path, data=io.BytesIO(body), headers=headers))
    assert resp.status == 400
    # Generous: the machine is shared; before the fix the stall was 1-2 s.
    assert lag < 0.5, f"event loop stalled {lag:.2f} s"


# -- the device view: ids that are not a device, or name a path outside ------------------

HOSTILE_DEVICE_PATHS = [
    "/api/devices/../../etc/passwd",
    "/api/devices/..%2f..%2fetc%2fpasswd",
    "/api/devices/%2e%2e",
    "/api/devices/%2e%2e/data",
    "/api/devices/.ingestd-wal",
    "/api/devices/..%5c..%5cwindows",
    "/api/devices/%00",
    "/api/devices/a%00b/data",
    "/api/devices/" + "a" * 129,
    "/api/devices/00:11:22:33:44:55:66",
    "/api/devices/001122334455/data/../../../etc/passwd",
    f"/api/devices/{MAC}/files/..%2f..%2f.ingestd-wal",
    f"/api/devices/{MAC}/files/.ingestd-keys",
    f"/api/devices/{MAC}/files/%2fetc%2fpasswd",
    "/api/devices/quarantine",
    "/devices/..%2f..%2f..%2fetc%2fpasswd",
    "/devices/%2e%2e%2f",
    "/devices/%c0%ae%c0%ae",
    "/api/devices/json?protocol=../../etc",
]


@pytest.mark.parametrize("path", HOSTILE_DEVICE_PATHS)
async def test_hostile_device_id_is_400_or_404_and_reads_nothing_outside(client, tmp_path, path):
    resp = await client.post("/wattmon", data=GOOD_FORM, headers=FORM)
    assert await resp.text() == "OK"  # a device with files, for the /files/ cases
    outside_before = await asyncio.to_thread(outside_files, tmp_path)
    data_before = await asyncio.to_thread(data_files, tmp_path)
    request = f"GET {path} HTTP/1.1\r\nHost: collector\r\nConnection: close\r\n\r\n"
    received, _ = await exchange(client.server.port, request.encode())
    assert statuses(received) in ([400], [404]), received[:300]
    assert received.split(b"\r\n\r\n", 1)[1].startswith(b"ERROR")
    assert b"root:" not in received
    assert await asyncio.to_thread(data_files, tmp_path) == data_before
    assert await asyncio.to_thread(outside_files, tmp_path) == outside_before
