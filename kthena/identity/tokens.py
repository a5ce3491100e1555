"""
Verifying one bearer token with PyJWT: its header names the algorithm and the key
(C{kid}), the key comes from the L{KeySet}, and PyJWT checks the signature, C{exp},
C{nbf} and C{iat} (with the leeway), C{iss} and C{aud}. Every failure is an
L{UnauthorizedError} saying what was wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jwt
from jwt import PyJWK
from jwt import exceptions as jwt_errors

from kthena.config.identity import JwtConfig
from kthena.identity.keys import KeySet
from kthena.identity.unauthorized import UnauthorizedError

REQUIRED_CLAIMS = ("exp", "iss", "aud")
"""A token without an expiry, an issuer or an audience is refused."""

MALFORMED = "malformed token (not a signed JWT)"
UNKNOWN_KEY = "token signed with an unknown key (its kid is not in the key set)"


def token_header(token: str, algorithms: Sequence[str]) -> tuple[str, str | None]:
    """
    The token's C{alg} (one of C{algorithms}) and C{kid}, read before any key is chosen.

    @raise UnauthorizedError: malformed, or an algorithm that is not allowed.
    """
    try:
        header = jwt.get_unverified_header(token)
    except jwt_errors.PyJWTError:
        raise UnauthorizedError(MALFORMED) from None
    alg = header.get("alg")
    if not isinstance(alg, str):
        raise UnauthorizedError(MALFORMED)
    if alg not in algorithms:
        raise UnauthorizedError(f"token algorithm not allowed (allowed: {', '.join(algorithms)})")
    kid = header.get("kid")  # PyJWT refuses a kid that is not a string
    return alg, kid


def candidate_keys(keys: KeySet, alg: str, kid: str | None) -> tuple[PyJWK, ...] | None:
    """
    The keys that may have signed a token; C{None} when its key is unknown (a refresh of
    the key set may bring it).

    @raise UnauthorizedError: the key is known, but not for the token's algorithm.
    """
    if kid is None:
        return keys.by_alg.get(alg) or None
    for_kid = keys.by_kid.get(kid)
    if for_kid is None:
        return None
    found = for_kid.get(alg)
    if not found:
        raise UnauthorizedError("token algorithm does not match its signing key")
    return found


def verify(token: str, alg: str, keys: Sequence[PyJWK], settings: JwtConfig) -> dict[str, Any]:
    """
    The token's claims, verified with one of C{keys} (tried in turn: a token without a
    C{kid} may match any key of its algorithm).

    @raise UnauthorizedError: whatever is wrong with it.
    """
    for key in keys[:-1]:
        try:
            return _decode(token, alg, key, settings)
        except jwt_errors.InvalidSignatureError:
            continue
        except jwt_errors.PyJWTError as e:
            raise UnauthorizedError(_reason(e)) from None
    try:
        return _decode(token, alg, keys[-1], settings)
    except jwt_errors.PyJWTError as e:
        raise UnauthorizedError(_reason(e)) from None


def _decode(token: str, alg: str, key: PyJWK, settings: JwtConfig) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(
        token,
        key,
        algorithms=(alg,),
        audience=settings.audiences,
        issuer=settings.issuer,
        leeway=settings.leeway,
        options={"require": list(REQUIRED_CLAIMS)},
    )
    return claims


_REASONS: tuple[tuple[type[jwt_errors.PyJWTError], str], ...] = (
    (jwt_errors.ExpiredSignatureError, "token expired"),
    (jwt_errors.ImmatureSignatureError, "token not yet valid (nbf or iat in the future)"),
    (jwt_errors.InvalidIssuedAtError, "malformed token (iat is not a number)"),
    (jwt_errors.InvalidIssuerError, "wrong token issuer"),
    (jwt_errors.InvalidAudienceError, "wrong token audience"),
    (jwt_errors.InvalidSignatureError, "bad token signature"),
    (jwt_errors.InvalidAlgorithmError, "token algorithm does not match its signing key"),
    (jwt_errors.InvalidSubjectError, "malformed token (sub is not a string)"),
    (jwt_errors.InvalidJTIError, "malformed token (jti is not a string)"),
)


def _reason(error: jwt_errors.PyJWTError) -> str:
    if isinstance(error, jwt_errors.MissingRequiredClaimError):
        return f"token has no {error.claim} claim"
    for kind, reason in _REASONS:
        if isinstance(error, kind):
            return reason
    return MALFORMED
