"""
The 401 answer: a L{ProxyError} that also carries the C{WWW-Authenticate} challenge of
RFC 6750, so that whoever answers it can send the header along.

Messages say what was wrong (missing, expired, wrong issuer, ...) in the router's own
words: never the token, a claim's value or key material.
"""

from __future__ import annotations

from kthena.errors import ErrorType, ProxyError

CHALLENGE = b'Bearer realm="kthena"'


class UnauthorizedError(ProxyError):
    """
    401: no valid credentials.

    @ivar headers: the response headers the answer must carry (C{WWW-Authenticate}).
    """

    def __init__(self, message: str, *, invalid_token: bool = True) -> None:
        super().__init__(401, ErrorType.UNAUTHORIZED, message)
        challenge = CHALLENGE
        if invalid_token:  # RFC 6750 3.1: a token was sent and is not good
            description = message.replace("\\", "").replace('"', "'")
            challenge += b', error="invalid_token", error_description="%s"' % (
                description.encode("ascii", "replace")
            )
        self.headers: tuple[tuple[bytes, bytes], ...] = ((b"www-authenticate", challenge),)


def missing_token() -> UnauthorizedError:
    """No bearer token where one is required (RFC 6750 3.1: no error code then)."""
    return UnauthorizedError(
        "missing bearer token (Authorization: Bearer <JWT>)", invalid_token=False
    )
