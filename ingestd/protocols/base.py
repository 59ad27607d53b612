"""What a device protocol declares for the rest of ingestd.

Each protocol module (`wattmon.py`, `jsonpost.py`) makes one `DeviceProtocol`
and the registry (`registry.py`) lists them; the ingest service, the config
loader, the file sink, the fleet view, the device pages, the JetStream codec
and export read them there instead of naming protocols.

Two halves:
- how its data is stored and read back: folder, file extension, device-id
  pattern, the shape of its stored lines (`StoredAs`);
- how a post is taken: its config section, and a `Route` made from that
  section at every (re)load, which matches paths and parses bodies.
"""

from __future__ import annotations

import abc
import enum
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from ingestd.errors import IngestError
from ingestd.records import Quarantined, Record
from ingestd.settings import RouteAccess

S = TypeVar("S", bound=RouteAccess)


class StoredAs(enum.Enum):
    """The shape of a protocol's stored lines: how the reader, the data API,
    the charts and the JetStream codec read them back."""

    # A header line, then CSV rows whose first column is the row's own time.
    CSV = "csv"
    # One JSON object a line: {"received_at": ..., "remote": ..., "path": ..., "body": ...}.
    JSON_LINES = "json_lines"
    # Plain lines, timed by their file's period.
    TEXT = "text"


class Route(abc.ABC):
    """A protocol's steps for one device post, made from its config section
    once per (re)load, so a request pays for none of the setting lookups.

    The shared steps (client network, token, rate limit, answer, metrics)
    are the ingest service's; these are the protocol's own.
    """

    __slots__ = ()

    # True: the path names the device (a JSON stream), so `device_from_path`
    # is checked and its rate limit applied before the body is read.
    path_names_device: ClassVar[bool] = False

    @abc.abstractmethod
    def matches(self, path: str) -> bool:
        """Is a post to `path` this protocol's? (Reserved paths never come here.)"""

    def device_from_path(self, path: str) -> str:
        """The device a post to `path` is from; raises the refusal (a name
        that is not an id, a device not allowed). Only when `path_names_device`."""
        raise NotImplementedError

    @abc.abstractmethod
    def parse(
        self,
        body: bytes,
        content_type: str,
        path: str,
        remote: str,
        idempotency_key: str | None,
        now: float,
    ) -> Record | Quarantined | None:
        """Pure (it may run in a thread): the body's record, a block to
        quarantine, None (nothing to store, answered OK), or raise the refusal."""

    def refused_device(self, exc: IngestError, path: str) -> str | None:
        """The known device a refused post counts against in the fleet view
        (its last error), or None: a device not allowed stays unknown."""
        return exc.device


def _no_own_settings(section: Any) -> None:
    return None


def _no_files(section: S) -> S:
    return section


@dataclass(frozen=True, slots=True)
class DeviceProtocol(Generic[S]):
    """One device protocol, as the rest of ingestd sees it.

    Its data lives under `<data_dir>/<name>/<device id>/`, in files
    `<period>[_<seq>].<ext>[.gz]`; its settings in the config's `[<name>]`.
    """

    # The folder under the data dir, the `[name]` config section, the
    # metrics' `protocol` label and the fleet view's `?protocol=`.
    name: str
    ext: str  # of its data files
    # A device folder's name; no id that matches can name a path outside it.
    device_id: re.Pattern[str]
    stored_as: StoredAs
    content_type: str  # of a data file downloaded as it is
    # What a device id is, for the device pages' errors: "a MAC".
    id_description: str
    # Its config section: RouteAccess, or a subclass with its own settings.
    section: type[S]
    # Its steps for a post, made from its section at start and each SIGHUP.
    route: Callable[[S], Route]
    # Takes every path no other protocol does (JSON): tried last.
    catch_all: bool = False
    # Checks its own settings (the shared ones are checked by the loader);
    # raises ConfigError naming the key, e.g. `wattmon.max_rows: ...`.
    validate: Callable[[S], None] = _no_own_settings
    # Folds the files its settings name into the settings (at load and on
    # SIGHUP), as `allowed_macs_file` into `allowed_macs`.
    read_files: Callable[[S], S] = _no_files
    # A device id as typed in a URL to the id it is stored under, or None
    # when it is none (a MAC in any spelling); None: the pattern decides.
    normalise_id: Callable[[str], str | None] | None = None
    # Its parser may hand back blocks to keep aside, under
    # `<data_dir>/quarantine/<name>/<device id>/` (the fleet counts them).
    quarantines: bool = False

    @property
    def has_header(self) -> bool:
        """Each data file starts with a header line."""
        return self.stored_as is StoredAs.CSV

    def valid_id(self, device_id: str) -> bool:
        return self.device_id.fullmatch(device_id) is not None

    def device_named(self, text: str) -> str | None:
        """The device id `text` (from a URL) names, or None."""
        if self.normalise_id is not None:
            return self.normalise_id(text)
        return text if self.valid_id(text) else None


# Names a protocol cannot take: the config's other sections, and the data
# directory's own folders.
RESERVED_NAMES = frozenset({"server", "storage", "status", "jetstream", "log", "quarantine"})
NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
