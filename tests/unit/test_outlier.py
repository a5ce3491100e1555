"""
Passive outlier detection: a pod failing fast is ejected and stops attracting traffic;
ejections grow, decay, end, are capped per server, counted and shown.
"""

from __future__ import annotations

from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed

from kthena.config.documents import parse_pod
from kthena.config.traffic import OutlierConfig
from kthena.config.validate import Where
from kthena.pipeline.outlier import OutlierDetector
from kthena.pods import PodEndpoint
from tests.unit.proxyfixtures import RouterHarness, sse_response
from tests.unit.routerfixtures import pod
from tests.unit.test_proxy_resource import COMPLETION

RETRY = {"retry": {"attempts": 2, "retryInterval": "0s"}}


def endpoint(name: str) -> PodEndpoint:
    resource = parse_pod(pod(name, "10.0.0.1", {}), Where("t"), 0)
    return PodEndpoint(key=f"default/{name}", pod=resource, host="10.0.0.1", port=8000)


def detector(clock: Clock, **config: object) -> tuple[OutlierDetector, list[str]]:
    ejected: list[str] = []
    outliers = OutlierDetector(
        OutlierConfig(**config),  # type: ignore[arg-type]
        clock,
        lambda p: ejected.append(p.name),
    )
    return outliers, ejected


def test_ejected_after_consecutive_failures_for_the_base_time() -> None:
    clock = Clock()
    outliers, ejected = detector(clock, consecutive_failures=3, base_ejection_time=30.0)
    bad, good = endpoint("bad"), endpoint("good")
    peers = [bad, good]
    outliers.failed(bad, "503", peers)
    outliers.failed(bad, "503", peers)
    outliers.succeeded(bad)  # an answer breaks the run
    outliers.failed(bad, "503", peers)
    outliers.failed(bad, "503", peers)
    assert not outliers.ejected(bad)
    outliers.failed(bad, "503", peers)
    assert outliers.ejected(bad)
    assert ejected == ["bad"]
    clock.advance(29.9)
    assert outliers.ejected(bad)
    clock.advance(0.1)
    assert not outliers.ejected(bad)
    assert bad.outlier.consecutive_failures == 0


def test_ejections_grow_then_decay() -> None:
    clock = Clock()
    outliers, _ = detector(
        clock, consecutive_failures=1, base_ejection_time=10.0, max_ejection_time=25.0
    )
    bad, good = endpoint("bad"), endpoint("good")
    lengths = []
    for _ in range(3):
        outliers.failed(bad, "cut", [bad, good])
        until = bad.outlier.ejected_until
        assert until is not None
        lengths.append(until - clock.seconds())
        clock.advance(until - clock.seconds())
        assert not outliers.ejected(bad)
    assert lengths == [10.0, 20.0, 25.0]  # capped at maxEjectionTime
    clock.advance(20.0)  # two base times behaving: two steps back
    outliers.failed(bad, "cut", [bad, good])
    assert bad.outlier.ejected_until == clock.seconds() + 20.0
    assert bad.outlier.ejections == 4


def test_at_most_the_share_of_a_server_is_ejected() -> None:
    clock = Clock()
    outliers, ejected = detector(clock, consecutive_failures=1, max_ejection_percent=50)
    pods = [endpoint(f"p{i}") for i in range(4)]
    for p in pods:
        outliers.failed(p, "503", pods)
    assert ejected == ["p0", "p1"]
    one, _ = detector(clock, consecutive_failures=1, max_ejection_percent=10)
    few = [endpoint(f"q{i}") for i in range(3)]
    for p in few:
        one.failed(p, "503", few)
    assert sum(one.ejected(p) for p in few) == 1  # at least one may always be


def test_disabled_never_ejects() -> None:
    clock = Clock()
    outliers, ejected = detector(clock, enabled=False, consecutive_failures=1)
    bad = endpoint("bad")
    for _ in range(10):
        outliers.failed(bad, "503", [bad])
    assert ejected == [] and not outliers.ejected(bad)


# -- through the proxy


def test_a_pod_failing_fast_stops_taking_first_attempts() -> None:
    """
    p0 answers 503 at once and sorts first: without ejection every first attempt would go
    to it (retries hiding it), as a least-loaded pod attracts them.
    """
    h = RouterHarness(RETRY, pods=3)
    firsts = []
    for _ in range(300):
        client = h.chat()
        first = h.upstream.last
        firsts.append(first.pod.name)
        if first.pod.name == "p0":
            first.respond_json({"error": "overloaded"}, code=503)
            h.upstream.last.respond_json(COMPLETION)
        else:
            first.respond_json(COMPLETION)
        assert client.got().status == 200
        h.clock.advance(0.5)
    share = firsts.count("p0") / len(firsts)
    assert share <= 0.10, share
    metrics = h.metrics
    assert metrics.outlier_ejections.value(("default/p0",)) >= 2
    assert metrics.outlier_ejections.value(("default/p1",)) == 0


def test_connection_failures_and_cut_streams_count() -> None:
    h = RouterHarness(RETRY, pods=2, upstream={"outlierDetection": {"consecutiveFailures": 2}})
    h.chat()
    h.upstream.last.fail(ConnectionRefusedError())  # p0
    h.upstream.last.respond_json(COMPLETION)  # p1
    h.chat()
    response = h.upstream.last.answer(sse_response())
    response.end(Failure(ResponseFailed([Failure(ConnectionLost())])))
    assert h.pod("p0").outlier.ejected_until is not None
    assert h.plane.scheduling.schedulable(h.store.resources.servers[0]) == [h.pod("p1")]


def test_ejected_pods_are_not_healthy() -> None:
    h = RouterHarness(RETRY, pods=2, upstream={"outlierDetection": {"consecutiveFailures": 1}})
    h.chat()
    h.upstream.last.respond_json({}, code=503)
    h.upstream.last.respond_json(COMPLETION)
    server = h.store.resources.servers[0]
    health = h.plane.health.server(server)
    assert [p.name for p in health.healthy] == ["p1"]
    assert health.status == "degraded"
    h.clock.advance(30)
    assert h.plane.health.server(server).status == "healthy"
