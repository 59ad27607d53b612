"""Command line: `ingestd serve`, `ingestd check-config`, `ingestd --version`."""

from __future__ import annotations

import argparse
import asyncio
import sys

import uvloop

from ingestd import __version__
from ingestd.config import Config, ConfigError, load_config, with_overrides
from ingestd.runtime.daemon import Daemon
from ingestd.runtime.logs import setup_logging


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # The tools are imported only when chosen: `ingestd serve` need not load
    # nats-py (export) nor the simulator. The top level takes no option with a
    # value, so the first word that is not an option is the command.
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
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
    simulate = commands.add_parser(
        "simulate",
        help="emulate a fleet of devices posting to a collector",
        description="Emulate a fleet of Wattmon loggers or JSON pushers posting to URL, "
        "with optional faults, and print a summary.",
    )
    if chosen == "simulate":
        from ingestd.tools.simulate import add_arguments as add_simulate_arguments

        add_simulate_arguments(simulate)
    export = commands.add_parser(
        "export",
        help="rebuild the per-device files from the JetStream stream",
        description="Read ingestd's JetStream stream back and write the per-device files "
        "under --out, as the file sink would.",
    )
    if chosen == "export":
        from ingestd.tools.export import add_arguments as add_export_arguments

        add_export_arguments(export)
    quarantined = commands.add_parser(
        "quarantine",
        help="list quarantined Wattmon blocks, or post one again once fixed",
    )
    if chosen == "quarantine":
        from ingestd.tools.quarantine import add_arguments as add_quarantine_arguments

        add_quarantine_arguments(quarantined)
    args = parser.parse_args(argv)

    if args.command == "quarantine":
        from ingestd.tools.quarantine import command as run_quarantine

        return run_quarantine(args)

    if args.command == "export":
        from ingestd.tools.export import command as run_export

        return run_export(args)

    if args.command == "simulate":
        from ingestd.tools.simulate import run as run_simulation

        return run_simulation(args)

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

    def reload() -> Config:
        return with_overrides(load_config(args.config), listen=args.listen, data_dir=args.data_dir)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        serve_args = [
            *(["--config", args.config] if args.config else []),
            *(["--listen", args.listen] if args.listen else []),
            *(["--data-dir", args.data_dir] if args.data_dir else []),
        ]
        return runner.run(Daemon(config, reload, serve_args).run())
