"""The fleet view: GET /api/devices (JSON) and the status page.

Placeholder: being written (issue 8).
"""

from __future__ import annotations

from aiohttp import web


async def api_devices(request: web.Request) -> web.Response:
    raise web.HTTPNotFound()


async def status_page(request: web.Request) -> web.Response:
    raise web.HTTPNotFound()
