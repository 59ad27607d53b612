"""Each device protocol's stored form, in one place: the storage, the
fleet view, the device pages and housekeeping read it here rather than
naming protocols themselves.

A protocol's data lives under `<data_dir>/<name>/<device id>/`, in files
`<period>[_<seq>].<ext>[.gz]`; `device_id` is the pattern a device folder's
name must match (no id that matches can name a path outside its folder),
and `has_header` says whether each file starts with a header line (CSV).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StoredForm:
    name: str  # the folder under the data dir; the metrics' and ?protocol= label
    ext: str  # of its data files
    device_id: re.Pattern[str]
    has_header: bool


WATTMON = StoredForm("wattmon", "csv", re.compile(r"[0-9a-f]{12}"), has_header=True)
JSON = StoredForm(
    "json", "jsonl", re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9._\-]{0,127}"), has_header=False
)

# By name, in the order the fleet view lists them.
PROTOCOLS: dict[str, StoredForm] = {form.name: form for form in (WATTMON, JSON)}
