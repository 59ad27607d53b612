"""Command line: `ingestd serve`, `ingestd check-config`, `ingestd --version`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

import uvloop
from aiohttp import web

from ingestd import __version__
from ingestd.app import make_app
from ingestd.config import Config, ConfigError, load_config, parse_listen, with_overrides
from ingestd.logs import setup_logging

log = logging.getLogger("ingestd")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ingestd", description="Durable HTTP receiver for device telemetry."
    )
    parser.add_argument("--version", action="version", version=f"ingestd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", help="TOML config file (default: built-in defaults)")
    serve.add_argument("--listen", help="HOST:PORT to listen on (overrides server.listen)")
    serve.add_argument("--data-dir", help="where data is stored (overrides storage.data_dir)")
    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file")
    args = parser.parse_args(argv)

    if args.command == "check-config":
        try:
            load_config(args.file)
        except ConfigError as exc:
            print(f"ingestd: {exc}", file=sys.stderr)
            return 2
        print(f"{args.file}: OK")
        return 0

    try:
        config = with_overrides(
            load_config(args.config), listen=args.listen, data_dir=args.data_dir
        )
    except ConfigError as exc:
        print(f"ingestd: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log.level, config.log.format)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve_forever(config))


async def serve_forever(config: Config) -> int:
    """Serve until SIGTERM or SIGINT, then drain; a second SIGINT exits at once."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set() and signum == signal.SIGINT:
            log.error("forced_exit: second SIGINT, queued records are not stored")
            os._exit(1)
        log.info("stopping signal=%s", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    runner = web.AppRunner(
        make_app(config),
        handle_signals=False,
        access_log=None,
        shutdown_timeout=config.server.shutdown_timeout_secs,
    )
    try:
        await runner.setup()
    except OSError as exc:
        log.error("storage_unusable data_dir=%s error=%s", ascii(str(config.data_dir)), exc)
        return 1
    host, port = parse_listen(config.server.listen)
    site = web.TCPSite(runner, host, port, backlog=2048)
    try:
        await site.start()
    except OSError as exc:
        log.error("listen_failed address=%s error=%s", config.server.listen, exc.strerror)
        await runner.cleanup()
        return 1
    for address in runner.addresses:
        log.info("listening address=%s data_dir=%s", _address(address), config.data_dir)
    await stop.wait()
    await runner.cleanup()
    log.info("stopped: all queued records stored, files closed")
    return 0


def _address(address: object) -> str:
    if isinstance(address, tuple):
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(address)
