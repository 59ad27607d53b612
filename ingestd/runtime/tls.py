"""HTTPS: a server context whose certificate can be swapped in place."""

from __future__ import annotations

import ssl


def server_context(cert: str, key: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def reload_certificate(context: ssl.SSLContext, cert: str, key: str) -> None:
    """New handshakes use the new pair; open connections keep theirs.

    Raises (OSError, ssl.SSLError) and keeps the old pair if the new one
    cannot be loaded.
    """
    server_context(cert, key)  # fails here, before touching the live context
    context.load_cert_chain(cert, key)
