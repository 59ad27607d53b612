"""JSON documents POSTed to a path naming their stream."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

JSON = {"Content-Type": "application/json"}
DOC = {"interfaces": [{"name": "eth0", "rx": 1, "tx": 2}, {"name": "eth1", "rx": 3}]}


def stream_file(tmp_path: Path, stream: str) -> Path:
    return tmp_path / "data" / "json" / stream / "2026-11-21.jsonl"


def all_files(tmp_path: Path) -> list[Path]:
    return [p for p in tmp_path.rglob("*") if p.is_file() and not p.name.startswith(".")]


async def test_document_is_stored_as_one_json_line(client, tmp_path):
    body = json.dumps(DOC, indent=2)  # newlines inside: still one line stored
    resp = await client.post("/interface-stats-for-mm-1234", data=body, headers=JSON)
    assert (resp.status, await resp.text()) == (200, "OK")
    lines = stream_file(tmp_path, "interface-stats-for-mm-1234").read_text().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry == {
        "received_at": "2026-11-21T08:00:00.000Z",
        "remote": "127.0.0.1",
        "path": "/interface-stats-for-mm-1234",
        "body": DOC,
    }


async def test_nested_path_becomes_underscored_stream(client, tmp_path):
    resp = await client.post("/site-a/mm-1/ifstats", data=b"[1,2]")
    assert resp.status == 200
    assert json.loads(stream_file(tmp_path, "site-a_mm-1_ifstats").read_text())["body"] == [1, 2]


async def test_documents_append_in_order(client, tmp_path):
    for i in range(5):
        assert (await client.post("/s", data=json.dumps({"i": i}))).status == 200
    lines = stream_file(tmp_path, "s").read_text().splitlines()
    assert [json.loads(line)["body"]["i"] for line in lines] == list(range(5))


@pytest.mark.parametrize(
    "body", [b"", b"{", b"{'a': 1}", b"NaN", b'{"a": Infinity}', b"\xff\xfe{}", b"[" * 5000]
)
async def test_malformed_json_is_400_and_nothing_stored(client, tmp_path, body):
    resp = await client.post("/stream", data=body, headers=JSON)
    assert resp.status == 400
    assert (await resp.text()).startswith("ERROR: ")
    assert all_files(tmp_path) == []


@pytest.mark.parametrize(
    "path",
    [
        # "/" is reserved, not a bad name: 405 (tests/test_reserved_paths.py).
        "/.hidden",
        "/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/..%2f..%2ftmp",
        "/a%00b",
        "/a%5cb",
        "/" + "a" * 129,
        "/spaces%20here",
        "/caf%C3%A9",
    ],
)
async def test_bad_stream_names_are_400_and_nothing_leaves_data_dir(client, tmp_path, path):
    resp = await client.post(path, data=b"{}", headers=JSON)
    assert resp.status == 400
    assert (await resp.text()).startswith("ERROR: ")
    assert all_files(tmp_path) == []


async def test_longest_allowed_stream_name_is_accepted(client, tmp_path):
    name = "a" * 128
    assert (await client.post("/" + name, data=b"{}")).status == 200
    assert stream_file(tmp_path, name).exists()


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
async def test_other_methods_are_405(client, method):
    resp = await client.request(method, "/stream")
    assert resp.status == 405
    assert resp.headers["Allow"] == "POST"


async def test_body_over_limit_is_413(start_client, tmp_path):
    client = await start_client(server={"max_body_bytes": 100})
    resp = await client.post("/stream", data=json.dumps({"x": "y" * 200}))
    assert resp.status == 413
    assert (await resp.text()).startswith("ERROR")
    assert all_files(tmp_path) == []


async def test_idempotency_key_stores_a_resend_once(client, tmp_path):
    for _ in range(3):
        resp = await client.post("/s", data=b"{}", headers={"Idempotency-Key": "abc-1"})
        assert resp.status == 200
    resp = await client.post("/s", data=b"{}", headers={"Idempotency-Key": "abc-2"})
    assert resp.status == 200
    assert len(stream_file(tmp_path, "s").read_text().splitlines()) == 2
