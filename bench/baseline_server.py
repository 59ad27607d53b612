"""The baseline: a bare aiohttp + uvloop handler that stores nothing.

    python3 bench/baseline_server.py PORT

Wattmon: `await request.post()`, MD5 check, answer OK. JSON: parse the body
with `await request.json()`, answer OK. The issue's reference figures were
measured against exactly this.
"""

from __future__ import annotations

import hashlib
import sys

import uvloop
from aiohttp import web


async def wattmon(request: web.Request) -> web.Response:
    form = await request.post()
    data = form.get("data", "")
    md5 = form.get("md5sum", "")
    raw = data.encode() if isinstance(data, str) else b""
    if md5 and hashlib.md5(raw).hexdigest() != md5:
        return web.Response(status=400, text="ERROR: MD5 sum mismatch")
    return web.Response(text="OK")


async def json_doc(request: web.Request) -> web.Response:
    await request.json()
    return web.Response(text="OK")


def main() -> None:
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_post("/wattmon", wattmon)
    app.router.add_post("/{stream:.*}", json_doc)
    web.run_app(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
