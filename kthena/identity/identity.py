"""
Who is calling, and at what priority: L{Identifier} reads a request's bearer token (a
JWT verified against the key set of L{kthena.identity.jwks.JwksService}), else the
header an authenticating gateway sets, else the caller is anonymous.

A token whose key is known is verified at once (L{Identifier.identify} returns the
L{Identity}); only a token naming an unknown key waits for a read of the key set (it
returns a Deferred). A token that is present is always checked, even when tokens are
not required: a bad one is a 401, never a quiet fall back to anonymous.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError
from twisted.python.failure import Failure
from zope.interface import implementer

from kthena.config.identity import DEFAULT_PRIORITY, IdentityConfig, JwtConfig
from kthena.identity.jwks import JwksService
from kthena.identity.tokens import UNKNOWN_KEY, candidate_keys, token_header, verify
from kthena.identity.unauthorized import UnauthorizedError, missing_token
from kthena.interfaces import IExchange, IIdentifier, IReconfigurable, IServerReactor

MAX_HEADER_USER = 256


def build_identity(
    config: IdentityConfig, reactor: IServerReactor
) -> tuple[Identifier, JwksService]:
    """
    The identifier for the pipeline and the key set's service for the service tree (start
    it before the data plane; it stays idle without C{identity.jwt}). Both follow reloads
    (L{IReconfigurable}).
    """
    jwks = JwksService(reactor, config)
    return Identifier(config, jwks), jwks


@dataclass(frozen=True, slots=True)
class Identity:
    """
    @ivar user: the caller (a JWT's user claim, the gateway's header, or C{anonymous}).
    @ivar priority: one of the config's priority classes.
    @ivar source: C{jwt}, C{header} or C{anonymous}.
    """

    user: str
    priority: str
    source: str


ANONYMOUS = Identity("anonymous", DEFAULT_PRIORITY, "anonymous")


def bearer_token(authorization: bytes | None) -> str | None:
    """The token of C{Authorization: Bearer <token>} (the scheme in any case), or C{None}."""
    if authorization is None:
        return None
    scheme, _, token = authorization.strip().partition(b" ")
    if scheme.lower() != b"bearer":
        return None
    try:
        return token.strip().decode("ascii")
    except UnicodeDecodeError:
        return ""  # not a JWT: malformed


def header_value(raw: bytes | None) -> str | None:
    """A trusted header's value: trimmed, 1-256 printable ASCII characters, else absent."""
    if raw is None:
        return None
    value = raw.strip(b" \t")
    if not 0 < len(value) <= MAX_HEADER_USER or not all(0x20 <= b < 0x7F for b in value):
        return None
    return value.decode("ascii")


@implementer(IIdentifier, IReconfigurable)
class Identifier:
    """
    The pipeline's identify stage's helper, from the config's C{identity} section.

    @param jwks: the key set's service; needed when the config has C{identity.jwt}.
    """

    def __init__(self, config: IdentityConfig, jwks: JwksService | None = None) -> None:
        self.jwks = jwks
        self._settings(config)

    def _settings(self, config: IdentityConfig) -> None:
        if config.jwt is not None and self.jwks is None:
            raise ValueError("identity.jwt needs a JwksService for its keys")
        self.config = config
        self._jwt = config.jwt
        self._header = config.header
        self._user_header = None if config.header is None else config.header.user.encode()
        self._priority_header = (
            None
            if config.header is None or config.header.priority is None
            else config.header.priority.encode()
        )
        self._priorities = {p.lower(): p for p in config.priorities}
        self.default_priority = config.default_priority
        self.anonymous = Identity(ANONYMOUS.user, config.default_priority, ANONYMOUS.source)

    def reconfigure(self, config: Any) -> None:
        """Take C{config.identity} (a L{kthena.config.router.RouterConfig}'s)."""
        self._settings(config.identity)

    def state(self) -> dict[str, object]:
        """For C{/debug/router/state}: how callers are identified; never a key or a token."""
        jwt, jwks = self._jwt, self.jwks
        keys = None
        if jwt is not None and jwks is not None:
            keys = {
                "source": jwt.source,
                "issuer": jwt.issuer,
                "audiences": list(jwt.audiences),
                "required": jwt.required,
                "algorithms": list(jwt.algorithms),
                "key_ids": sorted(jwks.keys.kids),
                "keys": jwks.keys.size,
                "reads": jwks.loads,
                "failed_reads_in_a_row": jwks.failures,
                "refresh_interval_seconds": jwt.refresh_interval,
            }
        header = self._header
        return {
            "jwt": keys,
            "header": None
            if header is None
            else {"user": header.user, "priority": header.priority},
            "priorities": list(self.config.priorities),
            "default_priority": self.default_priority,
        }

    def priority(self, value: object) -> str:
        """C{value} as one of the priority classes (compared without case), else the default."""
        if isinstance(value, str):
            found = self._priorities.get(value.strip().lower())
            if found is not None:
                return found
        return self.default_priority

    def identify(self, exchange: IExchange) -> Identity | Deferred[Identity]:
        """
        @return: the caller's L{Identity}, or a Deferred of it while the key set is read
            for an unknown key.
        @raise UnauthorizedError: 401 (a Deferred fails the same way).
        """
        jwt = self._jwt
        if jwt is not None:
            token = bearer_token(exchange.header(b"authorization"))
            if token is not None:
                return self._from_token(token, jwt)
        if self._user_header is not None:
            user = header_value(exchange.header(self._user_header))
            if user is not None:
                priority = self.default_priority
                if self._priority_header is not None:
                    priority = self.priority(header_value(exchange.header(self._priority_header)))
                return Identity(user, priority, "header")
        if jwt is not None and jwt.required:
            raise missing_token()
        return self.anonymous

    def _from_token(self, token: str, jwt: JwtConfig) -> Identity | Deferred[Identity]:
        alg, kid = token_header(token, jwt.algorithms)
        assert self.jwks is not None
        keys = candidate_keys(self.jwks.keys, alg, kid)
        if keys is not None:
            return self._identity(verify(token, alg, keys, jwt), jwt)
        waiting = self.jwks.wait_for_keys()
        if waiting is None:
            raise UnauthorizedError(UNKNOWN_KEY)

        def again(_: None) -> Identity:
            assert self.jwks is not None
            keys = candidate_keys(self.jwks.keys, alg, kid)
            if keys is None:
                raise UnauthorizedError(UNKNOWN_KEY)
            return self._identity(verify(token, alg, keys, jwt), jwt)

        def timed_out(failure: Failure) -> Identity:
            failure.trap(TimeoutError)
            raise UnauthorizedError(f"{UNKNOWN_KEY}; the key set could not be read in time")

        return waiting.addCallbacks(again, timed_out)

    def _identity(self, claims: dict[str, Any], jwt: JwtConfig) -> Identity:
        user = claims.get(jwt.user_claim)
        if not isinstance(user, str) or not user:
            raise UnauthorizedError(f"token claim {jwt.user_claim} must be a non-empty string")
        priority = self.default_priority
        if jwt.priority_claim is not None:
            priority = self.priority(claims.get(jwt.priority_claim))
        return Identity(user, priority, "jwt")
