"""
Which headers cross the router, in each direction.

Hop-by-hop headers (RFC 9110 section 7.6.1) and those the C{Connection} header names
never cross. Towards pods the router also sets C{Host}, C{Content-Length} and
C{x-request-id} itself, and drops C{Authorization} when C{upstream.forwardAuthorization}
is off; towards clients a stream's C{Content-Length} is dropped (the router may change
its body: the usage chunk).
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.web.http_headers import Headers

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

STREAM_SKIP = HOP_BY_HOP | {b"content-length"}
"""Response headers not relayed for a stream."""


def upstream_skip(forward_authorization: bool) -> frozenset[bytes]:
    """Request headers never forwarded to a pod."""
    skip = HOP_BY_HOP | {b"host", b"content-length", b"x-request-id"}
    return skip if forward_authorization else skip | {b"authorization"}


def forwardable(
    headers: Headers, skip: frozenset[bytes] = HOP_BY_HOP
) -> list[tuple[bytes, Sequence[bytes]]]:
    """
    Headers minus those in C{skip} (the hop-by-hop ones, and more) and those the
    Connection header names.
    """
    connection = headers.getRawHeaders(b"connection")
    if connection:
        skip = skip | {t.strip().lower() for v in connection for t in v.split(b",")}
    return [(n, v) for n, v in headers.getAllRawHeaders() if n.lower() not in skip]
