"""A toy receiver for validating the harness: stores each POST body in a file
of its own, fsyncs the file and (with --sync-dir) its directory, then answers
OK. Without --sync-dir its files are durable only where a filesystem commits
new directory entries with a file's fsync, which strict POSIX does not.

    python toy_receiver.py DIR [--sync-dir]    (prints the port it listens on)
"""

from __future__ import annotations

import argparse
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dir", type=Path)
    parser.add_argument("--sync-dir", action="store_true")
    args = parser.parse_args()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            name = body.decode("ascii")
            assert name.isalnum()
            with open(args.dir / name, "wb") as fh:
                fh.write(body)
                fh.flush()
                os.fsync(fh.fileno())
            if args.sync_dir:
                fd = os.open(args.dir, os.O_RDONLY | os.O_DIRECTORY)
                os.fsync(fd)
                os.close(fd)
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, format: str, *fields: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
