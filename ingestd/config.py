"""Settings: frozen dataclasses read from TOML; unknown keys are errors.

Every setting has a default, so an empty file (or none) is a working config.
Each registered protocol (ingestd.protocols.registry) has a section named
after it, of its own dataclass (`WattmonConfig` in protocols/wattmon.py);
the shared pieces (`RouteAccess`, `ConfigError`, the reserved paths) are in
the leaf `ingestd.settings`. All of them can be imported from here too.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import ipaddress
import math
import os
import re
import ssl
import tomllib
import types
import typing
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ingestd.protocols.jsonpost import JsonConfig as JsonConfig
from ingestd.protocols.registry import PROTOCOLS
from ingestd.protocols.wattmon import WattmonConfig as WattmonConfig
from ingestd.runtime.tls import server_context
from ingestd.settings import RESERVED_PATHS as RESERVED_PATHS
from ingestd.settings import RESERVED_PREFIXES as RESERVED_PREFIXES
from ingestd.settings import Access as Access
from ingestd.settings import ConfigError as ConfigError
from ingestd.settings import RouteAccess as RouteAccess
from ingestd.settings import check_networks, check_positive, read_setting_file
from ingestd.settings import is_reserved as is_reserved

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ServerConfig:
    listen: str = "0.0.0.0:8080"
    # Worker processes sharing the listening socket(s), each storing a shard
    # of the devices; 0: one per usable core (a single process on one core).
    workers: int = 0
    max_body_bytes: int = 8 * MiB
    # Seconds a SIGTERM waits for in-flight requests and the queue to drain.
    shutdown_timeout_secs: float = 25.0
    # PEM files; both set serves HTTPS. Re-read on SIGHUP (renewed certs).
    tls_cert: str = ""
    tls_key: str = ""
    # Slow clients: a request's headers must be complete within
    # keepalive_timeout_secs of the connection opening (or of the previous
    # answer), its body within body_timeout_secs; idle connections close
    # after keepalive_timeout_secs. A client that trickles is cut.
    keepalive_timeout_secs: float = 30.0
    body_timeout_secs: float = 120.0
    max_header_bytes: int = 8190  # one request line or header field
    # Proxies (CIDR) whose X-Forwarded-For is believed; nobody's by default.
    trusted_proxies: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StorageConfig:
    data_dir: str = "data"
    # "always": write and fsync before answering OK (survives power loss).
    # "never": answer once written to the OS (survives a daemon crash only).
    fsync: Literal["always", "never"] = "always"
    rotate_period: Literal["day", "hour"] = "day"
    max_file_bytes: int = 64 * MiB
    max_open_files: int = 1024
    queue_max_records: int = 10_000
    # How long a request waits for room in a full queue before it gets 503.
    enqueue_timeout_secs: float = 2.0
    batch_max_records: int = 4096
    # How often the files written since the last checkpoint are fsynced in
    # the background, so the write-ahead log can start over.
    checkpoint_interval_secs: float = 10.0
    # A resend of a block already stored is answered OK and stored nothing
    # when it is among the device's last N blocks and younger than this.
    dedup_window_blocks: int = 1000
    dedup_window_secs: float = 7 * 24 * 3600.0
    # Closed (rotated) files: gzip them; delete the oldest past an age or
    # when all closed files together pass a size (0 turns either off).
    compress: bool = True
    retention_days: float = 0.0
    retention_max_bytes: int = 0
    housekeeping_interval_secs: float = 300.0


@dataclass(frozen=True, slots=True)
class StatusConfig(Access):
    """The fleet view: GET /api/devices and the page at / (and /status)."""

    enabled: bool = True
    # No data for this long: silent (ingestd_devices_silent{protocol}).
    silent_after_secs: float = 900.0
    # ingestd_device_last_seen_timestamp_seconds for at most this many
    # devices (0: off): a series per device would swamp Prometheus.
    last_seen_metric_devices: int = 0


@dataclass(frozen=True, slots=True)
class JetStreamConfig:
    """The NATS JetStream sink, for routes whose `sink` names it."""

    servers: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    # Created if missing (file storage), capturing `<subject_prefix>.>`.
    stream: str = "INGESTD"
    subject_prefix: str = "ingestd"
    replicas: int = 1
    max_age_days: float = 0.0  # stream retention; 0: keep until limits
    # The server drops a message whose Nats-Msg-Id it stored this recently:
    # a device's resend within the window is stored once.
    duplicate_window_secs: float = 120.0
    # No ack within this: the device gets 503 and resends.
    publish_timeout_secs: float = 5.0
    reconnect_wait_secs: float = 2.0
    # Authentication: a token, a user and password, or a .creds file.
    token: str = ""
    user: str = ""
    password: str = ""
    creds_file: str = ""
    tls_ca: str = ""  # PEM bundle to verify tls:// servers with


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["plain", "json"] = "plain"


@dataclass(frozen=True, slots=True)
class Config:
    """Every field is a section (the example config shows each of them)."""

    server: ServerConfig = field(default_factory=ServerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    # The built-in protocols' sections, typed (`config.wattmon.paths`).
    wattmon: WattmonConfig = field(default_factory=WattmonConfig)
    json: JsonConfig = field(default_factory=JsonConfig)
    status: StatusConfig = field(default_factory=StatusConfig)
    jetstream: JetStreamConfig = field(default_factory=JetStreamConfig)
    log: LogConfig = field(default_factory=LogConfig)

    @property
    def data_dir(self) -> Path:
        return Path(self.storage.data_dir)

    def section(self, protocol: str) -> RouteAccess:
        """A registered protocol's section (its defaults if none was given)."""
        if protocol in _FIELDS:
            section: RouteAccess = getattr(self, protocol)
            return section
        found = self.more_protocols().get(protocol)
        return found if found is not None else PROTOCOLS[protocol].section()

    def more_protocols(self) -> Mapping[str, RouteAccess]:
        """The sections of protocols registered beyond the typed ones."""
        return {}

    def with_section(self, protocol: str, section: RouteAccess) -> Config:
        if protocol in _FIELDS:
            typed: dict[str, Any] = {protocol: section}
            return dataclasses.replace(self, **typed)
        fixed = {f.name: getattr(self, f.name) for f in dataclasses.fields(Config)}
        more = {**self.more_protocols(), protocol: section}
        return ConfigWithMoreProtocols(**fixed, sections_of_more_protocols=more)


@dataclass(frozen=True, slots=True)
class ConfigWithMoreProtocols(Config):
    """A config that also holds the sections (the file's `[name]` tables) of
    protocols registered beyond those with a typed field; read them with
    `section(name)`. A subclass, so that Config's fields are its sections."""

    sections_of_more_protocols: Mapping[str, RouteAccess] = field(default_factory=dict, hash=False)

    def more_protocols(self) -> Mapping[str, RouteAccess]:
        return self.sections_of_more_protocols


_FIELDS = frozenset(f.name for f in dataclasses.fields(Config))


def sections(config: Config) -> dict[str, Any]:
    """Every section by name: the fixed ones and each registered protocol's."""
    found = {f.name: getattr(config, f.name) for f in dataclasses.fields(Config)}
    found.update((name, config.section(name)) for name in PROTOCOLS)
    return found


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:8080`) to a host and a port number.

    HOST is an IP address or a name of valid syntax (letters, digits and
    `-` in dot-separated labels); a name is resolved only when binding, so a
    name that does not resolve fails at start-up (`listen_failed`), not here.
    Empty HOST: every IPv4 address.
    """
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"server.listen: expected HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not _is_ip(host, version=6):
            raise ConfigError(f"server.listen: {host!r} in [] is not an IPv6 address")
    elif ":" in host:
        raise ConfigError(
            f"server.listen: write an IPv6 address in [], e.g. [::1]:8080, got {value!r}"
        )
    elif host and not _is_ip(host, version=4) and not _HOSTNAME.fullmatch(host):
        raise ConfigError(f"server.listen: {host!r} is neither an IP address nor a host name")
    return host or "0.0.0.0", int(port)


# RFC 1123 labels; a name of digits and dots only must be an IPv4 address.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}\.?$)(?![0-9.]+$){_LABEL}(?:\.{_LABEL})*\.?")


def _is_ip(text: str, *, version: int) -> bool:
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate a TOML file; None gives the embedded defaults."""
    if path is None:
        return validate(Config())
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return validate(_read_files(_build(Config, raw, "")))


def _read_files(config: Config) -> Config:
    """Fold `token_file`, and the files a protocol's own settings name
    (`allowed_macs_file`), into the settings they feed."""
    for protocol in PROTOCOLS.values():
        section = _read_token(protocol.name, config.section(protocol.name))
        config = config.with_section(protocol.name, protocol.read_files(section))
    return dataclasses.replace(config, status=_read_token("status", config.status))


SectionT = typing.TypeVar("SectionT", bound=Access)


def _read_token(name: str, section: SectionT) -> SectionT:
    if not section.token_file:
        return section
    token = read_setting_file(f"{name}.token_file", section.token_file).strip()
    if not token:
        raise ConfigError(f"{name}.token_file: {section.token_file} is empty")
    return dataclasses.replace(section, token=token)


def with_overrides(config: Config, *, listen: str | None, data_dir: str | None) -> Config:
    """Apply command-line flags, which win over the file."""
    if listen is not None:
        config = dataclasses.replace(
            config, server=dataclasses.replace(config.server, listen=listen)
        )
    if data_dir is not None:
        config = dataclasses.replace(
            config, storage=dataclasses.replace(config.storage, data_dir=data_dir)
        )
    return validate(config)


def validate(config: Config) -> Config:
    parse_listen(config.server.listen)
    check_positive("server.max_body_bytes", config.server.max_body_bytes)
    check_positive("server.shutdown_timeout_secs", config.server.shutdown_timeout_secs)
    st = config.storage
    if not st.data_dir:
        raise ConfigError("storage.data_dir: must not be empty")
    for name in (
        "max_file_bytes",
        "max_open_files",
        "queue_max_records",
        "enqueue_timeout_secs",
        "batch_max_records",
        "checkpoint_interval_secs",
        "dedup_window_blocks",
        "dedup_window_secs",
        "housekeeping_interval_secs",
    ):
        check_positive(f"storage.{name}", getattr(st, name))
    for name in ("retention_days", "retention_max_bytes"):
        if getattr(st, name) < 0:
            raise ConfigError(f"storage.{name}: must be 0 (off) or more")
    for name in ("body_timeout_secs", "keepalive_timeout_secs", "max_header_bytes"):
        check_positive(f"server.{name}", getattr(config.server, name))
    check_networks("server.trusted_proxies", config.server.trusted_proxies)
    check_networks("status.allowed_networks", config.status.allowed_networks)
    check_positive("status.silent_after_secs", config.status.silent_after_secs)
    if config.status.last_seen_metric_devices < 0:
        raise ConfigError("status.last_seen_metric_devices: must be 0 (off) or more")
    if config.server.workers < 0:
        raise ConfigError("server.workers: must be 0 (chosen by core count) or more")
    for name in PROTOCOLS:
        section = config.section(name)
        check_networks(f"{name}.allowed_networks", section.allowed_networks)
        if section.rate_limit_per_min < 0:
            raise ConfigError(f"{name}.rate_limit_per_min: must be 0 (off) or more")
        check_positive(f"{name}.rate_limit_burst", section.rate_limit_burst)
    for protocol in PROTOCOLS.values():
        protocol.validate(config.section(protocol.name))  # its own settings
    _tls(config.server)
    sinks = [config.section(name).sink for name in PROTOCOLS]
    _jetstream(config.jetstream, used=any(sink != "file" for sink in sinks))
    return config


def _tls(server: ServerConfig) -> None:
    """Both files set, readable, and a certificate with its key, as serve
    will load them."""
    if bool(server.tls_cert) != bool(server.tls_key):
        raise ConfigError("server.tls_cert and server.tls_key: set both or neither")
    if not server.tls_cert:
        return
    for name in ("tls_cert", "tls_key"):
        path = getattr(server, name)
        try:
            with open(path, "rb") as fh:
                fh.read(1)
        except OSError as exc:
            raise ConfigError(f"server.{name}: cannot read {path}: {exc.strerror}") from None
    try:
        server_context(server.tls_cert, server.tls_key)
    except (OSError, ssl.SSLError) as exc:  # not PEM, or a key of another certificate
        raise ConfigError(
            f"server.tls_cert, server.tls_key: cannot use {server.tls_cert} with "
            f"{server.tls_key}: {getattr(exc, 'reason', None) or exc.strerror or exc}"
        ) from None


_STREAM_NAME = re.compile(r"[A-Za-z0-9_\-]{1,255}")
_SUBJECT_TOKEN = re.compile(r"[^\s.*>]+")


NATS_SCHEMES = ("nats", "tls", "ws", "wss")


def _nats_url(url: str) -> None:
    """SCHEME://[USER:PASSWORD@]HOST[:PORT], as nats-py connects to it."""
    problem = ""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a bad port)
    except ValueError:
        problem = "bad port or address"
    else:
        if parts.scheme not in NATS_SCHEMES or not url.startswith(f"{parts.scheme}://"):
            problem = f"the scheme must be one of {', '.join(NATS_SCHEMES)}"
        elif not parts.hostname:
            problem = "no host"
        elif any(c.isspace() for c in url):
            problem = "white space"
    if problem:
        # The URL may hold a password: name it without its user part.
        shown = url.rpartition("@")[2] if "@" in url else url
        raise ConfigError(
            f"jetstream.servers: {shown!r}: {problem} (expected e.g. nats://host:4222)"
        )


def _jetstream(js: JetStreamConfig, *, used: bool) -> None:
    if not js.servers:
        raise ConfigError("jetstream.servers: expected one or more URLs, e.g. nats://host:4222")
    for url in js.servers:
        _nats_url(url)
    if not _STREAM_NAME.fullmatch(js.stream):
        raise ConfigError("jetstream.stream: 1-255 of A-Z a-z 0-9 _ -")
    if not all(_SUBJECT_TOKEN.fullmatch(t) for t in js.subject_prefix.split(".")):
        raise ConfigError("jetstream.subject_prefix: dot-separated tokens without spaces, * or >")
    if not 1 <= js.replicas <= 5:
        raise ConfigError(f"jetstream.replicas: must be 1 to 5, got {js.replicas}")
    if js.max_age_days < 0:
        raise ConfigError("jetstream.max_age_days: must be 0 (no limit) or more")
    for name in ("duplicate_window_secs", "publish_timeout_secs", "reconnect_wait_secs"):
        check_positive(f"jetstream.{name}", getattr(js, name))
    if js.max_age_days and js.duplicate_window_secs > js.max_age_days * 86400:
        raise ConfigError("jetstream.duplicate_window_secs: must not exceed max_age_days")
    if js.password and not js.user:
        raise ConfigError("jetstream.password: set jetstream.user too")
    if sum(bool(x) for x in (js.token, js.user, js.creds_file)) > 1:
        raise ConfigError("jetstream: set one of token, user and password, or creds_file")
    if used:
        for name in ("creds_file", "tls_ca"):
            path = getattr(js, name)
            if path and not os.path.isfile(path):
                raise ConfigError(f"jetstream.{name}: {path} is not a file")
        if js.creds_file and importlib.util.find_spec("nkeys") is None:
            raise ConfigError("jetstream.creds_file: needs the nkeys package (nats-py[nkeys])")


# Settings outside the protocols' sections that SIGHUP applies; any other
# change waits for a restart. A protocol's section applies on SIGHUP but for
# its `RESTART_ONLY` settings (`sink`).
RELOADABLE = frozenset(
    {
        "server.max_body_bytes",
        "server.body_timeout_secs",
        "server.trusted_proxies",
        "status.enabled",
        "status.token",
        "status.token_file",
        "status.allowed_networks",
        "status.silent_after_secs",
        "status.last_seen_metric_devices",
        "server.tls_cert",
        "server.tls_key",
        "storage.enqueue_timeout_secs",
        "storage.compress",
        "storage.retention_days",
        "storage.retention_max_bytes",
        "log.level",
        "log.format",
    }
)


def is_reloadable(setting: str) -> bool:
    """Does SIGHUP apply this setting (`wattmon.paths`)?"""
    section, _, name = setting.partition(".")
    protocol = PROTOCOLS.get(section)
    if protocol is not None:
        return name not in protocol.section.RESTART_ONLY
    return setting in RELOADABLE


def changed_settings(old: Config, new: Config) -> list[str]:
    """Dotted names of the settings that differ, e.g. `storage.fsync`."""
    changed = []
    after_all = sections(new)
    for section, before in sections(old).items():
        after = after_all[section]
        for setting in dataclasses.fields(before):
            if getattr(before, setting.name) != getattr(after, setting.name):
                changed.append(f"{section}.{setting.name}")
    return changed


def keep_restart_only(old: Config, new: Config) -> Config:
    """`new`, except settings that need a restart keep their running value."""
    kept_config = new
    after_all = sections(new)
    for section, before in sections(old).items():
        kept = {
            f.name: getattr(before, f.name)
            for f in dataclasses.fields(before)
            if not is_reloadable(f"{section}.{f.name}")
        }
        after = dataclasses.replace(after_all[section], **kept)
        if section in PROTOCOLS:
            kept_config = kept_config.with_section(section, after)
        else:
            kept_config = dataclasses.replace(kept_config, **{section: after})
    return kept_config


def _build(cls: type[Any], raw: Any, prefix: str) -> Any:
    """Turn a TOML table into `cls`, checking every key and type."""
    where = prefix or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    more = {}
    if cls is Config:
        # The table of a registered protocol without a typed field: its own dataclass.
        more = {
            name: _build(PROTOCOLS[name].section, table, f"{name}.")
            for name, table in raw.items()
            if name in PROTOCOLS and name not in known
        }
        raw = {name: table for name, table in raw.items() if name not in more}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key {prefix}{unknown[0]!s}")
    values = {name: _convert(hints[name], value, f"{prefix}{name}") for name, value in raw.items()}
    if more:
        return ConfigWithMoreProtocols(**values, sections_of_more_protocols=more)
    return cls(**values)


def _convert(hint: Any, value: Any, name: str) -> Any:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{name}.")
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            options = ", ".join(repr(c) for c in choices)
            raise ConfigError(f"{name}: must be one of {options}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name}: expected a list of strings")
        return tuple(value)
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"{name}: unsupported setting type")  # pragma: no cover
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
        if ok and not math.isfinite(value):  # TOML has nan and inf
            raise ConfigError(f"{name}: must be a finite number, got {value}")
    else:
        ok = isinstance(value, hint)
    if not ok:
        raise ConfigError(f"{name}: expected {hint.__name__}, got {type(value).__name__}")
    return value
