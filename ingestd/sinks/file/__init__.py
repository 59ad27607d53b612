"""The file sink: write-ahead log, per-device files, dedup window, rotation,
recovery, housekeeping, and the reader the views use."""
