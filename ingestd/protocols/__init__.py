"""Device protocols: sans-I/O parsers from request bytes to records, and the
registry of what each protocol declares for the rest of ingestd.

- `wattmon`: CSV form posts with an MD5 (`/wattmon`, `/export-script.php`).
- `jsonpost`: JSON documents POSTed to any other path, which names the stream.
- `forms`: the form parser Wattmon's posts go through.
- `base`: `DeviceProtocol` and `Route`, what a protocol declares;
  `registry`: the protocols ingestd serves.
"""
