"""
C{downstream.server}: which HTTP server the proxy listener runs (twisted.web by default,
or the lean one), chosen at start; a reload that changes it says a restart is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import pytest
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs

from kthena.config.router import RouterConfig, parse_config
from kthena.config.validate import ConfigError
from kthena.http.server import LeanSite
from kthena.interfaces import IServerReactor
from kthena.proxy.site import ProxySite
from kthena.service import RouterService
from tests.unit.routerfixtures import pod, server, simple_route

DOCS = [simple_route("r", "m", "s"), server("s", {"app": "m"}), pod("p0", "10.0.0.1", {"app": "m"})]


def config(**downstream: object) -> RouterConfig:
    raw = {"resources": DOCS, "downstream": downstream}
    return parse_config(raw, "t.yaml", Path("."), [])


def test_lean_by_default() -> None:
    assert config().downstream.server == "lean"
    router = RouterService(config(), cast(IServerReactor, MemoryReactorClock()))
    site = router.proxy.site
    assert isinstance(site, LeanSite)
    assert site.handle == router.plane.pipeline.handle
    assert site.refused == router.plane.pipeline.refused


def test_twisted_web_when_asked() -> None:
    router = RouterService(config(server="twisted"), cast(IServerReactor, MemoryReactorClock()))
    assert isinstance(router.proxy.site, ProxySite)


def test_unknown_server_refused() -> None:
    with pytest.raises(ConfigError, match=r"downstream\.server: must be one of twisted, lean"):
        config(server="nginx")


def test_a_reload_changes_the_lean_site_but_not_the_server() -> None:
    router = RouterService(config(server="lean"), cast(IServerReactor, MemoryReactorClock()))
    with capturedLogs() as events:
        router.proxy.reconfigure(config(server="twisted"))
    assert [e.get("what") for e in events] == ["downstream.server"]
    new = parse_config(
        {"resources": DOCS, "maxBodyBytes": 5, "downstream": {"headerTimeout": "3s"}},
        "t.yaml",
        Path("."),
        [],
    )
    with capturedLogs() as events:
        router.proxy.reconfigure(new)
    assert [e.get("what") for e in events] == []  # the same server kind: nothing to restart
    site = router.proxy.site
    assert isinstance(site, LeanSite)  # still: a restart changes it
    assert (site.max_body_bytes, site.downstream.header_timeout) == (5, 3.0)
