"""
The JWKS fetch over a real loopback socket, with the service's own Agent and pool: the
key set arrives at start, a token naming a new key makes it fetch again, and stopping
closes its pool and leaves no timer behind.
"""

from __future__ import annotations

import json
import time
from typing import Any, cast

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from kthena.config.identity import IdentityConfig, JwtConfig
from kthena.identity.identity import Identifier, Identity
from kthena.identity.jwks import JwksService
from kthena.interfaces import IExchange
from tests.integration.router_helpers import LOOPBACK, inline

KEY = ec.generate_private_key(ec.SECP256R1())
NEW_KEY = ec.generate_private_key(ec.SECP256R1())


def jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    return {**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid}


class Keys(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.keys = [jwk(KEY, "one")]
        self.requests = 0

    def render_GET(self, request: Request) -> bytes:
        self.requests += 1
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"keys": self.keys}).encode()


class Exchange:
    def __init__(self, token: str) -> None:
        self.token = token

    def header(self, name: bytes) -> bytes | None:
        return f"Bearer {self.token}".encode() if name == b"authorization" else None


def token(key: ec.EllipticCurvePrivateKey, kid: str) -> str:
    now = int(time.time())
    claims = {"iss": "https://idp", "aud": "kthena", "sub": "alice", "exp": now + 60}
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})


async def until(reactor: Any, check: Any) -> None:
    for _ in range(500):
        if check():
            return
        d: Deferred[None] = Deferred()
        reactor.callLater(0.01, d.callback, None)
        await d
    raise AssertionError("never happened")


@inline
async def test_jwks_over_a_real_socket() -> None:
    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor
    resource = Keys()
    port: Any = reactor.listenTCP(0, Site(resource), interface=LOOPBACK)
    before = set(reactor.getDelayedCalls())
    try:
        url = f"http://{LOOPBACK}:{port.getHost().port}/jwks"
        config = IdentityConfig(
            jwt=JwtConfig(issuer="https://idp", audiences=("kthena",), jwks_url=url)
        )
        service = JwksService(reactor, config, min_on_demand=0.0)
        identifier = Identifier(config, service)
        service.startService()
        await until(reactor, lambda: service.loads == 1)
        who = identifier.identify(cast(IExchange, Exchange(token(KEY, "one"))))
        assert who == Identity("alice", "standard", "jwt")

        resource.keys.append(jwk(NEW_KEY, "two"))
        waiting = identifier.identify(cast(IExchange, Exchange(token(NEW_KEY, "two"))))
        assert isinstance(waiting, Deferred)
        assert await waiting == Identity("alice", "standard", "jwt")
        assert resource.requests == 2

        await service.stopService()
        assert not service.running
        # Nothing of the service's is left (the server side's connection closes too).
        await until(reactor, lambda: set(reactor.getDelayedCalls()) <= before)
    finally:
        await port.stopListening()
