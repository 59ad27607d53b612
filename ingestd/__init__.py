"""ingestd: a durable HTTP receiver for telemetry that field devices push."""

__version__ = "0.1.0"
