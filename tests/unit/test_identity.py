"""
Who is calling: JWTs verified with real keys (RSA 2048, EC P-256, Ed25519) against a
JWKS from a file or a URL (served in memory), trusted headers, anonymous callers, and
the key set's service: refreshes for unknown keys (one in flight, rate-limited, bounded
waits), periodic reads on a Clock, failures that keep the last good keys, reloads, and a
stop that leaves nothing on the reactor.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.utils import base64url_encode
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogEvent, capturedLogs
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface.verify import verifyObject

from kthena.config.identity import HeaderConfig, IdentityConfig, JwtConfig
from kthena.errors import ErrorType, error_object
from kthena.identity.identity import (
    ANONYMOUS,
    Identifier,
    Identity,
    bearer_token,
    build_identity,
    header_value,
)
from kthena.identity.jwks import JwksService
from kthena.identity.keys import KeySet, KeySetError
from kthena.identity.unauthorized import UnauthorizedError
from kthena.interfaces import IExchange, IIdentifier, IReconfigurable, IServerReactor

ISSUER = "https://idp.example"
URL = "https://idp.example/.well-known/jwks.json"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()


def jwk(private: Any, kid: str | None, **extra: Any) -> dict[str, Any]:
    """The public half of C{private} as a JWK."""
    public = private.public_key()
    if isinstance(private, rsa.RSAPrivateKey):
        data = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(private, ec.EllipticCurvePrivateKey):
        data = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        data = OKPAlgorithm.to_jwk(public, as_dict=True)
    if kid is not None:
        data["kid"] = kid
    return {**data, **extra}


def jwks(*keys: object) -> bytes:
    return json.dumps({"keys": list(keys)}).encode()


STANDARD_JWKS = jwks(jwk(RSA_KEY, "rsa"), jwk(EC_KEY, "ec"), jwk(ED_KEY, "ed"))

SIGNERS = {"RS256": (RSA_KEY, "rsa"), "ES256": (EC_KEY, "ec"), "EdDSA": (ED_KEY, "ed")}


def token(
    alg: str = "RS256",
    key: Any = None,
    kid: str | None = "",
    **claims: Any,
) -> str:
    """A token signed by C{key} (by default the standard key for C{alg})."""
    default_key, default_kid = SIGNERS.get(alg, (RSA_KEY, "rsa"))
    signer: Any = default_key if key is None else key
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": "kthena", "sub": "alice", "iat": now, "exp": now + 600}
    payload.update(claims)
    payload = {k: v for k, v in payload.items() if v is not None}
    kid = default_kid if kid == "" else kid
    return jwt.encode(
        payload,
        signer,
        algorithm=alg,
        headers=None if kid is None else {"kid": kid},
    )


def forged(header: dict[str, Any], payload: dict[str, Any], sign: Any = None) -> str:
    """A token put together by hand (what PyJWT would refuse to sign)."""
    head = base64url_encode(json.dumps(header).encode())
    body = base64url_encode(json.dumps(payload).encode())
    signature = b"" if sign is None else base64url_encode(sign(head + b"." + body))
    return (head + b"." + body + b"." + signature).decode()


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": ISSUER, "aud": "kthena", "sub": "mallory", "exp": now + 600, **extra}


class FakeExchange:
    """The one thing the identifier reads of a request: its headers."""

    def __init__(self, headers: dict[bytes, bytes]) -> None:
        self.headers = {k.lower(): v for k, v in headers.items()}

    def header(self, name: bytes) -> bytes | None:
        return self.headers.get(name.lower())


def exchange(bearer: str | None = None, **headers: str) -> IExchange:
    raw = {k.replace("_", "-").encode(): v.encode() for k, v in headers.items()}
    if bearer is not None:
        raw[b"authorization"] = f"Bearer {bearer}".encode()
    return cast(IExchange, FakeExchange(raw))


def jwt_config(**extra: Any) -> JwtConfig:
    settings: dict[str, Any] = {"issuer": ISSUER, "audiences": ("kthena",), "jwks_url": URL}
    settings.update(extra)
    if "jwks_file" in extra:
        settings["jwks_url"] = None
    return JwtConfig(**settings)


class JwksResource(Resource):
    """A JWKS endpoint that counts its requests and can hold them until released."""

    isLeaf = True

    def __init__(self, body: bytes = STANDARD_JWKS) -> None:
        super().__init__()
        self.body = body
        self.status = 200
        self.requests = 0
        self.hold = False
        self.held: list[Request] = []

    def render_GET(self, request: Request) -> bytes | int:
        self.requests += 1
        if self.hold:
            self.held.append(request)
            return NOT_DONE_YET
        request.setResponseCode(self.status)
        return self.body

    def release(self) -> None:
        held, self.held = self.held, []
        for request in held:
            request.setResponseCode(self.status)
            request.write(self.body)
            request.finish()


@dataclass
class Env:
    """An identifier over a URL-fed key set, on a Clock."""

    config: IdentityConfig
    resource: JwksResource = field(default_factory=JwksResource)
    clock: Clock = field(default_factory=Clock)

    def __post_init__(self) -> None:
        self.agent = RequestTraversalAgent(self.resource)
        self.service = JwksService(
            cast(IServerReactor, self.clock), self.config, cast(Any, self.agent)
        )
        self.identifier = Identifier(self.config, self.service)

    def start(self) -> Env:
        self.service.startService()
        self.flush()
        return self

    def flush(self) -> None:
        self.agent.flush()

    def release(self) -> None:
        self.resource.release()
        self.flush()

    def stop(self) -> None:
        self.service.stopService()
        self.flush()
        assert self.clock.getDelayedCalls() == []

    def who(self, ex: IExchange) -> Identity:
        result = self.identifier.identify(ex)
        assert isinstance(result, Identity), "expected an answer without waiting"
        return result


@pytest.fixture
def env() -> Iterator[Env]:
    e = Env(IdentityConfig(jwt=jwt_config())).start()
    yield e
    e.stop()


def env_with(**settings: Any) -> Env:
    return Env(IdentityConfig(**settings)).start()


def refused(env: Env, ex: IExchange) -> UnauthorizedError:
    with pytest.raises(UnauthorizedError) as e:
        env.identifier.identify(ex)
    return e.value


def failure_of(d: Deferred[Any]) -> BaseException:
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures, "the Deferred has not failed"
    error = failures[0].value
    assert error is not None
    return error


def result_of(d: Deferred[Any]) -> Any:
    results: list[object] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def challenge(error: UnauthorizedError) -> bytes:
    (name, value), *_ = error.headers
    assert name == b"www-authenticate"
    return value


# -- the interfaces


def test_interfaces_are_provided(env: Env) -> None:
    assert verifyObject(IIdentifier, env.identifier)
    assert verifyObject(IReconfigurable, env.identifier)
    assert verifyObject(IReconfigurable, env.service)


def test_build_identity_gives_an_identifier_and_its_key_service() -> None:
    identifier, service = build_identity(IdentityConfig(), cast(IServerReactor, Clock()))
    assert identifier.jwks is service
    assert identifier.identify(exchange()) == ANONYMOUS


# -- good tokens


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_each_algorithm_is_verified_at_once(env: Env, alg: str) -> None:
    assert env.who(exchange(token(alg, sub=f"user-{alg}"))) == Identity(
        f"user-{alg}", "standard", "jwt"
    )


def test_rsa_keys_without_alg_verify_pss_when_allowed() -> None:
    e = env_with(jwt=jwt_config(algorithms=("PS256", "RS256")))
    assert e.who(exchange(token("PS256"))).user == "alice"
    refusal = refused(e, exchange(token("RS384")))
    assert "token algorithm not allowed (allowed: PS256, RS256)" in refusal.message
    e.stop()


def test_a_jwk_alg_binds_the_key_to_it() -> None:
    resource = JwksResource(jwks(jwk(RSA_KEY, "rsa", alg="RS512")))
    e = Env(IdentityConfig(jwt=jwt_config(algorithms=("RS256", "RS512"))), resource).start()
    assert e.who(exchange(token("RS512"))).user == "alice"
    assert "does not match its signing key" in refused(e, exchange(token("RS256"))).message
    e.stop()


def test_any_listed_audience_is_accepted() -> None:
    e = env_with(jwt=jwt_config(audiences=("a", "b")))
    assert e.who(exchange(token(aud="b"))).user == "alice"
    assert e.who(exchange(token(aud=["x", "a"]))).user == "alice"
    assert "wrong token audience" in refused(e, exchange(token(aud=["x", "y"]))).message
    e.stop()


def test_a_token_without_kid_tries_the_keys_of_its_algorithm() -> None:
    resource = JwksResource(jwks(jwk(OTHER_RSA_KEY, None), jwk(RSA_KEY, None)))
    e = Env(IdentityConfig(jwt=jwt_config()), resource).start()
    assert e.who(exchange(token(kid=None))).user == "alice"
    forged_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert refused(e, exchange(token(key=forged_key, kid=None))).message == "bad token signature"
    e.stop()


def test_leeway_covers_clock_skew() -> None:
    now = int(time.time())
    e = env_with(jwt=jwt_config(leeway=60.0))
    assert e.who(exchange(token(exp=now - 30))).user == "alice"
    assert e.who(exchange(token(nbf=now + 30, iat=now + 30))).user == "alice"
    assert refused(e, exchange(token(exp=now - 120))).message == "token expired"
    assert "not yet valid" in refused(e, exchange(token(nbf=now + 120))).message
    e.stop()
    strict = env_with(jwt=jwt_config(leeway=0.0))
    assert refused(strict, exchange(token(exp=now - 30))).message == "token expired"
    strict.stop()


# -- every 401


def test_missing_token_when_required(env: Env) -> None:
    for ex in (
        exchange(),
        cast(IExchange, FakeExchange({b"authorization": b"Basic YWxpY2U6c2VjcmV0"})),
    ):
        error = refused(env, ex)
        assert error.status == 401
        assert error.error_type is ErrorType.UNAUTHORIZED
        assert error.message == "missing bearer token (Authorization: Bearer <JWT>)"
        assert challenge(error) == b'Bearer realm="kthena"'
    body = error_object(error.status, error.error_type, error.message)
    assert body["error"] == {
        "message": error.message,
        "type": "invalid_request_error",
        "code": "unauthorized",
    }


def invalid_tokens() -> list[tuple[str, str, str]]:
    now = int(time.time())
    pem = RSA_KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )  # fmt: skip

    def hs256(data: bytes) -> bytes:
        return hmac.new(pem, data, hashlib.sha256).digest()

    return [
        ("not a jwt", "abc", "malformed token (not a signed JWT)"),
        ("three junk parts", "a.b.c", "malformed token (not a signed JWT)"),
        ("not base64", "eyJ!!.eyJ.sig", "malformed token (not a signed JWT)"),
        (
            "header not an object",
            "WzFd." + forged({"alg": "RS256"}, claims()).split(".", 1)[1],
            "malformed token",
        ),
        ("expired", token(exp=now - 3600), "token expired"),
        ("not yet valid", token(nbf=now + 3600), "token not yet valid (nbf or iat in the future)"),
        ("issued in the future", token(iat=now + 3600), "token not yet valid"),
        ("wrong issuer", token(iss="https://evil.example"), "wrong token issuer"),
        ("wrong audience", token(aud="other"), "wrong token audience"),
        ("no audience", token(aud=None), "token has no aud claim"),
        ("no issuer", token(iss=None), "token has no iss claim"),
        ("no expiry", token(exp=None), "token has no exp claim"),
        ("bad signature", token(key=OTHER_RSA_KEY), "bad token signature"),
        (
            "alg none",
            forged({"alg": "none", "kid": "rsa"}, claims()),
            "token algorithm not allowed",
        ),
        ("alg none unsigned", jwt.encode(claims(), cast(Any, None), "none"), "not allowed"),
        (
            "hs256 with the public key",
            forged({"alg": "HS256", "kid": "rsa"}, claims(), hs256),
            "token algorithm not allowed",
        ),
        ("no alg", forged({"kid": "rsa"}, claims()), "malformed token"),
        (
            "alg of another key",
            token("ES256", key=EC_KEY, kid="rsa"),
            "token algorithm does not match its signing key",
        ),
        ("non-string sub", token(sub=123), "malformed token (sub is not a string)"),
        ("empty sub", token(sub=""), "token claim sub must be a non-empty string"),
        ("exp not a number", token(exp="tomorrow"), "malformed token"),
        ("non-string kid", forged({"alg": "RS256", "kid": 7}, claims()), "malformed token"),
        (
            "unsupported crit",
            forged({"alg": "RS256", "kid": "rsa", "crit": ["x"], "x": 1}, claims()),
            "malformed token",
        ),
    ]


INVALID = invalid_tokens()


@pytest.mark.parametrize(("case", "bearer", "message"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_tokens_are_401_saying_why(env: Env, case: str, bearer: str, message: str) -> None:
    error = refused(env, exchange(bearer))
    assert error.status == 401 and error.error_type is ErrorType.UNAUTHORIZED
    assert message in error.message
    value = challenge(error)
    assert value.startswith(b'Bearer realm="kthena", error="invalid_token", error_description="')
    assert error.message.encode() in value
    for part in bearer.split("."):  # nothing of the token comes back
        if len(part) > 8:
            assert part not in error.message and part.encode() not in value


def test_a_present_invalid_token_is_401_even_when_not_required() -> None:
    e = env_with(jwt=jwt_config(required=False), header=HeaderConfig("X-User-Id"))
    assert e.who(exchange()) == Identity("anonymous", "standard", "anonymous")
    assert e.who(exchange(x_user_id="bob")) == Identity("bob", "standard", "header")
    error = refused(e, exchange(token(exp=int(time.time()) - 3600), x_user_id="bob"))
    assert error.message == "token expired"
    e.stop()


def test_a_custom_user_claim_must_be_a_non_empty_string() -> None:
    e = env_with(jwt=jwt_config(user_claim="email"))
    assert e.who(exchange(token(email="a@example.com"))).user == "a@example.com"
    for value in (5, None, "", ["a"]):
        error = refused(e, exchange(token(email=value)))
        assert error.message == "token claim email must be a non-empty string"
    e.stop()


# -- priorities


def test_priority_from_the_claim_in_the_closed_set() -> None:
    e = env_with(jwt=jwt_config(priority_claim="priority"), default_priority="sheddable")
    assert e.who(exchange(token(priority="critical"))).priority == "critical"
    assert e.who(exchange(token(priority=" Critical "))).priority == "critical"
    assert e.who(exchange(token(priority="standard"))).priority == "standard"
    for unknown in ("gold", 3, None, ["critical"]):
        assert e.who(exchange(token(priority=unknown))).priority == "sheddable"
    e.stop()


def test_no_priority_claim_configured_means_the_default() -> None:
    e = env_with(jwt=jwt_config())
    assert e.who(exchange(token(priority="critical"))).priority == "standard"
    e.stop()


def test_priority_from_the_header() -> None:
    identifier = Identifier(
        IdentityConfig(
            header=HeaderConfig("X-User-Id", "X-Priority"),
            priorities=("gold", "silver"),
            default_priority="silver",
        )
    )
    assert identifier.identify(exchange(x_user_id="u", x_priority="gold")) == Identity(
        "u", "gold", "header"
    )
    assert identifier.identify(exchange(x_user_id="u", x_priority="GOLD")).priority == "gold"  # type: ignore[union-attr]
    for unknown in ("platinum", "", "g\x01old"):
        result = identifier.identify(exchange(x_user_id="u", x_priority=unknown))
        assert result == Identity("u", "silver", "header")
    assert identifier.identify(exchange(x_user_id="u")) == Identity("u", "silver", "header")
    # A priority header without a user is not an identity: anonymous at the default.
    assert identifier.identify(exchange(x_priority="gold")) == Identity(
        "anonymous", "silver", "anonymous"
    )


# -- header identity


@pytest.mark.parametrize(
    ("raw", "user"),
    [
        (b"alice", "alice"),
        (b"  alice \t", "alice"),
        (b"a" * 256, "a" * 256),
        (b"a" * 257, None),
        (b"", None),
        (b"   ", None),
        (b"caf\xc3\xa9", None),
        (b"al\x00ice", None),
        (b"al\x7fice", None),
        (b"a b", "a b"),
    ],
)
def test_header_identity_rules(raw: bytes, user: str | None) -> None:
    assert header_value(raw) == user
    identifier = Identifier(IdentityConfig(header=HeaderConfig("X-User-Id")))
    result = identifier.identify(cast(IExchange, FakeExchange({b"x-user-id": raw})))
    expected = ANONYMOUS if user is None else Identity(user, "standard", "header")
    assert result == expected


def test_jwt_wins_over_the_header_which_stands_in_for_a_token() -> None:
    e = env_with(jwt=jwt_config(), header=HeaderConfig("X-User-Id"))
    assert e.who(exchange(token(sub="alice"), x_user_id="bob")) == Identity(
        "alice", "standard", "jwt"
    )
    # Without a token, the gateway's header names the caller, even with tokens required.
    assert e.who(exchange(x_user_id="bob")) == Identity("bob", "standard", "header")
    assert refused(e, exchange(x_user_id="")).message.startswith("missing bearer token")
    e.stop()


def test_anonymous_when_unconfigured() -> None:
    identifier = Identifier(IdentityConfig())
    assert identifier.identify(exchange()) == ANONYMOUS
    assert identifier.identify(exchange("garbage", x_user_id="bob")) == ANONYMOUS
    assert Identity("anonymous", "standard", "anonymous") == ANONYMOUS
    assert Identifier(IdentityConfig(priorities=("a", "b"), default_priority="b")).identify(
        exchange()
    ) == Identity("anonymous", "b", "anonymous")


def test_jwt_needs_a_key_service() -> None:
    with pytest.raises(ValueError, match="needs a JwksService"):
        Identifier(IdentityConfig(jwt=jwt_config()))


def test_bearer_token_parsing() -> None:
    assert bearer_token(None) is None
    assert bearer_token(b"Basic abc") is None
    assert bearer_token(b"bearer abc") == "abc"
    assert bearer_token(b"  BEARER   abc  ") == "abc"
    assert bearer_token(b"Bearer \xff") == ""


# -- unknown keys: one refresh in flight, rate-limited, bounded waits


def rotated_jwks() -> bytes:
    return jwks(jwk(RSA_KEY, "rsa"), jwk(OTHER_RSA_KEY, "rsa-2"))


def test_many_unknown_kid_requests_share_one_refresh(env: Env) -> None:
    assert env.resource.requests == 1
    env.resource.hold = True
    env.resource.body = rotated_jwks()
    env.clock.advance(11)  # past the on-demand limit since the start's read
    new = token(key=OTHER_RSA_KEY, kid="rsa-2", sub="carol")
    waiting = [env.identifier.identify(exchange(new)) for _ in range(20)]
    assert all(isinstance(d, Deferred) and not d.called for d in waiting)
    # A known key still answers at once while the refresh is in flight.
    assert env.who(exchange(token())).user == "alice"
    assert env.resource.requests == 2
    env.release()
    assert [result_of(cast(Deferred[Any], d)) for d in waiting] == [
        Identity("carol", "standard", "jwt")
    ] * 20
    assert env.resource.requests == 2
    assert env.who(exchange(new)).user == "carol"  # now known: no wait


def test_unknown_kid_after_a_refresh_is_401_and_refreshes_are_rate_limited(env: Env) -> None:
    env.clock.advance(11)
    stranger = token(key=OTHER_RSA_KEY, kid="nobody")
    d = env.identifier.identify(exchange(stranger))
    assert isinstance(d, Deferred)
    assert env.resource.requests == 2
    error = failure_of(d)
    assert isinstance(error, UnauthorizedError)
    assert error.message == "token signed with an unknown key (its kid is not in the key set)"
    assert b'error="invalid_token"' in challenge(error)
    # Within 10 s of that read, no other: the answer is at once.
    env.clock.advance(5)
    for _ in range(5):
        assert "unknown key" in refused(env, exchange(stranger)).message
    assert env.resource.requests == 2
    env.clock.advance(5)
    d = env.identifier.identify(exchange(stranger))
    assert isinstance(d, Deferred)
    assert env.resource.requests == 3
    assert isinstance(failure_of(d), UnauthorizedError)


def test_a_wait_for_keys_is_bounded(env: Env) -> None:
    env.clock.advance(11)
    env.resource.hold = True
    d = env.identifier.identify(exchange(token(key=OTHER_RSA_KEY, kid="rsa-2")))
    assert isinstance(d, Deferred)
    env.clock.advance(4.9)
    assert not d.called
    env.clock.advance(0.2)
    error = failure_of(d)
    assert isinstance(error, UnauthorizedError)
    assert error.message.endswith("the key set could not be read in time")
    # The fetch itself gives up at its own timeout; the last good keys stay.
    with capturedLogs() as events:
        env.clock.advance(5)
    assert [e["log_level"].name for e in events] == ["warn"]
    assert events[0]["why"] == "JwksFetchError: no answer within 10s"
    assert env.who(exchange(token())).user == "alice"
    env.resource.hold = False


def test_a_request_that_leaves_stops_waiting(env: Env) -> None:
    env.clock.advance(11)
    env.resource.hold = True
    d = env.identifier.identify(exchange(token(key=OTHER_RSA_KEY, kid="rsa-2")))
    assert isinstance(d, Deferred)
    d.cancel()
    d.addErrback(lambda f: None)
    assert env.service._waiters == []
    env.resource.hold = False
    env.release()


def test_before_the_first_key_set_tokens_wait_for_it() -> None:
    resource = JwksResource()
    resource.hold = True
    e = Env(IdentityConfig(jwt=jwt_config()), resource).start()
    d = e.identifier.identify(exchange(token()))
    assert isinstance(d, Deferred) and not d.called
    assert resource.requests == 1  # joined the start's read
    e.release()
    assert result_of(d).user == "alice"
    e.stop()


def test_without_any_key_set_a_token_is_401() -> None:
    resource = JwksResource(b"not json")
    e = Env(IdentityConfig(jwt=jwt_config()), resource)
    with capturedLogs():
        e.start()
    assert e.service.keys.size == 0
    assert "unknown key" in refused(e, exchange(token())).message  # read 0 s ago: no other
    e.stop()


# -- the key set's service


def test_periodic_refresh_on_the_clock() -> None:
    e = env_with(jwt=jwt_config(refresh_interval=60.0))
    assert e.resource.requests == 1
    e.clock.advance(59)
    assert e.resource.requests == 1
    e.resource.body = rotated_jwks()
    e.clock.advance(1)
    e.flush()
    assert e.resource.requests == 2
    assert e.service.keys.kids == {"rsa", "rsa-2"}
    e.clock.advance(60)
    e.flush()
    assert e.resource.requests == 3
    assert e.service.loads == 3
    e.stop()


def test_a_failed_refresh_keeps_the_last_good_keys_and_logs_once_per_streak() -> None:
    e = env_with(
        jwt=jwt_config(jwks_url="https://u:hunter2@idp.example/jwks", refresh_interval=60.0)
    )
    with capturedLogs() as events:
        for status, body in ((500, b"oops"), (200, b"{}"), (200, b"[1]")):
            e.resource.status, e.resource.body = status, body
            e.clock.advance(60)
            e.flush()
            assert e.who(exchange(token())).user == "alice"
        assert e.service.failures == 3
        e.resource.status, e.resource.body = 200, rotated_jwks()
        e.clock.advance(60)
        e.flush()
    warnings = [ev for ev in events if ev["log_level"].name == "warn"]
    assert len(warnings) == 1
    assert "answered 500" in warnings[0]["why"]
    texts = [str(ev["log_format"]) + json.dumps(ev.get("source")) for ev in events]
    assert all("hunter2" not in text for text in texts)
    assert "<redacted>" in warnings[0]["source"]
    assert any("read again after 3 failures" in _text(ev) for ev in events)
    assert e.service.failures == 0
    assert e.service.keys.kids == {"rsa", "rsa-2"}
    e.stop()


def _text(event: LogEvent) -> str:
    from twisted.logger import formatEvent

    return formatEvent(event)


def test_redirects_are_not_followed() -> None:
    e = Env(IdentityConfig(jwt=jwt_config()))
    e.resource.status = 302
    with capturedLogs() as events:
        e.start()
    assert "answered 302" in _text(events[0])
    assert e.service.keys.size == 0
    e.stop()


def test_stop_leaves_nothing_behind_and_lets_waiters_go() -> None:
    e = env_with(jwt=jwt_config())
    e.clock.advance(11)
    e.resource.hold = True
    d = e.identifier.identify(exchange(token(key=OTHER_RSA_KEY, kid="rsa-2")))
    assert isinstance(d, Deferred)
    assert e.clock.getDelayedCalls()  # the loop, the wait, the fetch's timeout
    e.stop()  # asserts no delayed call is left
    assert isinstance(failure_of(d), UnauthorizedError)
    assert not e.service.running


def test_reconfigure_to_another_source_drops_old_keys_and_reads_now(tmp_path: Path) -> None:
    e = env_with(jwt=jwt_config())
    assert e.resource.requests == 1
    path = tmp_path / "jwks.json"
    path.write_bytes(jwks(jwk(EC_KEY, "ec")))
    config = IdentityConfig(jwt=jwt_config(jwks_file=str(path)))
    e.service.reconfigure(_Router(config))
    e.identifier.reconfigure(_Router(config))
    assert e.service.keys.kids == {"ec"}
    assert "unknown key" in refused(e, exchange(token("RS256"))).message  # read just now
    assert e.who(exchange(token("ES256"))).user == "alice"
    # The file is read again every interval.
    path.write_bytes(jwks(jwk(EC_KEY, "ec"), jwk(ED_KEY, "ed")))
    e.clock.advance(300)
    assert e.service.keys.kids == {"ec", "ed"}
    assert e.resource.requests == 1
    e.stop()


def test_reconfigure_while_a_fetch_is_in_flight_moves_its_waiters(tmp_path: Path) -> None:
    e = env_with(jwt=jwt_config())
    e.clock.advance(11)
    e.resource.hold = True
    d = e.identifier.identify(exchange(token("ES256", kid="ec-2")))
    assert isinstance(d, Deferred) and not d.called
    path = tmp_path / "jwks.json"
    path.write_bytes(jwks(jwk(EC_KEY, "ec-2")))
    e.service.reconfigure(_Router(IdentityConfig(jwt=jwt_config(jwks_file=str(path)))))
    assert result_of(d).user == "alice"
    e.resource.hold = False
    e.stop()


def test_reconfigure_interval_and_removal() -> None:
    e = env_with(jwt=jwt_config(refresh_interval=60.0))
    longer = IdentityConfig(jwt=jwt_config(refresh_interval=600.0))
    e.service.reconfigure(_Router(longer))
    e.clock.advance(60)
    e.flush()
    assert e.resource.requests == 1
    e.clock.advance(540)
    e.flush()
    assert e.resource.requests == 2
    e.service.reconfigure(_Router(IdentityConfig()))
    e.identifier.reconfigure(_Router(IdentityConfig()))
    assert e.clock.getDelayedCalls() == []
    assert e.identifier.identify(exchange(token())) == ANONYMOUS
    e.stop()


def test_the_service_is_idle_without_jwt() -> None:
    clock = Clock()
    service = JwksService(cast(IServerReactor, clock), IdentityConfig())
    service.startService()
    assert clock.getDelayedCalls() == []
    assert service.wait_for_keys() is None
    result_of(service.stopService())


def test_a_missing_file_is_logged_and_later_read(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    clock = Clock()
    config = IdentityConfig(jwt=jwt_config(jwks_file=str(path), refresh_interval=30.0))
    service = JwksService(cast(IServerReactor, clock), config)
    identifier = Identifier(config, service)
    with capturedLogs() as events:
        service.startService()
    assert len(events) == 1 and "No such file" in events[0]["why"]
    path.write_bytes(STANDARD_JWKS)
    clock.advance(5)  # too soon for a read on demand
    assert "unknown key" in _refusal(identifier, exchange(token())).message
    clock.advance(5)  # now a token with an unknown key reads the file again
    d = identifier.identify(exchange(token()))
    assert isinstance(d, Deferred)
    assert result_of(d).user == "alice"
    assert identifier.identify(exchange(token())) == Identity("alice", "standard", "jwt")
    result_of(service.stopService())
    assert clock.getDelayedCalls() == []


def _refusal(identifier: Identifier, ex: IExchange) -> UnauthorizedError:
    with pytest.raises(UnauthorizedError) as e:
        identifier.identify(ex)
    return e.value


def test_a_file_over_the_cap_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_bytes(b" " * (1 << 20) + STANDARD_JWKS)
    clock = Clock()
    service = JwksService(
        cast(IServerReactor, clock), IdentityConfig(jwt=jwt_config(jwks_file=str(path)))
    )
    with capturedLogs() as events:
        service.startService()
    assert "over 1048576 bytes" in events[0]["why"]
    result_of(service.stopService())


@dataclass(frozen=True)
class _Router:
    """What reconfigure reads of a RouterConfig."""

    identity: IdentityConfig


# -- the key set


def test_key_set_keeps_signing_keys_only() -> None:
    keys = KeySet.from_json(
        jwks(
            jwk(RSA_KEY, "rsa"),
            jwk(EC_KEY, "ec", use="sig", key_ops=["verify"]),
            jwk(ED_KEY, "ed"),
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            jwk(EC_KEY, "enc", use="enc"),
            jwk(EC_KEY, "ops", key_ops=["encrypt"]),
            jwk(ED_KEY, "hs", alg="HS256"),
            {**jwk(EC_KEY, "private"), "d": "AAAA"},
            {"kty": "RSA", "kid": "broken", "n": "AQAB"},
            "not a key",
        )
    )
    assert keys.kids == {"rsa", "ec", "ed"}
    assert keys.size == 3 and keys.skipped == 7
    assert set(keys.by_kid["rsa"]) == {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
    assert set(keys.by_kid["ec"]) == {"ES256"}
    assert set(keys.by_kid["ed"]) == {"EdDSA"}
    assert not any(alg.startswith("HS") for alg in keys.by_alg)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"nope", "not JSON"),
        (b"[]", "not a JWKS"),
        (b'{"keys": {}}', "not a JWKS"),
        (b'{"keys": []}', "no usable signing key"),
        (jwks({"kty": "oct", "k": "c2VjcmV0"}), "no usable signing key (1 left out"),
    ],
)
def test_key_set_errors(data: bytes, message: str) -> None:
    with pytest.raises(KeySetError, match=message.replace("(", r"\(")):
        KeySet.from_json(data)


def test_identifier_reconfigure_swaps_settings(env: Env) -> None:
    assert env.who(exchange(token(priority="critical"))).priority == "standard"
    config = IdentityConfig(jwt=replace(jwt_config(), priority_claim="priority"))
    env.identifier.reconfigure(_Router(config))
    env.service.reconfigure(_Router(config))
    assert env.resource.requests == 1  # same source: keys kept, nothing read
    assert env.who(exchange(token(priority="critical"))).priority == "critical"
