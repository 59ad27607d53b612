"""The HTTP floor: what one Python core answers when a request costs nothing.

    python3 bench/floor_server.py PORT

uvloop and a bare asyncio.Protocol that finds each request's end by its
Content-Length and answers `OK`, reading nothing else. It is not a server
(no validation, no limits); it measures how much of a core the HTTP
exchange itself takes in Python here, the share no receiver can avoid, as
the issue's "nginx answering 200" row does for nginx.
"""

from __future__ import annotations

import asyncio
import re
import sys

import uvloop

_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)
_CLOSE = re.compile(rb"\r\nconnection:\s*close", re.IGNORECASE)
OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 2\r\n\r\nOK"
OK_CLOSE = OK.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")


class Floor(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        data = self.buffer + data
        while True:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                break
            head = data[:end]
            length = _LENGTH.search(head)
            stop = end + 4 + (int(length[1]) if length else 0)
            if len(data) < stop:
                break
            data = data[stop:]
            if _CLOSE.search(head):
                self.transport.write(OK_CLOSE)
                self.transport.close()
                return
            self.transport.write(OK)
        self.buffer = data


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Floor, "127.0.0.1", port, backlog=1024)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1])))
