"""Read the JetStream stream back into the file layout: `python -m ingestd.tools.export`.

Each message becomes the record ingestd received, written by the file sink
itself, so a central box gets the same files a single collector with
`sink = "file"` would have written: `wattmon/<mac>/<day>.csv` with one header
per file, `json/<stream>/<day>.jsonl`, rotation by period and size, and
`quarantine/...`. Resends that are in the stream twice (outside the server's
duplicate window) are stored once, as the file sink would.

Messages are acknowledged after the file sink stored them; with `--durable`
the consumer remembers its place, so a restart goes on where it stopped.
Without `--follow` it stops once it has caught up with the stream.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import logging
import re
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import uvloop
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from ingestd.config import (
    Config,
    ConfigError,
    JetStreamConfig,
    LogConfig,
    StorageConfig,
    load_config,
)
from ingestd.errors import IngestError
from ingestd.records import Outcome, Quarantined, Record
from ingestd.runtime.logs import setup_logging
from ingestd.sinks.file.sink import FileSink
from ingestd.sinks.jetstream import codec
from ingestd.sinks.jetstream import sink as js_sink

log = logging.getLogger("ingestd.export")

_KEY = re.compile(r"[0-9a-f]{32}")
FETCH_TIMEOUT_SECS = 1.0
EPHEMERAL_INACTIVE_SECS = 300.0


class ExportError(Exception):
    """The export cannot go on; the message says why."""


@dataclass(frozen=True, slots=True)
class ExportOptions:
    out: Path
    jetstream: JetStreamConfig = field(default_factory=JetStreamConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    since: datetime.datetime | None = None
    from_seq: int | None = None
    durable: str | None = None
    follow: bool = False
    batch: int = 512
    log: LogConfig = field(default_factory=LogConfig)


@dataclass(slots=True)
class ExportSummary:
    messages: int = 0
    stored: int = 0
    duplicates: int = 0
    quarantined: int = 0
    skipped: int = 0
    last_seq: int = 0


def record_from(msg: Msg) -> Record | Quarantined:
    """The record a message carries; ValueError if it is not one of ours."""
    return codec.record_from(msg.headers, msg.data)


async def export(options: ExportOptions, stop: asyncio.Event | None = None) -> ExportSummary:
    """Copy the stream into files under `options.out`; see the module doc."""
    stop = stop or asyncio.Event()
    cfg = options.jetstream
    nc = await nats.connect(
        **await js_sink.connect_options(cfg),
        name="ingestd-export",
        allow_reconnect=True,
        # Following: ride out server restarts. Once: give up after a retry.
        max_reconnect_attempts=-1 if options.follow else 1,
        reconnect_time_wait=cfg.reconnect_wait_secs,
    )
    try:
        js = nc.jetstream(timeout=cfg.publish_timeout_secs)
        sub, pending = await _consumer(js, options)
        summary = ExportSummary()
        if pending == 0 and not options.follow:
            log.info("export_done messages=0: nothing to export")
            return summary
        storage = dataclasses.replace(options.storage, data_dir=str(options.out))
        sink = FileSink(options.out, storage)
        await sink.open()
        try:
            await _copy(sub, sink, options, summary, stop)
        finally:
            await sink.close()
        log.info(
            "export_done messages=%d stored=%d duplicates=%d quarantined=%d skipped=%d last_seq=%d",
            summary.messages,
            summary.stored,
            summary.duplicates,
            summary.quarantined,
            summary.skipped,
            summary.last_seq,
        )
        return summary
    finally:
        with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
            async with asyncio.timeout(5):
                await nc.close()


async def _consumer(
    js: JetStreamContext, options: ExportOptions
) -> tuple[JetStreamContext.PullSubscription, int]:
    """A pull consumer on the whole stream; and how many messages it has to go."""
    stream = options.jetstream.stream
    config = ConsumerConfig(ack_policy=AckPolicy.ALL, max_ack_pending=-1)
    if options.from_seq is not None:
        config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = options.from_seq
    elif options.since is not None:
        config.deliver_policy = DeliverPolicy.BY_START_TIME
        config.opt_start_time = options.since
    try:
        if options.durable:
            try:
                info = await js.consumer_info(stream, options.durable)
                log.info("export_resuming durable=%s", options.durable)
            except nats.js.errors.NotFoundError:
                config.durable_name = options.durable
                info = await js.add_consumer(stream, config)
        else:
            config.inactive_threshold = EPHEMERAL_INACTIVE_SECS
            info = await js.add_consumer(stream, config)
    except nats.js.errors.NotFoundError as exc:
        raise ExportError(f"stream {stream} not found") from exc
    sub = await js.pull_subscribe_bind(consumer=info.name, stream=stream)
    return sub, info.num_pending + info.num_ack_pending


async def _copy(
    sub: JetStreamContext.PullSubscription,
    sink: FileSink,
    options: ExportOptions,
    summary: ExportSummary,
    stop: asyncio.Event,
) -> None:
    while not stop.is_set():
        try:
            msgs = await sub.fetch(options.batch, timeout=FETCH_TIMEOUT_SECS)
        except nats.errors.TimeoutError:
            if options.follow:
                continue
            info = await sub.consumer_info()
            if info.num_pending == 0 and info.num_ack_pending == 0:
                return
            continue
        records: list[Record | Quarantined] = []
        for msg in msgs:
            try:
                records.append(record_from(msg))
            except ValueError as exc:
                summary.skipped += 1
                log.warning(
                    "export_skipped seq=%d subject=%s error=%s",
                    msg.metadata.sequence.stream,
                    msg.subject,
                    exc,
                )
        results = await sink.commit(records) if records else []
        for result in results:
            if isinstance(result, IngestError):
                # Not acknowledged: a durable consumer resumes here next time.
                raise ExportError(f"storing failed: {result.message}")
            if result is Outcome.STORED:
                summary.stored += 1
            elif result is Outcome.DUPLICATE:
                summary.duplicates += 1
            elif result is Outcome.QUARANTINED:
                summary.quarantined += 1
        last = msgs[-1]
        await last.ack_sync()  # AckPolicy.ALL: every message up to this one
        summary.messages += len(msgs)
        summary.last_seq = last.metadata.sequence.stream
        if not options.follow and last.metadata.num_pending == 0:
            return


# -- command line ------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="directory to write the files under")
    parser.add_argument(
        "--config",
        help="ingestd TOML config: [jetstream] for servers and credentials, [storage] "
        "for rotation (use the collectors' settings to get the same files)",
    )
    parser.add_argument("--servers", help="comma-separated NATS URLs (overrides the config)")
    parser.add_argument("--stream", help="stream name (overrides the config; default INGESTD)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument(
        "--since",
        help="start at messages stored at or after this UTC time "
        "(2026-11-21 or 2026-11-21T08:00:00Z)",
    )
    start.add_argument("--from-seq", type=int, help="start at this stream sequence")
    parser.add_argument(
        "--durable",
        help="durable consumer name: remembers its place, so the next run goes on from there "
        "(--since/--from-seq apply only when it is created)",
    )
    parser.add_argument(
        "--follow", action="store_true", help="keep consuming new messages (until SIGTERM/SIGINT)"
    )
    parser.add_argument("--batch", type=int, default=512, help="messages per fetch and commit")


def options_from(args: argparse.Namespace) -> ExportOptions:
    config = load_config(args.config) if args.config else Config()
    jetstream = config.jetstream
    if args.servers:
        servers = tuple(s.strip() for s in args.servers.split(",") if s.strip())
        jetstream = dataclasses.replace(jetstream, servers=servers)
    if args.stream:
        jetstream = dataclasses.replace(jetstream, stream=args.stream)
    since = None
    if args.since:
        try:
            since = datetime.datetime.fromisoformat(args.since.replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(f"--since: not an ISO 8601 time: {args.since!r}") from None
        if since.tzinfo is None:
            since = since.replace(tzinfo=datetime.UTC)
    if args.from_seq is not None and args.from_seq < 1:
        raise ConfigError("--from-seq: must be 1 or more")
    if args.batch < 1:
        raise ConfigError("--batch: must be 1 or more")
    return ExportOptions(
        out=Path(args.out),
        jetstream=jetstream,
        storage=config.storage,
        since=since,
        from_seq=args.from_seq,
        durable=args.durable,
        follow=args.follow,
        batch=args.batch,
        log=config.log,
    )


async def _main(options: ExportOptions) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await export(options, stop)
    except (ExportError, nats.errors.Error, OSError) as exc:
        log.error("export_failed error=%s", exc)
        return 1
    return 0


def command(args: argparse.Namespace) -> int:
    """`ingestd export ...`, once `add_arguments` built the parser."""
    try:
        options = options_from(args)
    except ConfigError as exc:
        print(f"ingestd export: {exc}", file=sys.stderr)
        return 2
    setup_logging(options.log.level, options.log.format)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_main(options))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ingestd export",
        description="Rebuild ingestd's per-device files from its JetStream stream.",
    )
    add_arguments(parser)
    return command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
