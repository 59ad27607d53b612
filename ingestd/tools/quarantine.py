"""Quarantined Wattmon blocks: list them, and post one again once fixed.

The file sink keeps a block that passed MD5 but is not valid CSV verbatim
(the layout: ingestd.sinks.file.quarantine; docs/operations.md, "Replaying
a quarantined block"). `list` prints them; `replay` posts a block as its
device would, and once the collector answers `OK` marks it replayed, so it
is no longer listed or counted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ingestd.errors import IngestError
from ingestd.protocols import wattmon
from ingestd.protocols.registry import valid_id
from ingestd.records import Quarantined
from ingestd.sinks.file.quarantine import block_path, list_blocks, mark_replayed, protocol_folder

PROTOCOL = "wattmon"


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
            names = sorted(os.listdir(protocol_folder(data_dir, PROTOCOL)))
        except FileNotFoundError:
            names = []
        macs = [name for name in names if valid_id(PROTOCOL, name)]
    for mac in macs:
        for block in list_blocks(data_dir, mac, PROTOCOL, limit=sys.maxsize):
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
        path = block_path(data_dir, mac, name, PROTOCOL)
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
