"""
In-memory harness for the admin listener's unit tests: a L{RouterService} built from a
config (never started: no sockets) on a L{MemoryReactorClock}, its proxy answered by a
fake upstream the test drives, and each admin listener's resource tree served through
a real L{HTTPChannel} over a L{StringTransport} with the peer address the test picks.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import MemoryReactorClock
from twisted.web.server import Site

from kthena.config.router import parse_config
from kthena.http.server import LeanSite
from kthena.interfaces import IServerReactor
from kthena.observability.admin import Runner
from kthena.pods import PodEndpoint
from kthena.proxy.site import ProxySite
from kthena.service import RouterService
from kthena.webutil import QuietSite
from tests.unit.proxyfixtures import (
    Client,
    FakeUpstream,
    OrderedScheduler,
    WireResponse,
)
from tests.unit.routerfixtures import Doc, in_namespace, pd_server, pod, route, server

LOOPBACK_PEER = IPv4Address("TCP", "127.0.0.1", 40001)
REMOTE_PEER = IPv4Address("TCP", "10.1.2.3", 5555)
TOKEN = "s3cret-debug-token-0123456789"
REDIS_PASSWORD = "hunter2-redis"
AUTH_HEADER_VALUE = "Bearer sk-live-abcdef"
CHAT = "/v1/chat/completions"


def resources() -> list[Doc]:
    """
    Routes C{m} (with adapter C{m-lora}; a header rule and a default rule) and an older
    C{m-old} for the same model; servers C{base}, C{pd} (a PD group), C{empty} (no pods)
    and a second C{base} in namespace C{other}; pods p0, p1 (base), pre0 / dec0 (pd),
    a Pending pod of base, and o0 (other/base).
    """
    p0 = pod("p0", "10.0.0.1", {"app": "m", "version": "v1"})
    p0["spec"] = {"nodeName": "node-a"}
    p0["status"]["startTime"] = "2025-01-15T10:00:00Z"
    p1 = pod("p1", "10.0.0.2", {"app": "m"})
    p1["status"]["startTime"] = datetime(2025, 1, 16, 8, 30, tzinfo=UTC)  # as YAML loads it
    return [
        route(
            "m",
            {
                "modelName": "m",
                "loraAdapters": ["m-lora"],
                "rules": [
                    {
                        "name": "tier",
                        "modelMatch": {
                            "headers": {
                                "Authorization": {"exact": AUTH_HEADER_VALUE},
                                "X-Tier": {"exact": "gold"},
                            }
                        },
                        "targetModels": [
                            {"modelServerName": "base", "weight": 70},
                            {"modelServerName": "pd", "weight": 30},
                        ],
                    },
                    {"name": "default", "targetModels": [{"modelServerName": "base"}]},
                ],
                "rateLimit": {
                    "inputTokensPerUnit": 100,
                    "unit": "minute",
                    "global": {
                        "redis": {"address": f"redis://admin:{REDIS_PASSWORD}@redis.local:6379/0"}
                    },
                },
            },
            created="2025-02-01T00:00:00Z",
        ),
        route(
            "m-old",
            {
                "modelName": "m",
                "rules": [
                    {
                        "name": "completions",
                        "modelMatch": {"uri": {"prefix": "/v1/completions"}},
                        "targetModels": [{"modelServerName": "base"}],
                    }
                ],
            },
            created="2025-01-01T00:00:00Z",
        ),
        server("base", {"app": "m"}, model="org/m"),
        pd_server("pd", "pd", "org/m"),
        server("empty", {"app": "nothing"}),
        in_namespace("other", server("base", {"app": "other"}, engine="SGLang", port=30000)),
        p0,
        p1,
        pod("pre0", "10.0.1.1", {"app": "pd", "role": "prefill", "group": "g1"}),
        pod("dec0", "10.0.1.2", {"app": "pd", "role": "decode", "group": "g1"}),
        pod("pending", "10.0.0.9", {"app": "m"}, phase="Pending", ready=False),
        in_namespace("other", pod("o0", "10.0.2.1", {"app": "other"})),
    ]


class AdminHarness:
    """A router (not started) with its admin sites served in memory."""

    def __init__(
        self,
        docs: list[Doc] | None = None,
        observability: dict[str, Any] | None = None,
        runner: Runner | None = None,
        **top: Any,
    ) -> None:
        obs: dict[str, Any] = {"accessLog": {"enabled": False}, **(observability or {})}
        raw = {
            "resources": resources() if docs is None else docs,
            "observability": obs,
            **top,
        }
        self.clock = MemoryReactorClock()
        self.config = parse_config(raw, "admin-test.yaml", Path("."), [])
        self.upstream = FakeUpstream()
        self.service = RouterService(
            self.config,
            cast(IServerReactor, self.clock),
            upstream=self.upstream,
            scheduler=OrderedScheduler(),
        )
        self.plane = self.service.plane
        admin = self.service.admin
        admin.metrics_resource.max_share = 1.0  # no pacing (the clock never moves by itself)
        if runner is not None:
            admin.metrics_resource.runner = runner
        path = self.config.observability.metrics.path
        self.sites: dict[str, Site] = {
            plan.name: QuietSite(admin.root(plan, path), self.clock) for plan, _ in admin.listeners
        }

    # -- the admin side

    def connect(
        self, listener: str = "admin", peer: IPv4Address | IPv6Address = LOOPBACK_PEER
    ) -> Client:
        """A client connection to one admin listener, kept open."""
        return Client(self.sites[listener], peer)

    def get(
        self,
        path: str,
        *,
        method: str = "GET",
        peer: IPv4Address | IPv6Address = LOOPBACK_PEER,
        headers: Iterable[tuple[str, str]] = (),
        listener: str = "admin",
    ) -> WireResponse:
        connection = self.connect(listener, peer)
        connection.request(method, path, headers=headers)
        return connection.got()

    def json(self, path: str, status: int = 200, **kw: Any) -> Any:
        """GET C{path}; check the status and the JSON content type; the parsed body."""
        response = self.get(path, **kw)
        assert response.status == status, (path, response.status, response.body)
        assert response.header("content-type") == "application/json", response.headers
        return json.loads(response.body)

    # -- the proxy side

    @property
    def proxy_site(self) -> ProxySite | LeanSite:
        site = self.service.proxy.factory
        assert isinstance(site, ProxySite | LeanSite)
        return site

    def send_chat(self, model: str = "m", request_id: str = "req-1") -> Client:
        """Start a chat completion through the proxy (answered by the test upstream)."""
        client = Client(self.proxy_site)
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
        client.request(
            "POST",
            CHAT,
            body.encode(),
            headers=[("content-type", "application/json"), ("x-request-id", request_id)],
        )
        return client

    def pod(self, key: str) -> PodEndpoint:
        return self.service.store.pods[key]


def completion(text: str = "hello") -> dict[str, Any]:
    return {
        "id": "cmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
