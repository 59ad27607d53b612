"""Quarantined Wattmon blocks: list them, and post one again once fixed.

The file sink keeps a block that passed MD5 but is not valid CSV verbatim
as `quarantine/wattmon/<mac>/<md5>.csv`, with `<md5>.json` saying why
(docs/operations.md, "Replaying a quarantined block"). Listing reads those files
(blocking: run it in a thread). `replay` posts a block as its device would;
once the collector answers `OK`, the block is renamed `<md5>.csv.replayed`,
so it is no longer listed or counted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ingestd.errors import IngestError
from ingestd.protocols import wattmon
from ingestd.records import Quarantined
from ingestd.sinks.file.reader import valid_id

PROTOCOL = "wattmon"
REPLAYED = ".replayed"
# `<md5>`, or `<received_at>` with 6 decimals for a block sent without one.
_BLOCK_NAME = re.compile(r"[0-9a-f]{32}|\d{1,12}\.\d{6}", re.ASCII)
MAX_REASON_CHARS = 500


@dataclass(frozen=True, slots=True)
class QuarantinedBlock:
    device_id: str
    name: str  # the block's MD5 (its file is `<name>.csv`)
    received_at: str | None
    reason: str | None
    bytes: int
    mtime: float


def folder(data_dir: Path | str, device_id: str, protocol: str = PROTOCOL) -> Path:
    """`quarantine/<protocol>/<device id>/` (Wattmon's unless told)."""
    if not valid_id(protocol, device_id):
        raise ValueError("not a device id")
    return Path(data_dir) / "quarantine" / protocol / device_id


def block_path(data_dir: Path | str, device_id: str, name: str) -> Path:
    """The block's `.csv`; ValueError for a name the sink never makes."""
    if not _BLOCK_NAME.fullmatch(name):
        raise ValueError("not a quarantined block's name")
    return folder(data_dir, device_id) / f"{name}.csv"


def list_blocks(
    data_dir: Path | str, device_id: str, limit: int = 100, protocol: str = PROTOCOL
) -> list[QuarantinedBlock]:
    """A device's quarantined blocks not yet replayed, newest first (blocking)."""
    where = folder(data_dir, device_id, protocol)
    try:
        entries = [e for e in os.scandir(where) if e.name.endswith(".csv")]
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for entry in entries:
        name = entry.name[: -len(".csv")]
        if not _BLOCK_NAME.fullmatch(name):
            continue
        try:
            stat = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        found.append((stat.st_mtime, name, stat.st_size))
    found.sort(reverse=True)
    blocks = []
    for mtime, name, size in found[:limit]:
        meta = _meta(where / f"{name}.json")
        reason = meta.get("reason")
        received = meta.get("received_at")
        blocks.append(
            QuarantinedBlock(
                device_id,
                name,
                received if isinstance(received, str) else None,
                reason[:MAX_REASON_CHARS] if isinstance(reason, str) else None,
                size,
                mtime,
            )
        )
    return blocks


def _meta(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            meta = json.loads(fh.read(64 * 1024))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def form_body(device_id: str, data: bytes) -> bytes:
    """The urlencoded post a Wattmon device sends for this block."""
    md5 = hashlib.md5(data).hexdigest()  # the protocol's checksum, not security
    return urllib.parse.urlencode({"key": device_id, "md5sum": md5, "data": data}).encode()


def check_block(device_id: str, data: bytes, now: float) -> str | None:
    """Why the block would be quarantined again, or None if it is valid now."""
    try:
        parsed = wattmon.parse(
            form_body(device_id, data),
            "application/x-www-form-urlencoded",
            received_at=now,
            require_md5=True,
        )
    except IngestError as exc:
        return exc.message
    return parsed.reason if isinstance(parsed, Quarantined) else None


def mark_replayed(path: Path) -> None:
    os.replace(path, path.with_name(path.name + REPLAYED))


# -- ingestd quarantine list|replay ------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="list quarantined blocks, newest first")
    listing.add_argument("mac", nargs="?", help="only this device")
    replay = actions.add_parser(
        "replay", help="post a quarantined block again (after fixing its file)"
    )
    replay.add_argument("mac")
    replay.add_argument("md5", help="the block's name (its file is <md5>.csv)")
    replay.add_argument(
        "--url", default="http://127.0.0.1:8080/wattmon", help="the collector's Wattmon URL"
    )
    replay.add_argument("--token", default="", help="[wattmon] token, if one is set")
    for sub in (listing, replay):
        sub.add_argument("--data-dir", help="the data directory (default: from --config)")
        sub.add_argument("--config", help="TOML config file naming storage.data_dir")


def command(args: argparse.Namespace) -> int:
    from ingestd.config import ConfigError, load_config  # config imports the parsers

    data_dir = args.data_dir
    if data_dir is None:
        try:
            data_dir = load_config(args.config).storage.data_dir
        except ConfigError as exc:
            print(f"ingestd: {exc}", file=sys.stderr)
            return 2
    if args.action == "list":
        return _list(Path(data_dir), args.mac)
    return _replay(Path(data_dir), args.mac, args.md5, args.url, args.token)


def _mac(text: str) -> str | None:
    try:
        return wattmon.normalise_mac(text.encode())
    except IngestError:
        print(f"ingestd: {text!r} is not a MAC address", file=sys.stderr)
        return None


def _list(data_dir: Path, mac_text: str | None) -> int:
    if mac_text is not None:
        mac = _mac(mac_text)
        if mac is None:
            return 2
        macs = [mac]
    else:
        try:
            names = sorted(os.listdir(data_dir / "quarantine" / PROTOCOL))
        except FileNotFoundError:
            names = []
        macs = [name for name in names if valid_id(PROTOCOL, name)]
    for mac in macs:
        for block in list_blocks(data_dir, mac, limit=sys.maxsize):
            print(
                f"{mac} {block.name} {block.received_at or '-'} {block.bytes} "
                f"{json.dumps(block.reason)}"
            )
    return 0


def _replay(data_dir: Path, mac_text: str, name: str, url: str, token: str) -> int:
    import time

    mac = _mac(mac_text)
    if mac is None:
        return 2
    try:
        path = block_path(data_dir, mac, name)
        with open(path, "rb") as fh:
            data = fh.read()
    except (ValueError, OSError) as exc:
        print(f"ingestd: no quarantined block {name!r} for {mac}: {exc}", file=sys.stderr)
        return 1
    reason = check_block(mac, data, time.time())
    if reason is not None:
        print(f"ingestd: still not a valid block ({reason}); fix {path} first", file=sys.stderr)
        return 1
    request = urllib.request.Request(
        url,
        data=form_body(mac, data),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        method="POST",
    )
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = response.read(200).decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        answer = exc.read(200).decode("utf-8", "replace")
    except OSError as exc:
        print(f"ingestd: cannot reach {url}: {exc}", file=sys.stderr)
        return 1
    if answer != "OK":
        print(f"ingestd: the collector answered {answer!r}; block kept", file=sys.stderr)
        return 1
    mark_replayed(path)
    print(f"replayed {mac} {name}")
    return 0
