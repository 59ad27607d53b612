"""ingestd.http.http1.parse_head: the strict reader of the small-POST request head.

It may refuse (None: aiohttp answers the request) whatever it likes; what it
accepts, it must read exactly as aiohttp would. Unit tests pin the accepted
shape and the refused ones; a hypothesis property feeds every accepted head
to aiohttp's own parsers and compares what both read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any
from unittest import mock

import pytest
from aiohttp import http_parser
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ingestd.http.http1 import RequestHead, parse_head

HOST = b"Host: collector"
PARSERS: dict[str, Any] = {"py": http_parser.HttpRequestParserPy}
if hasattr(http_parser, "HttpRequestParserC"):  # llhttp, what the daemon runs
    PARSERS["c"] = http_parser.HttpRequestParserC


def head(*lines: bytes | str, start: bytes | str = b"POST /wattmon HTTP/1.1") -> bytes:
    """A request head (no blank line): the request line, then one field a line."""
    parts = [start, *lines]
    return b"\r\n".join(p.encode() if isinstance(p, str) else p for p in parts)


def accepted(raw: bytes) -> RequestHead:
    parsed = parse_head(raw)
    assert parsed is not None, raw
    return parsed


# -- the accepted shape -------------------------------------------------------------


def test_plain_post_with_content_length_is_read():
    """The shape devices send: path, no query, keep-alive, the length, the
    fields under lower-case names."""
    parsed = accepted(head(HOST, "Content-Type: text/plain", "Content-Length: 12"))
    assert parsed == RequestHead(
        path="/wattmon",
        http10=False,
        query_string="",
        keep_alive=True,
        content_length=12,
        fields={"host": "collector", "content-type": "text/plain", "content-length": "12"},
        forwarded_for=[],
    )


@pytest.mark.parametrize(
    ("version", "connection", "keep_alive"),
    [
        ("HTTP/1.1", None, True),
        ("HTTP/1.1", "keep-alive", True),
        ("HTTP/1.1", "close", False),
        ("HTTP/1.1", "Close", False),
        ("HTTP/1.1", "  close  ", False),
        ("HTTP/1.1", "foo, close", False),
        ("HTTP/1.1", "keep-alive, close", False),
        ("HTTP/1.1", "foo", True),
        ("HTTP/1.0", None, False),
        ("HTTP/1.0", "keep-alive", True),
        ("HTTP/1.0", "Keep-Alive", True),
        ("HTTP/1.0", "foo, keep-alive", True),
        ("HTTP/1.0", "close", False),
        ("HTTP/1.0", "foo", False),
    ],
)
def test_keep_alive_follows_version_and_connection(version, connection, keep_alive):
    """HTTP/1.1 keeps the connection unless `Connection: close`; HTTP/1.0
    closes it unless `Connection: keep-alive` (tokens, any case); close wins."""
    lines = [HOST, "Content-Length: 1"]
    if connection is not None:
        lines.append(f"Connection: {connection}")
    assert accepted(head(*lines, start=f"POST /s {version}")).keep_alive is keep_alive


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        ("/wattmon?token=abc", "/wattmon", "token=abc"),
        ("/a/b-c_d~e?x=1&y=2:3;z=@!$'()*,", "/a/b-c_d~e", "x=1&y=2:3;z=@!$'()*,"),
        ("/a?", "/a", ""),
        ("/a?b?c", "/a", "b?c"),
        ("/a?x=../y", "/a", "x=../y"),
        ("/", "/", ""),
        ("/export-script.php", "/export-script.php", ""),
        ("//double", "//double", ""),
    ],
)
def test_target_splits_into_path_and_query(target, path, query):
    """The origin-form target is split at the first '?'; neither half changes."""
    parsed = accepted(head(HOST, start=f"POST {target} HTTP/1.1"))
    assert (parsed.path, parsed.query_string) == (path, query)


def test_field_values_lose_surrounding_spaces_and_tabs():
    """Optional whitespace around a value goes; inside it stays."""
    parsed = accepted(head(HOST, "X-A:   v  w \t", "X-B:v", "X-C: \t ", "X-D:\tx\ty"))
    assert parsed.fields["x-a"] == "v  w"
    assert parsed.fields["x-b"] == "v"
    assert parsed.fields["x-c"] == ""
    assert parsed.fields["x-d"] == "x\ty"


def test_first_value_of_a_repeated_field_wins():
    """A name given twice (in any case) keeps its first value, as aiohttp's
    `headers.get` gives."""
    parsed = accepted(
        head(
            HOST,
            "Authorization: Bearer first",
            "authorization: Bearer second",
            "Idempotency-Key: one",
            "IDEMPOTENCY-KEY: two",
        )
    )
    assert parsed.fields["authorization"] == "Bearer first"
    assert parsed.fields["idempotency-key"] == "one"


def test_every_forwarded_for_line_is_kept_in_order():
    """Each X-Forwarded-For line is kept, in order, stripped: a proxy may add
    its own line after a forged one."""
    parsed = accepted(
        head(
            HOST,
            "X-Forwarded-For: 198.51.100.7, 10.0.0.1",
            "X-A: b",
            "x-forwarded-for:  203.0.113.9 ",
            "X-FORWARDED-FOR: 10.0.0.2",
        )
    )
    assert parsed.forwarded_for == ["198.51.100.7, 10.0.0.1", "203.0.113.9", "10.0.0.2"]
    assert parsed.fields["x-forwarded-for"] == "198.51.100.7, 10.0.0.1"


def test_single_forwarded_for_line_is_kept():
    assert accepted(head(HOST, "X-Forwarded-For: 192.0.2.1")).forwarded_for == ["192.0.2.1"]


def test_no_content_length_means_an_empty_body():
    """Without Content-Length a request has no body (RFC 9112 6.3)."""
    assert accepted(head(HOST)).content_length == 0
    assert accepted(head(start=b"POST /wattmon HTTP/1.0")).content_length == 0


@pytest.mark.parametrize(
    ("value", "length"), [("0", 0), ("007", 7), ("  42 ", 42), ("999999999999", 999_999_999_999)]
)
def test_content_length_of_plain_digits_is_read(value, length):
    assert accepted(head(HOST, f"Content-Length: {value}")).content_length == length


def test_thirty_two_fields_are_accepted_and_thirty_three_are_not():
    """More fields than a device sends: aiohttp's limits decide."""
    fields = [HOST] + [f"X-F{i}: {i}" for i in range(31)]
    assert len(accepted(head(*fields)).fields) == 32
    assert parse_head(head(*fields, "X-F31: 31")) is None


# -- refused shapes: aiohttp answers them -----------------------------------------

REFUSED: dict[str, bytes] = {
    # request line
    "get": head(HOST, start="GET /wattmon HTTP/1.1"),
    "head": head(HOST, start="HEAD /wattmon HTTP/1.1"),
    "put": head(HOST, start="PUT /wattmon HTTP/1.1"),
    "lowercase-method": head(HOST, start="post /wattmon HTTP/1.1"),
    "http2": head(HOST, start="POST /wattmon HTTP/2.0"),
    "http12": head(HOST, start="POST /wattmon HTTP/1.2"),
    "http09": head(HOST, start="POST /wattmon HTTP/0.9"),
    "lowercase-version": head(HOST, start="POST /wattmon http/1.1"),
    "no-version": head(HOST, start="POST /wattmon"),
    "two-spaces": head(HOST, start="POST  /wattmon HTTP/1.1"),
    "trailing-space": head(HOST, start="POST /wattmon HTTP/1.1 "),
    "tab-separator": head(HOST, start="POST\t/wattmon HTTP/1.1"),
    "space-in-target": head(HOST, start="POST /a b HTTP/1.1"),
    "empty-target": head(HOST, start="POST  HTTP/1.1"),
    "empty-head": b"",
    # framing fields
    "transfer-encoding-chunked": head(HOST, "Transfer-Encoding: chunked"),
    "transfer-encoding-identity": head(HOST, "Transfer-Encoding: identity"),
    "transfer-encoding-empty": head(HOST, "Transfer-Encoding:"),
    "transfer-encoding-with-length": head(HOST, "Content-Length: 3", "transfer-encoding: gzip"),
    "expect": head(HOST, "Expect: 100-continue", "Content-Length: 3"),
    "expect-other": head(HOST, "expect: nothing"),
    "upgrade": head(HOST, "Upgrade: websocket"),
    "connection-upgrade": head(HOST, "Connection: Upgrade"),
    "connection-upgrade-token": head(HOST, "Connection: keep-alive, upgrade"),
    "content-encoding": head(HOST, "Content-Encoding: gzip", "Content-Length: 3"),
    "content-encoding-identity": head(HOST, "Content-Encoding: identity"),
    "two-content-lengths": head(HOST, "Content-Length: 3", "Content-Length: 3"),
    "two-content-lengths-differ": head(HOST, "Content-Length: 3", "content-length: 4"),
    "content-length-letters": head(HOST, "Content-Length: abc"),
    "content-length-negative": head(HOST, "Content-Length: -1"),
    "content-length-plus": head(HOST, "Content-Length: +1"),
    "content-length-decimal": head(HOST, "Content-Length: 1.0"),
    "content-length-hex": head(HOST, "Content-Length: 0x10"),
    "content-length-two-numbers": head(HOST, "Content-Length: 1 2"),
    "content-length-list": head(HOST, "Content-Length: 3, 3"),
    "content-length-empty": head(HOST, "Content-Length:"),
    "content-length-huge": head(HOST, "Content-Length: " + "9" * 13),
    # field syntax
    "obs-fold-space": head(HOST, "X-A: a", " b"),
    "obs-fold-tab": head(HOST, "X-A: a", "\tb"),
    "space-before-colon": head("Host : collector"),
    "tab-before-colon": head("Host\t: collector"),
    "space-in-name": head(HOST, "X A: b"),
    "no-colon": head(HOST, "X-A b"),
    "empty-name": head(HOST, ": b"),
    "bad-name-char": head(HOST, "X(A): b"),
    "empty-line": head(HOST, "", "X-A: b"),
    "trailing-crlf": head(HOST) + b"\r\n",
    # line endings and bytes
    "bare-lf-line-end": b"POST /wattmon HTTP/1.1\nHost: collector",
    "bare-lf-in-value": head(HOST, b"X-A: a\nX-B: b"),
    "bare-cr-line-end": b"POST /wattmon HTTP/1.1\rHost: collector",
    "bare-cr-in-value": head(HOST, b"X-A: a\rb"),
    "bare-cr-in-target": head(HOST, start=b"POST /a\rb HTTP/1.1"),
    "cr-cr-lf": head(HOST, b"X-A: a\r"),
    "nul-in-value": head(HOST, b"X-A: a\x00b"),
    "nul-in-target": head(HOST, start=b"POST /a\x00 HTTP/1.1"),
    "soh-in-value": head(HOST, b"X-A: \x01"),
    "vt-in-value": head(HOST, b"X-A: a\x0bb"),
    "ff-in-value": head(HOST, b"X-A: a\x0cb"),
    "esc-in-value": head(HOST, b"X-A: \x1b[31m"),
    "del-in-value": head(HOST, b"X-A: a\x7f"),
    "del-in-name": head(HOST, b"X\x7fA: a"),
    "non-ascii-value": head(HOST, "X-A: caf\u00e9".encode()),
    "latin1-value": head(HOST, b"X-A: caf\xe9"),
    "non-ascii-name": head(HOST, "X-\u00c4: a".encode()),
    "non-ascii-target": head(HOST, start="POST /caf\u00e9 HTTP/1.1".encode()),
    "high-byte-target": head(HOST, start=b"POST /\xff HTTP/1.1"),
    # targets aiohttp would decode or normalise
    "percent-escape": head(HOST, start="POST /a%20b HTTP/1.1"),
    "percent-escaped-dots": head(HOST, start="POST /%2e%2e/evil HTTP/1.1"),
    "percent-in-query": head(HOST, start="POST /a?token=%41 HTTP/1.1"),
    "plus-in-path": head(HOST, start="POST /a+b HTTP/1.1"),
    "plus-in-query": head(HOST, start="POST /a?x=a+b HTTP/1.1"),
    "fragment": head(HOST, start="POST /a#frag HTTP/1.1"),
    "fragment-after-query": head(HOST, start="POST /a?x=1#frag HTTP/1.1"),
    "backslash": head(HOST, start="POST /a\\b HTTP/1.1"),
    "dot": head(HOST, start="POST /. HTTP/1.1"),
    "dotdot": head(HOST, start="POST /.. HTTP/1.1"),
    "trailing-dot": head(HOST, start="POST /a/. HTTP/1.1"),
    "trailing-dotdot": head(HOST, start="POST /a/.. HTTP/1.1"),
    "trailing-dot-slash": head(HOST, start="POST /a/./ HTTP/1.1"),
    "inner-dot": head(HOST, start="POST /a/./b HTTP/1.1"),
    "inner-dotdot": head(HOST, start="POST /a/../b HTTP/1.1"),
    "leading-dot": head(HOST, start="POST /./wattmon HTTP/1.1"),
    "leading-dotdot": head(HOST, start="POST /../wattmon HTTP/1.1"),
    "dotdot-escape": head(HOST, start="POST /x/../../../etc/passwd HTTP/1.1"),
    "dotdot-to-wattmon": head(HOST, start="POST /json/../wattmon HTTP/1.1"),
    "dotdot-before-query": head(HOST, start="POST /a/..?x=1 HTTP/1.1"),
    "double-slash-dotdot": head(HOST, start="POST //.. HTTP/1.1"),
    # other target forms
    "absolute-form": head(HOST, start="POST http://collector/wattmon HTTP/1.1"),
    "absolute-form-https": head(HOST, start="POST https://collector:443/wattmon HTTP/1.1"),
    "authority-form": head(HOST, start="POST collector:8080 HTTP/1.1"),
    "asterisk-form": head(HOST, start="POST * HTTP/1.1"),
    "relative-target": head(HOST, start="POST wattmon HTTP/1.1"),
}


@pytest.mark.parametrize("raw", REFUSED.values(), ids=REFUSED.keys())
def test_shapes_outside_the_small_post_are_refused(raw):
    """Every shape but the plain small POST is left to aiohttp: None."""
    assert parse_head(raw) is None


def test_more_than_thirty_two_fields_are_refused_whatever_they_are():
    assert parse_head(head(*[HOST] * 40)) is None


# -- shapes aiohttp refuses: the fast path must not answer them -------------------------


def aiohttp_refuses(raw: bytes) -> bool:
    """Whether every aiohttp parser refuses the head (a 400 from aiohttp)."""
    refused = []
    for name in PARSERS:
        try:
            parse_with(name, raw)
        except http_parser.BadHttpMessage:
            refused.append(True)
        else:
            refused.append(False)
    return all(refused)


def parse_with(parser_name: str, raw: bytes) -> Any:
    """aiohttp's reading of a head (no body), with the named parser."""
    loop = asyncio.new_event_loop()
    try:
        parser = PARSERS[parser_name](
            mock.Mock(), loop, 2**16, max_line_size=8190, max_field_size=8190
        )
        [(message, _payload)], _upgraded, _tail = parser.feed_data(raw + b"\r\n\r\n")
        return message
    finally:
        loop.close()


AIOHTTP_REFUSES = {
    # aiohttp: "Missing 'Host' header in request." (RFC 9112 3.2)
    "http11-without-host": head("Content-Length: 3"),
    # aiohttp: "Duplicate '...' header found." for its singleton fields
    "two-hosts": head(HOST, "Host: elsewhere"),
    "two-content-types": head(HOST, "Content-Type: text/csv", "Content-Type: application/json"),
    "two-user-agents": head(HOST, "User-Agent: a", "User-Agent: b"),
    # aiohttp refuses the old WebSocket handshake field
    "sec-websocket-key1": head(HOST, "Sec-WebSocket-Key1: 1"),
}


@pytest.mark.parametrize("raw", AIOHTTP_REFUSES.values(), ids=AIOHTTP_REFUSES.keys())
def test_reference_aiohttp_refuses_these_heads(raw):
    """The premise of the test below: aiohttp answers each of these with 400."""
    assert aiohttp_refuses(raw)


@pytest.mark.parametrize("raw", AIOHTTP_REFUSES.values(), ids=AIOHTTP_REFUSES.keys())
def test_heads_aiohttp_refuses_are_left_to_aiohttp(raw):
    """A head aiohttp answers with 400 is not taken by the fast path."""
    assert parse_head(raw) is None


def test_http10_without_host_is_fine_for_both():
    """HTTP/1.0 needs no Host: aiohttp takes it, and so may parse_head."""
    raw = head("Content-Length: 3", start="POST /wattmon HTTP/1.0")
    assert not aiohttp_refuses(raw)
    assert accepted(raw).content_length == 3


@pytest.mark.skipif("c" not in PARSERS, reason="aiohttp built without llhttp")
def test_http10_naming_close_and_keep_alive_is_closed():
    """HTTP/1.0 with `Connection: close, keep-alive`: parse_head closes, as
    aiohttp's Python parser does; llhttp (the property tolerates this one
    difference) keeps it open. Closing is the side that cannot go wrong."""
    raw = head(HOST, "Connection: close, keep-alive", start="POST /s HTTP/1.0")
    assert accepted(raw).keep_alive is False
    assert parse_with("py", raw).should_close is True
    assert parse_with("c", raw).should_close is False
    assert llhttp_keeps_http10_alive_despite_close(raw)


def test_every_connection_line_counts():
    """`close` on a second Connection line closes the connection, as aiohttp's
    parser reads it."""
    raw = head(HOST, "Connection: keep-alive", "Connection: close")
    parsed = parse_head(raw)
    assert parsed is None or parsed.keep_alive is False


# -- differential property: what parse_head accepts, aiohttp reads the same ------------


TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcxyzABCXYZ"
# Characters that matter to HTTP or to the reader: separators, whitespace,
# controls, non-ASCII.
ODD_CHARS = ' \t:;,"()/?=@[]{}\\<>\x00\x01\x0b\x0c\x1b\x7f\r\n\u00e9\u00ff\u20ac'
SAFE_PATH_CHARS = "abcXYZ019-_~!$&'()*,;=:@/."
ODD_PATH_CHARS = SAFE_PATH_CHARS + '?#%+ \t\\"<>[]{}^`|\x00\x7f\r\n\u00e9'
NAMES = [
    "Host",
    "Content-Length",
    "content-length",
    "Connection",
    "X-Forwarded-For",
    "Authorization",
    "Content-Type",
    "Idempotency-Key",
    "X-A",
    "x-a",
    "Keep-Alive",
    "Transfer-Encoding",
    "Expect",
    "Upgrade",
    "Content-Encoding",
    "Accept",
]
CONNECTION_TOKENS = [
    "close",
    "keep-alive",
    "Close",
    "KEEP-ALIVE",
    "Keep-Alive",
    "upgrade",
    "foo",
    "",
    " ",
    "te",
]
BODY_CAP = 4096

CLEAN_NAMES = st.one_of(st.sampled_from(NAMES), st.text(TOKEN_CHARS, min_size=1, max_size=10))
ODD_NAMES = st.text(TOKEN_CHARS + ODD_CHARS, max_size=10)
padding = st.sampled_from(["", " ", "  ", "\t", " \t "])
CLEAN_LENGTHS = st.integers(0, 64).map(str)
ODD_LENGTHS = st.sampled_from(
    ["", "-1", "+1", "1.0", "0x1", "1 2", "1,1", "00", "9" * 13, "1\t", "\u0661"]
)
connection_values = st.lists(st.sampled_from(CONNECTION_TOKENS), min_size=1, max_size=3).flatmap(
    lambda tokens: st.sampled_from([",", ", ", " , "]).map(lambda sep: sep.join(tokens))
)
CLEAN_VALUES = st.text("abcXYZ0129 \t.-_/=;,*:", max_size=16)
ODD_VALUES = st.text(TOKEN_CHARS + ODD_CHARS, max_size=16)
CLEAN_TARGETS = st.one_of(
    st.text(SAFE_PATH_CHARS, max_size=16).map(lambda s: "/" + s),
    st.tuples(st.text(SAFE_PATH_CHARS, max_size=8), st.text(SAFE_PATH_CHARS + "?", max_size=8)).map(
        lambda p: f"/{p[0]}?{p[1]}"
    ),
)
ODD_TARGETS = st.one_of(
    st.text(ODD_PATH_CHARS, max_size=16).map(lambda s: "/" + s),
    st.sampled_from(["*", "http://h/a", "a", ""]),
)
# Parts of a head that may be made odd; the others stay in the devices' shape.
ASPECTS = ("method", "target", "version", "names", "values", "colons", "separators")


@st.composite
def field_line(draw: st.DrawFn, odd: frozenset[str]) -> str:
    name = draw(ODD_NAMES if "names" in odd else CLEAN_NAMES)
    lower = name.lower()
    if lower == "content-length":
        value = draw(ODD_LENGTHS if "values" in odd else CLEAN_LENGTHS)
    elif lower == "connection":
        value = draw(connection_values)
    else:
        value = draw(ODD_VALUES if "values" in odd else CLEAN_VALUES)
    colon = draw(st.sampled_from([":", " :", "\t:", ""])) if "colons" in odd else ":"
    return name + colon + draw(padding) + value + draw(padding)


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    """Mostly heads in the devices' shape (with the fields that make
    parse_head refuse among the names); some with one or more parts odd."""
    level = draw(st.integers(0, 3))
    if level < 2:
        odd: frozenset[str] = frozenset()
    elif level == 2:
        odd = frozenset([draw(st.sampled_from(ASPECTS))])
    else:
        odd = frozenset(ASPECTS)
    method = (
        draw(st.sampled_from(["GET", "post", "PUT", "HEAD", "PO ST"]))
        if "method" in odd
        else "POST"
    )
    target = draw(ODD_TARGETS if "target" in odd else CLEAN_TARGETS)
    version = draw(
        st.sampled_from(["HTTP/2.0", "HTTP/1.2", "http/1.1", "HTTP/1.1 ", "HTTP/1.1"])
        if "version" in odd
        else st.sampled_from(["HTTP/1.1", "HTTP/1.0"])
    )
    lines = draw(st.lists(field_line(odd), max_size=6))
    if draw(st.integers(0, 9)) > 0:
        lines.insert(draw(st.integers(0, len(lines))), "Host:" + draw(padding) + "collector")
    if draw(st.integers(0, 2)) > 0:
        length = draw(ODD_LENGTHS if "values" in odd else CLEAN_LENGTHS)
        lines.insert(draw(st.integers(0, len(lines))), f"Content-Length: {length}")
    separator = (
        st.sampled_from(["\r\n", "\n", "\r", "\r\n ", "\r\n\t"])
        if "separators" in odd
        else st.just("\r\n")
    )
    text = f"{method} {target} {version}" + "".join(draw(separator) + line for line in lines)
    return text.encode("utf-8", "surrogatepass")


def llhttp_keeps_http10_alive_despite_close(raw: bytes) -> bool:
    """llhttp's one reading that differs from aiohttp's Python parser (and
    from parse_head): HTTP/1.0 naming both `close` and `keep-alive` stays
    open. parse_head closes it, the safe side, as the Python parser does."""
    lines = raw.lower().split(b"\r\n")
    tokens = {
        token.strip(b" \t")
        for line in lines[1:]
        if line.startswith(b"connection:")
        for token in line[len(b"connection:") :].split(b",")
    }
    return lines[0].endswith(b"http/1.0") and {b"close", b"keep-alive"} <= tokens


@pytest.fixture(scope="module")
def parser_loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.mark.parametrize("parser_name", PARSERS)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=heads())
@example(raw=b"POST /wattmon?token=a HTTP/1.1\r\nHost: c\r\nContent-Length: 5\r\nConnection: close")
@example(raw=b"POST /a HTTP/1.0\r\nHost: c\r\nConnection: foo, Keep-Alive")
@example(raw=b"POST //a/b HTTP/1.1\r\nHost: c\r\nX-Forwarded-For: 1\r\nx-forwarded-for: 2")
@example(raw=b"POST /a?b?c HTTP/1.1\r\nHost:c\r\nX-A:\t a \t\r\nx-a: b")
def test_what_parse_head_accepts_aiohttp_reads_the_same(parser_loop, parser_name, raw):
    """Whenever parse_head accepts a head, aiohttp's parser (pure Python, and
    llhttp when built) accepts it too and reads the same method, path, query,
    keep-alive, content length, first value of every field and every
    X-Forwarded-For line; and it sees no upgrade, chunking or compression."""
    parsed = parse_head(raw)
    if parsed is None:
        return
    body = b"b" * min(parsed.content_length, BODY_CAP)
    parser = PARSERS[parser_name](
        mock.Mock(), parser_loop, 2**16, max_line_size=8190, max_field_size=8190
    )
    messages, upgraded, tail = parser.feed_data(raw + b"\r\n\r\n" + body)
    assert len(messages) == 1 and not upgraded and not tail
    message, payload = messages[0]
    assert message.method == "POST"
    assert message.url.path == message.url.raw_path == parsed.path
    assert message.url.query_string == message.url.raw_query_string == parsed.query_string
    assert message.path == raw.split(b"\r\n", 1)[0].split(b" ")[1].decode()
    if parser_name == "c" and llhttp_keeps_http10_alive_despite_close(raw):
        assert message.should_close is False and parsed.keep_alive is False
    else:
        assert (not message.should_close) is parsed.keep_alive
    assert int(message.headers.get("Content-Length", "0")) == parsed.content_length
    if parsed.content_length <= BODY_CAP:
        assert payload.is_eof() and payload.read_nowait() == body
    assert {name.lower() for name in message.headers} == set(parsed.fields)
    for name in message.headers:
        assert message.headers.get(name) == parsed.fields[name.lower()]
    assert message.headers.getall("X-Forwarded-For", []) == parsed.forwarded_for
    assert not message.upgrade and not message.chunked and message.compression is None


def test_the_property_sees_accepted_heads():
    """The generator is not vacuous: a good share of its heads are accepted,
    and some are refused."""
    outcomes = []

    @settings(max_examples=200, deadline=None, database=None)
    @given(raw=heads())
    def sample(raw: bytes) -> None:
        outcomes.append(parse_head(raw) is not None)

    sample()
    assert sum(outcomes) >= len(outcomes) // 10
    assert not all(outcomes)
