"""
Secrets never leave the router: not in the debug views, not in a log line, not in an
error message (an invalid config's YAML snippet included).

One set of rules serves every place. Values under keys that name credentials (password,
secret, token, API key, authorization, cookie, ...) are replaced by C{<redacted>}, and so
are the password of any URL (a Redis address such as C{redis://user:pw@host:6379}, or the
password-only C{redis://pw@host}), bearer and basic credentials, and OpenAI-style
C{sk-...} keys found in free text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "<redacted>"

_SECRET_SUFFIXES = (
    "password",
    "passwd",
    "secret",
    "token",
    "apikey",
    "authorization",
    "cookie",
    "credentials",
    "privatekey",
)
_SECRET_QUERY = re.compile(r"pass|secret|token|key|auth|credential", re.IGNORECASE)


def is_secret_name(name: object) -> bool:
    """Whether a key or header name names a credential (compared without case, - or _)."""
    key = re.sub(r"[-_\s]", "", str(name)).lower()
    return key in ("auth", "pass", "pwd") or key.endswith(_SECRET_SUFFIXES)


def redact_url(text: str) -> str:
    """
    C{text} with the password of a URL's userinfo (and secret-looking query values)
    replaced; a lone userinfo (C{redis://secret@host}, Redis's password-only form) is
    replaced whole. Schemeless C{user:password@host} is handled too. Anything else is
    returned unchanged.
    """
    if "@" not in text and "?" not in text:
        return text
    if "://" not in text:
        userinfo, at, host = text.rpartition("@")
        if not at or "/" in userinfo or " " in userinfo:
            return text
        user, colon, _ = userinfo.partition(":")
        return f"{user}:{REDACTED}@{host}" if colon else text
    try:
        parts = urlsplit(text)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:{REDACTED}@{host}" if colon else f"{REDACTED}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_QUERY.search(k) for k, _ in pairs):
            query = urlencode(
                [(k, REDACTED if _SECRET_QUERY.search(k) else v) for k, v in pairs], safe="<>"
            )
    if netloc == parts.netloc and query == parts.query:
        return text
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _same(value: object) -> object:
    return value


def redact(value: Any, secret: bool = False, leaf: Callable[[object], object] = _same) -> Any:
    """
    A copy of C{value} (a resource's raw mapping) with secrets replaced.

    @param secret: C{value} sits under a key naming a credential: every leaf goes.
    @param leaf: applied to every other leaf (the debug views make them JSON-ready).
    """
    if isinstance(value, Mapping):
        return {str(k): redact(v, secret or is_secret_name(k), leaf) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, secret, leaf) for v in value]
    if secret and value is not None:
        return REDACTED
    return leaf(redact_url(value) if isinstance(value, str) else value)


# -- free text

_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s:@/'\"]*):[^\s@/'\"]+@")
_REDIS_USERINFO = re.compile(r"(?i)\b(rediss?://)[^\s:@/'\"]+@")
_CREDENTIALS = re.compile(r"(?i)\b(bearer|basic)(\s+)[A-Za-z0-9\-._~+/]{8,}=*")
_API_KEY = re.compile(r"\b(sk-)[A-Za-z0-9_\-]{6,}")
_QUOTED = re.compile(r"'[^'\n]*'|\"[^\"\n]*\"")


def redact_text(text: str) -> str:
    """
    Free text (a log line, an error message) with URL passwords, bearer and basic
    credentials and C{sk-} keys replaced.
    """
    text = _URL_PASSWORD.sub(rf"\1:{REDACTED}@", text)
    text = _REDIS_USERINFO.sub(rf"\1{REDACTED}@", text)
    text = _CREDENTIALS.sub(rf"\1\2{REDACTED}", text)
    return _API_KEY.sub(rf"\1{REDACTED}", text)


def redact_quoted(text: str) -> str:
    """Every quoted value in C{text} replaced (a message about a secret field)."""
    return _QUOTED.sub(f"'{REDACTED}'", text)
