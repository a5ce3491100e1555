"""
The reflector against a fake Kubernetes API on loopback (L{fake_kube}): objects appear,
change and go within a second; a dropped watch resumes from the last version without
losing what happened meanwhile; a 410 lists again; a silent watch is given up after its
idle timeout; errors back off and keep the last known objects; a rotated token is used.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted  # type: ignore[import-untyped]
from twisted.internet.task import deferLater

from kthena.sources import kubeclient
from kthena.sources.kubeaccess import KubeAccess
from kthena.sources.kubeclient import KubeClient
from kthena.sources.reflector import Backoff, Kind, Reflector
from tests.integration.fake_kube import FakeKube, serve
from tests.integration.router_helpers import inline

PODS = Kind("v1", "Pod", "pods")
ROUTES = Kind("networking.serving.volcano.sh/v1alpha1", "ModelRoute", "modelroutes")


def pod(name: str, ip: str, namespace: str = "default", ready: bool = True) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": "m"}},
        "status": {
            "podIP": ip,
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


class Harness:
    def __init__(self, reactor: Any, kube: FakeKube, port: int) -> None:
        self.reactor = reactor
        self.kube = kube
        self.access = KubeAccess(server=f"http://127.0.0.1:{port}")
        self.clients: list[KubeClient] = []
        self.reflectors: list[Reflector] = []
        self.changes = 0

    def reflector(
        self, kind: Kind = PODS, namespace: str | None = "default", **kw: Any
    ) -> Reflector:
        client = KubeClient(self.reactor, kw.pop("access", self.access))
        self.clients.append(client)

        def changed() -> None:
            self.changes += 1

        kw.setdefault("backoff", Backoff(0.05, 0.2))
        reflector = Reflector(client, self.reactor, kind, namespace, changed, **kw)
        reflector.start()
        self.reflectors.append(reflector)
        return reflector

    async def until(self, predicate: Callable[[], bool], what: str, timeout: float = 1.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                pytest.fail(f"not within {timeout}s: {what}")
            await deferLater(self.reactor, 0.01, lambda: None)

    async def close(self) -> None:
        for reflector in self.reflectors:
            reflector.stop()
        self.kube.drop()
        for client in self.clients:
            await client.close()


@pytest_twisted.async_yield_fixture  # type: ignore[untyped-decorator]
async def api() -> AsyncIterator[Harness]:
    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor
    kube, port = serve(reactor)
    harness = Harness(reactor, kube, port.getHost().port)
    try:
        yield harness
    finally:
        await harness.close()
        await port.stopListening()


def names(reflector: Reflector) -> set[str]:
    return set(reflector.objects)


def ip_of(reflector: Reflector, key: str) -> str | None:
    item = reflector.objects.get(key)
    return None if item is None else item["status"]["podIP"]


@inline
async def test_objects_appear_change_and_go(api: Harness) -> None:
    api.kube.apply("v1", "pods", pod("a", "10.0.0.1"))
    api.kube.apply("v1", "pods", pod("elsewhere", "10.0.9.9", namespace="other"))
    pods = api.reflector()
    await api.until(lambda: pods.synced, "the first list")
    assert names(pods) == {"default/a"}  # one namespace watched
    assert pods.objects["default/a"]["kind"] == "Pod"  # list items come without it
    api.kube.apply("v1", "pods", pod("b", "10.0.0.2"))
    await api.until(lambda: "default/b" in pods.objects, "b added")
    api.kube.apply("v1", "pods", pod("a", "10.0.0.7"))
    await api.until(lambda: ip_of(pods, "default/a") == "10.0.0.7", "a changed")
    api.kube.delete("v1", "pods", "default", "a")
    await api.until(lambda: names(pods) == {"default/b"}, "a deleted")
    assert pods.errors == 0


@inline
async def test_every_namespace_and_pages(api: Harness) -> None:
    for i in range(7):
        api.kube.apply("v1", "pods", pod(f"p{i}", f"10.0.0.{i + 1}", namespace=f"ns{i % 2}"))
    pods = api.reflector(namespace=None, page=3)
    await api.until(lambda: pods.synced, "the list")
    assert len(pods.objects) == 7
    lists = [p for path, p, _ in api.kube.requests if path == "/api/v1/pods" and "watch" not in p]
    assert [p.get("continue") for p in lists] == [None, "3", "6"]


@inline
async def test_a_dropped_watch_resumes_from_the_last_version(api: Harness) -> None:
    pods = api.reflector()
    await api.until(lambda: pods.synced, "the list")
    api.kube.apply("v1", "pods", pod("a", "10.0.0.1"))
    await api.until(lambda: "default/a" in pods.objects, "a")
    api.kube.drop()
    api.kube.apply("v1", "pods", pod("b", "10.0.0.2"))  # while nobody watches
    await api.until(lambda: "default/b" in pods.objects, "b, after the drop")
    watches = [p for _, p, _ in api.kube.requests if p.get("watch")]
    assert watches[-1]["resourceVersion"] == "1"  # resumed where it was, not listed again
    assert sum(1 for _, p, _ in api.kube.requests if not p.get("watch")) == 1


@inline
async def test_too_old_a_version_lists_again(api: Harness) -> None:
    api.kube.apply("v1", "pods", pod("a", "10.0.0.1"))
    pods = api.reflector()
    await api.until(lambda: pods.synced, "the list")
    api.kube.silent = True
    api.kube.delete("v1", "pods", "default", "a")
    api.kube.apply("v1", "pods", pod("b", "10.0.0.2"))
    api.kube.compact()  # the deletion is no longer in the history: 410
    api.kube.silent = False
    api.kube.end_watches()
    await api.until(lambda: names(pods) == {"default/b"}, "the state after a new list")
    assert sum(1 for _, p, _ in api.kube.requests if not p.get("watch")) == 2
    assert pods.errors == 0  # a 410 is not an outage


@inline
async def test_bookmarks_move_the_version(api: Harness) -> None:
    pods = api.reflector()
    await api.until(lambda: pods.synced, "the list")
    api.kube.apply("v1", "pods", pod("x", "10.0.0.1", namespace="other"))  # not watched
    api.kube.bookmark()
    await api.until(lambda: pods._version == "1", "the bookmark's version")
    assert api.changes == 1  # the list; a bookmark changes nothing


@inline
async def test_a_silent_watch_is_given_up(api: Harness) -> None:
    pods = api.reflector(idle_timeout=0.3)
    await api.until(lambda: pods.synced, "the list")
    api.kube.silent = True  # the connection stays open and nothing comes: half-open
    api.kube.apply("v1", "pods", pod("a", "10.0.0.1"))
    await api.until(lambda: pods.errors >= 1, "the idle timeout", timeout=2.0)
    assert pods.last_error is not None and "nothing arrived" in pods.last_error
    api.kube.silent = False
    await api.until(lambda: "default/a" in pods.objects, "a, on a new watch", timeout=2.0)


@inline
async def test_an_outage_keeps_the_last_known_objects(api: Harness) -> None:
    api.kube.apply("v1", "pods", pod("a", "10.0.0.1"))
    pods = api.reflector()
    await api.until(lambda: pods.synced, "the list")
    api.kube.failing = 500
    api.kube.drop()
    await api.until(lambda: pods.errors >= 3, "three failed attempts")
    assert pods.failing and names(pods) == {"default/a"}
    assert pods.last_error is not None and "500" in pods.last_error
    api.kube.failing = None
    api.kube.apply("v1", "pods", pod("b", "10.0.0.2"))
    await api.until(lambda: "default/b" in pods.objects, "b, after the outage", timeout=2.0)
    assert not pods.failing


@inline
async def test_a_rotated_token_is_used(api: Harness, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("first\n")
    api.kube.token = "first"
    access = KubeAccess(server=api.access.server, token_file=str(token))
    pods = api.reflector(access=access)
    await api.until(lambda: pods.synced, "the list")
    token.write_text("second-token\n")
    api.kube.token = "second-token"
    api.kube.drop()
    api.kube.apply("v1", "pods", pod("a", "10.0.0.1"))
    await api.until(lambda: "default/a" in pods.objects, "a, with the new token")
    assert api.kube.requests[-1][2] == "Bearer second-token"


@inline
async def test_kthena_kinds_are_under_their_group(api: Harness) -> None:
    route = {
        "apiVersion": ROUTES.api,
        "kind": "ModelRoute",
        "metadata": {"name": "r", "namespace": "default"},
        "spec": {"modelName": "m"},
    }
    api.kube.apply(ROUTES.api, "modelroutes", route)
    routes = api.reflector(ROUTES)
    await api.until(lambda: routes.synced, "the list")
    assert routes.objects["default/r"]["apiVersion"] == ROUTES.api
    assert api.kube.requests[0][0] == (
        "/apis/networking.serving.volcano.sh/v1alpha1/namespaces/default/modelroutes"
    )


@inline
async def test_stopping_mid_request_ends_the_loop(api: Harness) -> None:
    """A request cut by the stop before its answer fails as a response never received,
    not as a cancel: the loop must end anyway, not take it for an outage and retry."""
    pods = api.reflector()
    await api.until(lambda: pods.synced, "the list")
    api.kube.stalled = True
    api.kube.end_watches()
    asked = len(api.kube.requests)
    await api.until(lambda: len(api.kube.requests) > asked, "a watch, unanswered")
    pods.stop()
    asked = len(api.kube.requests)
    await deferLater(api.reactor, 0.5, lambda: None)  # past the test backoff's longest wait
    assert len(api.kube.requests) == asked
    assert pods.errors == 0


@inline
async def test_a_list_over_the_size_limit_is_refused_unread(
    api: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kubeclient, "MAX_LIST", 2000)
    for i in range(50):
        api.kube.apply("v1", "pods", pod(f"p{i}", f"10.0.1.{i + 1}"))
    pods = api.reflector()
    await api.until(lambda: pods.errors >= 1, "the refusal")
    assert not pods.synced and not pods.objects
    assert pods.last_error is not None and "2000" in pods.last_error


@inline
async def test_watches_ended_at_once_are_not_asked_again_in_a_loop(api: Harness) -> None:
    api.kube.brief = True
    pods = api.reflector()
    await api.until(lambda: pods.synced, "the list")
    await deferLater(api.reactor, 0.5, lambda: None)
    watches = sum(1 for _, p, _ in api.kube.requests if p.get("watch"))
    assert 1 < watches < 30  # each waits the backoff (0.025-0.075 s here), not none
    assert pods.errors == 0  # a watch the server ends is not a failure
