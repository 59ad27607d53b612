"""Device protocols: sans-I/O parsers from request bytes to records.

- `wattmon`: CSV form posts with an MD5 (`/wattmon`, `/export-script.php`).
- `jsonpost`: JSON documents POSTed to any other path, which names the stream.
"""
