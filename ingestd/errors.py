"""The one exception tree: each class carries its HTTP status and a short code.

The code is a small fixed vocabulary, safe as a metric label; the message is
what the device reads after `ERROR: ` and never contains client bytes.
"""

from __future__ import annotations


class IngestError(Exception):
    status = 400
    code = "bad_request"
    retry_after_secs: int | None = None
    device: str | None = None  # the device or stream, when known

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ProtocolError(IngestError):
    """The request does not follow the device protocol; nothing was stored."""


class BadForm(ProtocolError):
    code = "bad_form"


class BadDeviceKey(ProtocolError):
    code = "bad_key"


class MissingMd5(ProtocolError):
    code = "missing_md5"


class Md5Mismatch(ProtocolError):
    code = "bad_md5"

    def __init__(self) -> None:
        # The exact body the Wattmon sample receiver answers.
        super().__init__("MD5 sum mismatch")


class BadJson(ProtocolError):
    code = "bad_json"


class BadStreamName(ProtocolError):
    code = "bad_stream"


class UnsupportedMediaType(ProtocolError):
    status = 415
    code = "bad_content_type"


class BodyTooLarge(IngestError):
    status = 413
    code = "too_large"


class Unavailable(IngestError):
    """Temporary: the device keeps its data and retries."""

    status = 503
    code = "unavailable"
    retry_after_secs = 5


class QueueFull(Unavailable):
    code = "queue_full"


class StorageFailed(Unavailable):
    code = "storage_failed"
    retry_after_secs = 30


class ShuttingDown(Unavailable):
    code = "shutting_down"


class MalformedBlock(Exception):
    """A block whose MD5 matched but that cannot be stored as CSV rows.

    Not an `IngestError`: the device holds exactly these bytes and would resend
    them forever, so the block is quarantined and answered `OK`.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Unauthorized(IngestError):
    status = 401
    code = "unauthorized"

    def __init__(self) -> None:
        super().__init__("unauthorized")


class Forbidden(IngestError):
    status = 403
    code = "forbidden"


class RateLimited(IngestError):
    status = 429
    code = "rate_limited"

    def __init__(self, retry_after_secs: int) -> None:
        super().__init__("too many requests from this device; retry later")
        self.retry_after_secs = retry_after_secs


class RequestTimeout(IngestError):
    status = 408
    code = "too_slow"


class BlockTooLarge(BodyTooLarge):
    """More CSV rows or columns than the configured limits."""
