"""
A JSON Web Key Set, parsed once into PyJWT key objects and indexed for the hot path: the
keys for a token are found by its C{kid} and C{alg} with two dict lookups, and no JWKS
is read again per request.

Every key is bound to the algorithms it may verify (PyJWT's L{PyJWK} holds one): the
JWK's own C{alg} when it names one, else what its type allows (an RSA key: RS* and PS*;
an EC key: the ES algorithm of its curve; an Ed25519 key: EdDSA). Symmetric (C{oct})
keys, encryption keys (C{use: enc}) and keys whose C{key_ops} exclude C{verify} are
left out: a token can never be checked against an HMAC secret made of a public key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jwt import PyJWK
from jwt.exceptions import PyJWTError

from kthena.config.identity import ASYMMETRIC_ALGORITHMS

MAX_JWKS_BYTES = 1 << 20

_RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")


class KeySetError(ValueError):
    """A key set that cannot be used (the last good one stays)."""


@dataclass(frozen=True, slots=True)
class KeySet:
    """
    @ivar by_kid: C{kid} -> C{alg} -> the keys (usually one).
    @ivar by_alg: C{alg} -> every key, for tokens without a C{kid}.
    @ivar size: JWKs kept.
    @ivar skipped: JWKs left out (unusable, symmetric, not for signatures).
    """

    by_kid: Mapping[str, Mapping[str, tuple[PyJWK, ...]]] = field(default_factory=dict)
    by_alg: Mapping[str, tuple[PyJWK, ...]] = field(default_factory=dict)
    size: int = 0
    skipped: int = 0

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self.by_kid)

    @classmethod
    def from_json(cls, data: bytes) -> KeySet:
        """
        @raise KeySetError: not JSON, not a JWKS, or without a single usable key.
        """
        if len(data) > MAX_JWKS_BYTES:
            raise KeySetError(f"the key set is over {MAX_JWKS_BYTES} bytes")
        try:
            document = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise KeySetError(f"the key set is not JSON ({e})") from None
        return cls.from_document(document)

    @classmethod
    def from_document(cls, document: object) -> KeySet:
        if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
            raise KeySetError('the key set is not a JWKS (an object with a "keys" list)')
        by_kid: dict[str, dict[str, list[PyJWK]]] = {}
        by_alg: dict[str, list[PyJWK]] = {}
        size = skipped = 0
        for jwk in document["keys"]:
            keys = _bound_keys(jwk)
            if not keys:
                skipped += 1
                continue
            size += 1
            kid = jwk.get("kid")
            for key in keys:
                by_alg.setdefault(key.algorithm_name, []).append(key)
                if isinstance(kid, str):
                    by_kid.setdefault(kid, {}).setdefault(key.algorithm_name, []).append(key)
        if not by_alg:
            raise KeySetError(
                f"the key set has no usable signing key ({skipped} left out: symmetric, "
                "for encryption, or not understood)"
            )
        return cls(
            by_kid={kid: {a: tuple(k) for a, k in algs.items()} for kid, algs in by_kid.items()},
            by_alg={a: tuple(k) for a, k in by_alg.items()},
            size=size,
            skipped=skipped,
        )


EMPTY = KeySet()


def _for_signatures(jwk: dict[str, Any]) -> bool:
    """A public key of a kind PyJWT verifies with, meant for signatures."""
    ops = jwk.get("key_ops")
    return (
        jwk.get("kty") in ("RSA", "EC", "OKP")
        and jwk.get("use", "sig") == "sig"
        and (ops is None or (isinstance(ops, list) and "verify" in ops))
        and "d" not in jwk  # a private key published by mistake: refuse, do not hold it
    )


def _bound_keys(jwk: object) -> Sequence[PyJWK]:
    """The JWK as PyJWT keys, one per algorithm it may verify; none when unusable."""
    if not isinstance(jwk, dict) or not _for_signatures(jwk):
        return ()
    alg = jwk.get("alg")
    algorithms: Sequence[str | None]
    if alg is not None:
        if alg not in ASYMMETRIC_ALGORITHMS:
            return ()
        algorithms = (alg,)
    elif jwk["kty"] == "RSA":
        algorithms = _RSA_ALGORITHMS
    else:
        algorithms = (None,)  # by curve: ES256/ES384/ES512/ES256K, or EdDSA
    keys = []
    for algorithm in algorithms:
        try:
            keys.append(PyJWK(jwk, algorithm))
        except (PyJWTError, ValueError, TypeError):
            return ()
    return keys
