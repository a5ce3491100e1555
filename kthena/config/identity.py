"""
The C{identity} section: who is calling. A verified JWT (C{jwt}: the issuer, the
audiences, where the signing keys come from, the claims to read), a header set by an
authenticating gateway in front of the router (C{header}), or both (a bearer token wins);
and the closed set of priority classes callers fall into. Without the section everyone
is anonymous, at the default priority.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from kthena.config.validate import (
    Where,
    boolean,
    duration,
    mapping,
    optional_string,
    sequence,
    string,
)
from kthena.redact import is_secret_name, redact_url

ASYMMETRIC_ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES256K",
    "ES384",
    "ES512",
    "EdDSA",
)
"""The JWS algorithms a token may be signed with: public-key ones only (never C{none} or
HMAC, whose secret would have to be the router's)."""

DEFAULT_ALGORITHMS = ("RS256", "ES256", "EdDSA")
SHEDDABLE = "sheddable"
"""The priority class whose requests a full fairness queue refuses or evicts first."""
DEFAULT_PRIORITIES = ("critical", "standard", SHEDDABLE)
DEFAULT_PRIORITY = "standard"
MIN_REFRESH_INTERVAL = 10.0
MAX_LEEWAY = 300.0

_PRIORITY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 token


@dataclass(frozen=True, slots=True)
class JwtConfig:
    """
    Bearer tokens (C{Authorization: Bearer <JWT>}) verified against a JWKS.

    @ivar audiences: a token is accepted when its C{aud} names any of them.
    @ivar jwks_file: the key set's file (exactly one of C{jwks_file} and C{jwks_url}).
    @ivar jwks_url: the key set's URL (credentials in it are never logged).
    @ivar refresh_interval: seconds between re-reads of the key set.
    @ivar required: a request without a token is refused (401); when false it passes as
        anonymous (or by the header), but a token that is present must still be valid.
    @ivar user_claim: the claim naming the caller (a non-empty string).
    @ivar priority_claim: the claim naming the caller's priority class, if any.
    @ivar leeway: seconds of clock skew allowed on C{exp}, C{nbf} and C{iat}.
    """

    issuer: str
    audiences: tuple[str, ...]
    jwks_file: str | None = None
    jwks_url: str | None = None
    refresh_interval: float = 300.0
    algorithms: tuple[str, ...] = DEFAULT_ALGORITHMS
    required: bool = True
    user_claim: str = "sub"
    priority_claim: str | None = None
    leeway: float = 30.0

    @property
    def source(self) -> str:
        """Where the keys come from, for log lines (a URL with its credentials redacted)."""
        if self.jwks_url is not None:
            return redact_url(self.jwks_url)
        return str(self.jwks_file)


@dataclass(frozen=True, slots=True)
class HeaderConfig:
    """
    The caller named by a header that an authenticating gateway in front of the router
    sets (and strips from what clients send: the router trusts it as it comes).
    """

    user: str
    priority: str | None = None


@dataclass(frozen=True, slots=True)
class IdentityConfig:
    """
    @ivar priorities: the closed set of priority classes, highest precedence first (the
        order of the fairness queues; C{sheddable}, when listed, is the last); any other
        value a token or a header names counts as C{default_priority}.
    """

    jwt: JwtConfig | None = None
    header: HeaderConfig | None = None
    priorities: tuple[str, ...] = DEFAULT_PRIORITIES
    default_priority: str = DEFAULT_PRIORITY


def parse_identity(value: object, where: Where, base: Path | None = None) -> IdentityConfig:
    """
    The C{identity} section; absent (or empty), everyone is anonymous.

    @param base: the directory a relative C{jwt.jwksFile} is found in (the config's).
    """
    spec = mapping(value, where, ("jwt", "header", "priorities", "defaultPriority"))
    priorities: tuple[str, ...] = DEFAULT_PRIORITIES
    if "priorities" in spec:
        priorities = _priorities(spec["priorities"], where.at("priorities"))
    default = DEFAULT_PRIORITY
    if "defaultPriority" in spec:
        default = string(spec["defaultPriority"], where.at("defaultPriority"))
    if default not in priorities:
        where.at("defaultPriority").fail(
            f"must be one of the priorities ({', '.join(priorities)}), not {default!r}"
        )
    return IdentityConfig(
        jwt=None if spec.get("jwt") is None else parse_jwt(spec["jwt"], where.at("jwt"), base),
        header=None
        if spec.get("header") is None
        else parse_header(spec["header"], where.at("header")),
        priorities=priorities,
        default_priority=default,
    )


def _strings(value: object, where: Where) -> tuple[str, ...]:
    """A non-empty list of distinct non-empty strings."""
    if value is None:
        where.fail("must be a list with at least one item")
    items = tuple(string(v, where.at(i)) for i, v in enumerate(sequence(value, where)))
    if not items:
        where.fail("must hold at least one item")
    seen: set[str] = set()
    for i, item in enumerate(items):
        if item in seen:
            where.at(i).fail(f"{item!r} is listed twice")
        seen.add(item)
    return items


def _priorities(value: object, where: Where) -> tuple[str, ...]:
    items = _strings(value, where)
    seen: set[str] = set()
    for i, item in enumerate(items):
        if not _PRIORITY_NAME.match(item):
            where.at(i).fail(
                f"{item!r} is not a priority class name: 1-63 letters, digits, '_', '.' or "
                "'-', starting with a letter or digit"
            )
        if item.lower() in seen:
            where.at(i).fail(f"{item!r} is listed twice (names are compared without case)")
        seen.add(item.lower())
    if SHEDDABLE in items and items[-1] != SHEDDABLE:
        where.fail(f"{SHEDDABLE!r} must be the last (lowest) class: the order is precedence")
    return items


def parse_jwt(value: object, where: Where, base: Path | None = None) -> JwtConfig:
    spec = mapping(
        value,
        where,
        ("issuer", "audiences", "jwksFile", "jwksUrl", "refreshInterval", "algorithms",
         "required", "userClaim", "priorityClaim", "leeway"),
        required=("issuer", "audiences"),
    )  # fmt: skip
    jwks_file = optional_string(spec.get("jwksFile"), where.at("jwksFile"))
    if jwks_file is not None and base is not None:
        jwks_file = str(base / jwks_file)  # an absolute path stays as it is
    jwks_url = spec.get("jwksUrl")
    if jwks_url is not None:
        jwks_url = _url(jwks_url, where.at("jwksUrl"))
    if (jwks_file is None) == (jwks_url is None):
        where.fail("needs exactly one of jwksFile and jwksUrl")
    d = JwtConfig(issuer="", audiences=())
    refresh = duration(spec.get("refreshInterval", d.refresh_interval), where.at("refreshInterval"))
    if refresh < MIN_REFRESH_INTERVAL:
        where.at("refreshInterval").fail(f"must be at least {MIN_REFRESH_INTERVAL:g}s")
    leeway = duration(spec.get("leeway", d.leeway), where.at("leeway"))
    if leeway > MAX_LEEWAY:
        where.at("leeway").fail(f"must be at most {MAX_LEEWAY:g}s")
    algorithms: tuple[str, ...] = d.algorithms
    if "algorithms" in spec:
        algorithms = _algorithms(spec["algorithms"], where.at("algorithms"))
    return JwtConfig(
        issuer=string(spec["issuer"], where.at("issuer")),
        audiences=_strings(spec["audiences"], where.at("audiences")),
        jwks_file=jwks_file,
        jwks_url=jwks_url,
        refresh_interval=refresh,
        algorithms=algorithms,
        required=boolean(spec.get("required", d.required), where.at("required")),
        user_claim=string(spec.get("userClaim", d.user_claim), where.at("userClaim")),
        priority_claim=optional_string(spec.get("priorityClaim"), where.at("priorityClaim")),
        leeway=leeway,
    )


def _url(value: object, where: Where) -> str:
    text = string(value, where)
    try:
        parts = urlsplit(text)
    except ValueError as e:
        where.fail(f"is not a URL ({e}): {redact_url(text)!r}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        where.fail(f"must be an http:// or https:// URL with a host, not {redact_url(text)!r}")
    if parts.fragment:
        where.fail(f"must not have a #fragment: {redact_url(text)!r}")
    return text


def _algorithms(value: object, where: Where) -> tuple[str, ...]:
    items = _strings(value, where)
    for i, item in enumerate(items):
        if item.lower() == "none" or item.upper().startswith("HS"):
            where.at(i).fail(
                f"{item!r} is not allowed: only public-key algorithms are "
                f"({', '.join(ASYMMETRIC_ALGORITHMS)})"
            )
        if item not in ASYMMETRIC_ALGORITHMS:
            where.at(i).fail(f"must be one of {', '.join(ASYMMETRIC_ALGORITHMS)}, not {item!r}")
    return items


def parse_header(value: object, where: Where) -> HeaderConfig:
    spec = mapping(value, where, ("user", "priority"), required=("user",))
    return HeaderConfig(
        user=_header_name(spec["user"], where.at("user")),
        priority=None
        if spec.get("priority") is None
        else _header_name(spec["priority"], where.at("priority")),
    )


def _header_name(value: object, where: Where) -> str:
    name = string(value, where)
    if not _HEADER_NAME.match(name):
        where.fail(f"is not an HTTP header name: {name!r}")
    if is_secret_name(name):
        where.fail(
            f"{name!r} names a credential: its value would become a user id, shown in logs "
            "and debug views"
        )
    return name
