"""Who may post, and how much: route tokens, MAC and stream allow-lists, client
networks behind trusted proxies, per-device rate limits, size and shape limits,
and slow clients against the real daemon."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import aiohttp
import pytest
from conftest import FORM, make_config, wattmon_form
from daemon import DaemonProcess, write_config
from multidict import CIMultiDict

from ingestd.config import Config, JsonConfig, load_config, validate
from ingestd.errors import RateLimited
from ingestd.ingest.access import SWEEP_AT, RateLimiter

TOKEN = "tok-9f8e7d6c5b4a"
MAC = "00:1A:2b:3c:4D:5e"
DEVICE = "001a2b3c4d5e"
OTHER = "001122334455"
BLOCK = "Time,V,I\n2026-11-21 08:00:00,230.1,1.5\n"
JSON_HEADERS = {"Content-Type": "application/json"}
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=20)


def block(n: int) -> str:
    """A distinct one-row block per n (so resend detection does not hide a post)."""
    return f"Time,V,I\n2026-11-21 08:{n // 60:02d}:{n % 60:02d},230.{n},1.5\n"


def stored_files(tmp_path: Path) -> list[Path]:
    """Every stored data file, quarantine included."""
    data = tmp_path / "data"
    if not data.exists():
        return []
    return sorted(p for p in data.rglob("*") if p.suffix in (".csv", ".jsonl", ".gz"))


def device_rows(tmp_path: Path, device: str = DEVICE) -> list[str]:
    lines: list[str] = []
    for path in sorted((tmp_path / "data" / "wattmon" / device).glob("*.csv")):
        lines += path.read_text().splitlines()[1:]
    return lines


def stream_lines(tmp_path: Path, stream: str) -> list[dict]:
    folder = tmp_path / "data" / "json" / stream
    return [
        json.loads(line)
        for p in sorted(folder.glob("*.jsonl"))
        for line in p.read_text().splitlines()
    ]


def json_config(
    tmp_path: Path, *, server: dict | None = None, wattmon: dict | None = None, **json_settings
) -> Config:
    base = make_config(tmp_path / "data", server=server, wattmon=wattmon)
    return validate(dataclasses.replace(base, json=JsonConfig(**json_settings)))


async def post_block(client, mac: str = MAC, data: str = BLOCK, path: str = "/wattmon", **kwargs):
    resp = await client.post(
        path, data=wattmon_form(mac, data), headers={**FORM, **kwargs.pop("headers", {})}, **kwargs
    )
    return resp.status, await resp.text(), resp.headers


# -- shared token ------------------------------------------------------------------


def basic(user: str, password: str) -> dict[str, str]:
    raw = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


ACCEPTED = {
    "query": ("/wattmon?token=" + TOKEN, {}),
    "query-among-others": (f"/wattmon?a=1&token={TOKEN}&b=2", {}),
    "basic-password": ("/wattmon", basic("wattmon", TOKEN)),
    "basic-user-empty-password": ("/wattmon", basic(TOKEN, "")),
    "bearer": ("/wattmon", {"Authorization": f"Bearer {TOKEN}"}),
    "bearer-lowercase-scheme": ("/wattmon", {"Authorization": f"bearer {TOKEN}"}),
    "export-script-path": (f"/export-script.php?token={TOKEN}", {}),
}


@pytest.mark.parametrize("path,headers", ACCEPTED.values(), ids=ACCEPTED.keys())
async def test_token_accepted_as_query_basic_or_bearer(start_client, tmp_path, path, headers):
    client = await start_client(wattmon={"token": TOKEN})
    status, text, _ = await post_block(client, path=path, headers=headers)
    assert (status, text) == (200, "OK")
    assert device_rows(tmp_path) == ["2026-11-21 08:00:00,230.1,1.5"]


@pytest.mark.parametrize(
    "userinfo", [f"device:{TOKEN}", TOKEN], ids=["user-and-token", "token-as-user"]
)
async def test_token_in_device_url_userinfo(start_client, tmp_path, userinfo):
    """What a Wattmon configured with `http://user:token@host/wattmon` sends."""
    client = await start_client(wattmon={"token": TOKEN})
    url = f"http://{userinfo}@127.0.0.1:{client.server.port}/wattmon"
    async with (
        aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session,
        session.post(url, data=wattmon_form(MAC, BLOCK), headers=FORM) as resp,
    ):
        assert (resp.status, await resp.text()) == (200, "OK")
    assert len(device_rows(tmp_path)) == 1


REFUSED = {
    "missing": ("/wattmon", {}),
    "empty-query": ("/wattmon?token=", {}),
    "wrong-query": ("/wattmon?token=wrong", {}),
    "prefix-query": ("/wattmon?token=" + TOKEN[:-1], {}),
    "longer-query": ("/wattmon?token=" + TOKEN + "x", {}),
    "other-param-name": ("/wattmon?tok=" + TOKEN, {}),
    "wrong-bearer": ("/wattmon", {"Authorization": "Bearer wrong"}),
    "empty-bearer": ("/wattmon", {"Authorization": "Bearer"}),
    "unknown-scheme": ("/wattmon", {"Authorization": f"Token {TOKEN}"}),
    "raw-token-header": ("/wattmon", {"Authorization": TOKEN}),
    "wrong-basic-password": ("/wattmon", basic("wattmon", "wrong")),
    "token-as-user-wrong-password": ("/wattmon", basic(TOKEN, "wrong")),
    "basic-not-base64": ("/wattmon", {"Authorization": "Basic !!!not-base64!!!"}),
    "basic-not-utf8": (
        "/wattmon",
        {"Authorization": "Basic " + base64.b64encode(b"\xff:\xfe").decode()},
    ),
    "basic-empty": ("/wattmon", basic("", "")),
}


@pytest.mark.parametrize("path,headers", REFUSED.values(), ids=REFUSED.keys())
async def test_wrong_or_missing_token_is_401_and_nothing_stored(
    start_client, tmp_path, path, headers
):
    client = await start_client(wattmon={"token": TOKEN})
    status, text, resp_headers = await post_block(client, path=path, headers=headers)
    assert (status, text) == (401, "ERROR: unauthorized")
    assert "WWW-Authenticate" in resp_headers
    assert stored_files(tmp_path) == []


async def test_json_route_has_its_own_token(start_client, tmp_path):
    config = json_config(tmp_path, wattmon={"token": TOKEN}, token="json-secret")
    client = await start_client(config)
    ok = await client.post(
        "/mm-1", data=b'{"a":1}', headers={"Authorization": "Bearer json-secret"}
    )
    assert (ok.status, await ok.text()) == (200, "OK")
    # The Wattmon token does not open the JSON route, and the other way round.
    wrong = await client.post(f"/mm-1?token={TOKEN}", data=b'{"a":2}')
    assert wrong.status == 401
    assert (await wrong.text()).startswith("ERROR")
    assert "WWW-Authenticate" in wrong.headers
    missing = await client.post("/mm-1", data=b'{"a":3}')
    assert missing.status == 401
    status, _, _ = await post_block(client, path="/wattmon?token=json-secret")
    assert status == 401
    assert [line["body"] for line in stream_lines(tmp_path, "mm-1")] == [{"a": 1}]
    assert [p.parent.name for p in stored_files(tmp_path)] == ["mm-1"]


async def test_token_and_mac_list_from_files(start_client, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    macs_file = tmp_path / "macs"
    macs_file.write_text("# site A\n00-1A-2B-3C-4D-5E  # inverter\n\nAABBCCDDEEFF\n")
    config_file = write_config(
        tmp_path / "ingestd.toml",
        (
            f'[storage]\ndata_dir = "{tmp_path / "data"}"\n'
            f'[wattmon]\ntoken_file = "{token_file}"\nallowed_macs_file = "{macs_file}"\n'
        ),
    )
    config = await asyncio.to_thread(load_config, config_file)
    client = await start_client(config)
    assert (await post_block(client, path=f"/wattmon?token={TOKEN}"))[:2] == (200, "OK")
    status, text, _ = await post_block(
        client, mac="aa:bb:cc:dd:ee:ff", path=f"/wattmon?token={TOKEN}"
    )
    assert (status, text) == (200, "OK")
    assert (await post_block(client, path="/wattmon?token=" + TOKEN + "%0A"))[0] == 401
    status, text, _ = await post_block(client, mac=OTHER, path=f"/wattmon?token={TOKEN}")
    assert status == 403 and text.startswith("ERROR: ")
    assert sorted(p.parent.name for p in stored_files(tmp_path)) == [DEVICE, "aabbccddeeff"]


async def test_token_never_in_logs_or_metrics(start_client, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    config = json_config(tmp_path, wattmon={"token": TOKEN}, token=TOKEN)
    client = await start_client(config)
    await post_block(client, path=f"/wattmon?token={TOKEN}")
    await post_block(client, data=block(1), headers=basic("u", TOKEN))
    await post_block(client, data=block(2), headers={"Authorization": f"Bearer {TOKEN}"})
    # Refusals log a line each: none of them may carry what was offered.
    await client.post(
        f"/wattmon?token={TOKEN}", data=wattmon_form(MAC, BLOCK, md5="0" * 32), headers=FORM
    )
    await client.post(f"/bad%5cname?token={TOKEN}", data=b"{}")
    await client.post(f"/mm-1?token={TOKEN}", data=b"{not json")
    await client.post(f"/wattmon?token={TOKEN}x", data=wattmon_form(MAC, BLOCK), headers=FORM)
    await client.post("/wattmon", data=wattmon_form(MAC, BLOCK), headers=basic("u", TOKEN + "x"))
    metrics = await (await client.get("/metrics")).text()
    assert "ingestd_requests_total" in metrics
    assert TOKEN not in metrics
    # aiohttp's access log (on in the test server, off in the daemon, see
    # test_token_never_in_daemon_debug_log) logs request lines by design.
    records = [r for r in caplog.records if r.name != "aiohttp.access"]
    assert any("rejected" in r.getMessage() for r in records)
    encoded = base64.b64encode(f"u:{TOKEN}".encode()).decode()
    for record in records:
        text = record.getMessage() + repr(record.args)
        assert TOKEN not in text and encoded not in text, record.getMessage()


# -- allow-lists -------------------------------------------------------------------


async def test_allowed_macs_any_spelling_others_403(start_client, tmp_path):
    client = await start_client(
        wattmon={"allowed_macs": ("00-1A-2B-3C-4D-5E", "aa:bb:cc:dd:ee:ff")}
    )
    for spelling in ("001A2B3C4D5E", "00:1a:2b:3c:4d:5e", "00-1a-2B-3c-4D-5e"):
        status, text, _ = await post_block(client, mac=spelling)
        assert (status, text) == (200, "OK"), spelling
    assert (await post_block(client, mac="AA:BB:CC:DD:EE:FF"))[:2] == (200, "OK")
    status, text, _ = await post_block(client, mac=OTHER, data=block(7))
    assert status == 403 and text.startswith("ERROR: ")
    # A block that would be quarantined is refused as well, not kept.
    raw = b"\xff\xfe not utf-8\n"
    body = f"key={OTHER}&md5sum={hashlib.md5(raw).hexdigest()}&data=%FF%FE+not+utf-8%0A"
    resp = await client.post("/wattmon", data=body, headers=FORM)
    assert resp.status == 403 and (await resp.text()).startswith("ERROR: ")
    assert sorted(p.parent.name for p in stored_files(tmp_path)) == [DEVICE, "aabbccddeeff"]


@pytest.mark.parametrize(
    ("data", "md5"),
    [("", "auto"), ("Time,V\n", "auto"), ("Time,V\n\n", None), (BLOCK, "0" * 32)],
    ids=["empty", "header-only", "blank-rows-no-md5", "bad-md5"],
)
async def test_a_device_not_allowed_gets_403_whatever_it_posts(start_client, tmp_path, data, md5):
    """The allow-list is checked first: a post with no rows (which a known
    device gets OK for) or a refused block tells an unknown MAC nothing more."""
    client = await start_client(wattmon={"allowed_macs": (MAC,)})
    resp = await client.post("/wattmon", data=wattmon_form(OTHER, data, md5), headers=FORM)
    assert resp.status == 403 and (await resp.text()).startswith("ERROR: ")
    resp = await client.post("/wattmon", data=wattmon_form(MAC, data, md5), headers=FORM)
    assert resp.status == (400 if md5 == "0" * 32 else 200)
    devices = await (await client.get("/api/devices")).json()
    assert OTHER.replace(":", "").lower() not in {d["id"] for d in devices["devices"]}


async def test_allowed_streams_others_403(start_client, tmp_path):
    client = await start_client(json_config(tmp_path, allowed_streams=("mm-1", "site-a_mm-2")))
    for path in ("/mm-1", "/site-a/mm-2"):
        resp = await client.post(path, data=b'{"ok":true}', headers=JSON_HEADERS)
        assert (resp.status, await resp.text()) == (200, "OK"), path
    for path in ("/mm-3", "/mm-1/x", "/MM-1", "/mm-1-"):
        resp = await client.post(path, data=b'{"ok":false}', headers=JSON_HEADERS)
        assert resp.status == 403, path
        assert (await resp.text()).startswith("ERROR: ")
    assert sorted(p.parent.name for p in stored_files(tmp_path)) == ["mm-1", "site-a_mm-2"]


# -- client networks and proxies ---------------------------------------------------


async def test_allowed_networks_refuse_other_clients(start_client, tmp_path):
    config = json_config(
        tmp_path, wattmon={"allowed_networks": ("10.0.0.0/8",)}, allowed_networks=("10.0.0.0/8",)
    )
    client = await start_client(config)
    status, text, _ = await post_block(client)
    assert status == 403 and text.startswith("ERROR: ")
    resp = await client.post("/mm-1", data=b"{}")
    assert resp.status == 403 and (await resp.text()).startswith("ERROR: ")
    assert stored_files(tmp_path) == []


async def test_allowed_networks_is_per_route(start_client, tmp_path):
    client = await start_client(wattmon={"allowed_networks": ("10.0.0.0/8",)})
    assert (await post_block(client))[0] == 403
    resp = await client.post("/mm-1", data=b"{}")  # the JSON route is open
    assert resp.status == 200
    assert [p.parent.name for p in stored_files(tmp_path)] == ["mm-1"]


@pytest.mark.parametrize(
    "forwarded",
    ["10.1.2.3", "10.1.2.3, 127.0.0.1", "192.0.2.99, 10.1.2.3"],
    ids=["one-hop", "proxy-chain", "spoofed-first-hop"],
)
async def test_trusted_proxy_forwarded_for_is_the_client(start_client, tmp_path, forwarded):
    config = json_config(
        tmp_path,
        server={"trusted_proxies": ("127.0.0.1/32",)},
        wattmon={"allowed_networks": ("10.0.0.0/8",)},
        allowed_networks=("10.0.0.0/8",),
    )
    client = await start_client(config)
    resp = await client.post("/mm-1", data=b'{"a":1}', headers={"X-Forwarded-For": forwarded})
    assert (resp.status, await resp.text()) == (200, "OK")
    assert stream_lines(tmp_path, "mm-1")[0]["remote"] == "10.1.2.3"
    status, text, _ = await post_block(client, headers={"X-Forwarded-For": forwarded})
    assert (status, text) == (200, "OK")


async def test_proxy_appended_hop_outside_networks_is_refused(start_client, tmp_path):
    """The client forges `10.9.9.9`, the proxy appends the real address."""
    config = json_config(
        tmp_path, server={"trusted_proxies": ("127.0.0.1/32",)}, allowed_networks=("10.0.0.0/8",)
    )
    client = await start_client(config)
    resp = await client.post(
        "/mm-1", data=b"{}", headers={"X-Forwarded-For": "10.9.9.9, 192.0.2.7"}
    )
    assert resp.status == 403
    assert stored_files(tmp_path) == []


@pytest.mark.parametrize("trusted", [(), ("192.0.2.0/24",)], ids=["no-proxies", "other-proxy"])
async def test_forwarded_for_from_untrusted_peer_is_ignored(start_client, tmp_path, trusted):
    open_config = json_config(tmp_path, server={"trusted_proxies": trusted})
    client = await start_client(open_config)
    resp = await client.post("/mm-1", data=b'{"a":1}', headers={"X-Forwarded-For": "10.1.2.3"})
    assert resp.status == 200
    assert stream_lines(tmp_path, "mm-1")[0]["remote"] == "127.0.0.1"
    await client.close()

    closed = json_config(
        tmp_path,
        server={"trusted_proxies": trusted},
        wattmon={"allowed_networks": ("10.0.0.0/8",)},
        allowed_networks=("10.0.0.0/8",),
    )
    client = await start_client(closed)
    resp = await client.post("/mm-2", data=b"{}", headers={"X-Forwarded-For": "10.1.2.3"})
    assert resp.status == 403
    status, _, _ = await post_block(client, headers={"X-Forwarded-For": "10.1.2.3"})
    assert status == 403
    assert [p.parent.name for p in stored_files(tmp_path)] == ["mm-1"]


async def test_forged_forwarded_for_line_before_the_proxys_line_is_refused(start_client, tmp_path):
    config = json_config(
        tmp_path, server={"trusted_proxies": ("127.0.0.1/32",)}, allowed_networks=("10.0.0.0/8",)
    )
    client = await start_client(config)
    # Two header lines mean the same as one comma-joined line (RFC 9110 5.3):
    # "10.1.2.3, 192.0.2.7", whose last untrusted hop is 192.0.2.7.
    headers = CIMultiDict([("X-Forwarded-For", "10.1.2.3"), ("X-Forwarded-For", "192.0.2.7")])
    resp = await client.post("/mm-1", data=b"{}", headers=headers)
    assert resp.status == 403
    assert stored_files(tmp_path) == []


# -- rate limits -------------------------------------------------------------------


async def test_wattmon_rate_limit_per_device(start_client, tmp_path, clock):
    client = await start_client(wattmon={"rate_limit_per_min": 6, "rate_limit_burst": 2})
    assert (await post_block(client, data=block(1)))[:2] == (200, "OK")
    assert (await post_block(client, data=block(2)))[:2] == (200, "OK")
    status, text, headers = await post_block(client, data=block(3))
    assert status == 429
    assert text.startswith("ERROR")
    retry_after = int(headers["Retry-After"])
    assert retry_after >= 1
    assert retry_after == 10  # one token a 10 s at 6 a minute
    # Another device has its own bucket.
    assert (await post_block(client, mac=OTHER, data=block(4)))[:2] == (200, "OK")
    clock.now += retry_after - 1
    assert (await post_block(client, data=block(5)))[0] == 429
    clock.now += 1
    assert (await post_block(client, data=block(6)))[:2] == (200, "OK")
    assert (await post_block(client, data=block(7)))[0] == 429
    rows = device_rows(tmp_path)
    assert [row.split(",")[1] for row in rows] == ["230.1", "230.2", "230.6"]
    assert len(device_rows(tmp_path, OTHER)) == 1


async def test_json_rate_limit_per_stream(start_client, tmp_path, clock):
    client = await start_client(json_config(tmp_path, rate_limit_per_min=60, rate_limit_burst=1))
    assert (await client.post("/mm-1", data=b'{"n":1}')).status == 200
    refused = await client.post("/mm-1", data=b'{"n":2}')
    assert refused.status == 429
    assert (await refused.text()).startswith("ERROR")
    assert int(refused.headers["Retry-After"]) >= 1
    assert (await client.post("/mm-2", data=b'{"n":3}')).status == 200
    clock.now += int(refused.headers["Retry-After"])
    assert (await client.post("/mm-1", data=b'{"n":4}')).status == 200
    assert [line["body"]["n"] for line in stream_lines(tmp_path, "mm-1")] == [1, 4]


def test_a_peek_at_a_bucket_takes_no_token():
    """What a worker checks before a body for a stream it owns: refused only
    when `check` would refuse, and never counted (`check` after the body is)."""
    limiter = RateLimiter(per_min=1, burst=2)
    for _ in range(5):
        limiter.peek("mm-1", 1000.0)
    limiter.check("mm-1", 1000.0)
    limiter.check("mm-1", 1000.0)
    with pytest.raises(RateLimited) as peeked:
        limiter.peek("mm-1", 1000.0)
    with pytest.raises(RateLimited) as checked:
        limiter.check("mm-1", 1000.0)
    assert peeked.value.retry_after_secs == checked.value.retry_after_secs == 60
    assert peeked.value.device == "mm-1"
    limiter.peek("mm-1", 1060.0)  # refilled by one


def test_rate_limiter_stays_cheap_with_many_devices():
    """Past SWEEP_AT buckets none of which has refilled, a sweep frees
    nothing; the next waits until the table doubles, not the next check
    (each check swept the whole table once, ~40 ms here). Counted, not timed."""
    limiter = RateLimiter(per_min=1, burst=1)  # a bucket refills in 60 s
    sweeps: list[float] = []
    sweep = limiter._forget_full

    def counted(now: float) -> None:
        sweeps.append(now)
        sweep(now)

    limiter._forget_full = counted  # type: ignore[method-assign]
    for n in range(SWEEP_AT + 1):
        limiter.check(f"stream-{n}", 1000.0)
    assert sweeps == [1000.0]
    for n in range(1000):
        limiter.check(f"new-{n}", 1001.0)
    assert sweeps == [1000.0]
    assert len(limiter._buckets) == SWEEP_AT + 1001  # none had refilled: all kept


# -- size and shape limits ---------------------------------------------------------


async def chunks(body: bytes, size: int = 256):
    for start in range(0, len(body), size):
        yield body[start : start + size]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_over_max_body_bytes_is_413(start_client, tmp_path, chunked):
    client = await start_client(server={"max_body_bytes": 1024})
    form = wattmon_form(MAC, "Time,V\n" + "2026-11-21 08:00:00,1\n" * 100).encode()
    document = json.dumps({"pad": "x" * 2000}).encode()
    for path, body in (("/wattmon", form), ("/mm-1", document)):
        data = chunks(body) if chunked else body
        resp = await client.post(
            path, data=data, headers=FORM if path == "/wattmon" else JSON_HEADERS
        )
        assert resp.status == 413, path
        assert (await resp.text()).startswith("ERROR")
    assert stored_files(tmp_path) == []
    assert (await post_block(client))[:2] == (200, "OK")


async def test_csv_over_max_rows_or_columns_is_413(start_client, tmp_path):
    client = await start_client(wattmon={"max_rows": 3, "max_columns": 3})
    rows = "".join(f"2026-11-21 08:00:0{n},1,2\n" for n in range(4))
    for data in (
        "Time,A,B\n" + rows,
        "Time,A,B\r\n" + rows.replace("\n", "\r\n"),
        "Time,A,B,C\n2026-11-21 08:00:00,1,2,3\n",
    ):
        status, text, _ = await post_block(client, data=data)
        assert status == 413, data
        assert text.startswith("ERROR")
    assert stored_files(tmp_path) == []
    status, text, _ = await post_block(client, data="Time,A,B\n" + rows[: rows.rindex("2026")])
    assert (status, text) == (200, "OK")  # exactly at both limits
    assert len(device_rows(tmp_path)) == 3


async def test_json_deeper_than_max_depth_is_400(start_client, tmp_path):
    client = await start_client(json_config(tmp_path, max_depth=4))
    for body in (b"[[[[[1]]]]]", b'{"a":{"b":{"c":{"d":{"e":1}}}}}', b"[" * 100_000):
        resp = await client.post("/mm-1", data=body, headers=JSON_HEADERS)
        assert resp.status == 400, body[:20]
        assert (await resp.text()).startswith("ERROR")
    assert stored_files(tmp_path) == []
    for body in (b"[[[[1]]]]", b'{"s": "[[[[[[[[{{{{{{"}'):  # brackets inside strings do not count
        resp = await client.post("/mm-1", data=body, headers=JSON_HEADERS)
        assert resp.status == 200, body
    assert len(stream_lines(tmp_path, "mm-1")) == 2


# -- the real daemon: header limit, slow clients, its own log -----------------------


@contextlib.asynccontextmanager
async def running_daemon(tmp_path: Path, extra: str = ""):
    config = write_config(
        tmp_path / "ingestd.toml",
        (
            '[server]\nlisten = "127.0.0.1:0"\nkeepalive_timeout_secs = 1.0\n'
            f"body_timeout_secs = 1.0\nmax_header_bytes = 1024\n"
            f'[storage]\ndata_dir = "{tmp_path / "data"}"\n{extra}'
        ),
    )
    daemon = await DaemonProcess.start("--config", str(config))
    try:
        yield daemon
    finally:
        assert await daemon.stop() == 0


async def exchange(port: int, request: bytes) -> bytes:
    """Send `request` whole on a new connection; everything read until EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read()
    except ConnectionResetError:
        return b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def status_of(response: bytes) -> int | None:
    """The status code of the first response, None when the server just closed."""
    if not response:
        return None
    return int(response.split(b" ", 2)[1])


async def honest_post(url: str, mac: str = MAC, data: str = BLOCK) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session,
        session.post(f"{url}/wattmon", data=wattmon_form(mac, data), headers=FORM) as resp,
    ):
        return resp.status, await resp.text()


async def test_header_line_over_max_header_bytes_is_refused(tmp_path):
    form = wattmon_form(MAC, BLOCK).encode()

    def request(path: str = "/wattmon", pad: int = 10) -> bytes:
        return (
            f"POST {path} HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            f"X-Pad: {'p' * pad}\r\nContent-Length: {len(form)}\r\nConnection: close\r\n\r\n"
        ).encode() + form

    async with running_daemon(tmp_path) as daemon:
        for hostile in (request(pad=2000), request(path="/wattmon?x=" + "q" * 2000)):
            status = status_of(await exchange(daemon.port, hostile))
            assert status is None or 400 <= status < 500, status
        assert stored_files(tmp_path) == []
        assert status_of(await exchange(daemon.port, request(pad=900))) == 200
        assert await honest_post(daemon.url, data=block(2)) == (200, "OK")
    assert len(device_rows(tmp_path)) == 2


async def test_token_never_in_daemon_debug_log(tmp_path):
    extra = f'[wattmon]\ntoken = "{TOKEN}"\n[log]\nlevel = "debug"\n'
    async with (
        running_daemon(tmp_path, extra) as daemon,
        aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as session,
    ):
        for url, data in (
            (f"{daemon.url}/wattmon?token={TOKEN}", wattmon_form(MAC, BLOCK)),
            (f"{daemon.url}/wattmon?token={TOKEN}", wattmon_form(MAC, BLOCK, md5="0" * 32)),
            (f"http://u:{TOKEN}@127.0.0.1:{daemon.port}/wattmon", wattmon_form(MAC, block(1))),
            (f"{daemon.url}/wattmon?token={TOKEN}-wrong", wattmon_form(MAC, block(2))),
        ):
            async with session.post(url, data=data, headers=FORM) as resp:
                assert resp.status in (200, 400, 401)
        async with session.get(f"{daemon.url}/metrics") as resp:
            assert TOKEN not in await resp.text()
    assert any("rejected" in line for line in daemon.lines)
    assert not [line for line in daemon.lines if TOKEN in line]


async def trickle_headers(port: int, give_up: float) -> tuple[bool, bytes]:
    """Send request headers a byte at a time; (closed by the server, what it sent)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = b"POST /wattmon HTTP/1.1\r\nHost: collector\r\nX-Slow: " + b"s" * 400 + b"\r\n"

    async def dribble() -> None:
        for byte in request:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)

    sender = asyncio.create_task(dribble())
    try:
        async with asyncio.timeout_at(give_up):
            received = await reader.read()  # b"" or a refusal, then EOF
        return True, received
    except TimeoutError:
        return False, b""
    except ConnectionResetError:
        return True, b""
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sender
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_slow_header_clients_are_cut_and_devices_still_served(tmp_path):
    async with running_daemon(tmp_path) as daemon:
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 1.0 + 8.0  # the timeout, and then some
        slow = [asyncio.create_task(trickle_headers(daemon.port, give_up)) for _ in range(200)]
        await asyncio.sleep(0.2)  # every slow connection is open and dribbling
        assert not any(task.done() for task in slow)
        async with asyncio.timeout(15):
            assert await honest_post(daemon.url) == (200, "OK")
        results = await asyncio.gather(*slow)
        assert all(closed for closed, _ in results), sum(not closed for closed, _ in results)
        for _, received in results:
            status = status_of(received)
            assert status is None or 400 <= status < 500, received[:80]
        assert await honest_post(daemon.url, data=block(3)) == (200, "OK")
    assert len(device_rows(tmp_path)) == 2


async def trickle_body(port: int, path: str, body: bytes) -> bytes:
    """Headers at once, then the body a byte every 50 ms; what the server answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: collector\r\n"
        f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    writer.write(head)

    async def dribble() -> None:
        for byte in body:
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)

    sender = asyncio.create_task(dribble())
    try:
        async with asyncio.timeout(10):
            answer = await reader.readuntil(b"\r\n\r\n")
            length = int(
                next(
                    line.split(b":")[1]
                    for line in answer.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
            )
            return answer + await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionResetError):
        return b""  # closed without an answer: also a refusal
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sender
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_slow_body_is_408_and_nothing_stored(tmp_path):
    form = wattmon_form(MAC, BLOCK)
    form = (form + "&pad=" + "x" * (1000 - len(form) - 5)).encode()
    document = json.dumps({"pad": "x" * (1000 - 11)}).encode()
    assert len(form) == len(document) == 1000  # whole, each would be stored
    async with running_daemon(tmp_path) as daemon:
        answers = await asyncio.gather(
            trickle_body(daemon.port, "/wattmon", form),
            trickle_body(daemon.port, "/mm-1", document),
        )
        for answer in answers:
            assert answer == b"" or status_of(answer) == 408, answer[:80]
            assert answer == b"" or answer.endswith(b"\r\n\r\nERROR: request body too slow")
        assert stored_files(tmp_path) == []
        assert await honest_post(daemon.url) == (200, "OK")
    assert [p.parent.name for p in stored_files(tmp_path)] == [DEVICE]
