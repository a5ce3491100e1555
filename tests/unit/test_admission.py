"""
Identity and the fairness queue through the pipeline, in memory on a Clock: who a request
is (a verified JWT, a gateway's header, anonymous) reaches per-user limits, the queue and
the access log; every 401 is an OpenAI error with C{WWW-Authenticate}, counted once; the
queue orders by class then usage, sheds, times out, lets a client that left go at once,
keeps nothing after a request ended, and its metrics and debug view say so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kthena.observability.records import json_record
from tests.unit.proxyfixtures import BASE_MODEL, Client, RouterHarness
from tests.unit.samples import sample_sum
from tests.unit.test_identity import ISSUER, OTHER_RSA_KEY, STANDARD_JWKS, token
from tests.unit.test_proxy_resource import COMPLETION

HEADER_IDENTITY = {"header": {"user": "x-user-id", "priority": "x-priority"}}
ONE_SLOT = {"models": [{"model": BASE_MODEL, "maxConcurrency": 1, "timeout": "10s"}]}
QUEUE_SIZE = "kthena_router_fairness_queue_size"
QUEUE_WAIT = "kthena_router_fairness_queue_duration_seconds"


def as_user(user: str, priority: str | None = None) -> list[tuple[str, str]]:
    headers = [("x-user-id", user)]
    if priority is not None:
        headers.append(("x-priority", priority))
    return headers


def answer_all(h: RouterHarness, answered: int) -> int:
    """Answer the pod calls made since C{answered}; the new count."""
    while answered < len(h.upstream.calls):
        h.upstream.calls[answered].respond_json(COMPLETION)
        answered += 1
    return answered


def queued(h: RouterHarness) -> int:
    return sum(len(q) for q in h.fairness.fairness._queues.values())


# -- identity


def test_header_identity_reaches_per_user_limits_and_the_access_log() -> None:
    h = RouterHarness(
        rate_limit={"perUser": {"requestsPerUnit": 1, "unit": "minute"}}, identity=HEADER_IDENTITY
    )
    statuses, answered = [], 0
    for user in ("alice", "alice", "bob"):
        client = h.chat(as_user(user))
        answered = answer_all(h, answered)
        statuses.append(client.got().status)
    assert statuses == [200, 429, 200]
    assert [r.user for r in h.contexts] == ["alice", "alice", "bob"]
    assert [json_record(r)["user_id"] for r in h.contexts] == ["alice", "alice", "bob"]


def test_without_identity_the_access_log_has_no_user_id() -> None:
    h = RouterHarness()
    h.chat(as_user("alice"))
    h.upstream.last.respond_json(COMPLETION)
    assert h.context.user == "anonymous"
    assert "user_id" not in json_record(h.context)


@pytest.fixture
def jwt_harness(tmp_path: Path) -> RouterHarness:
    (tmp_path / "jwks.json").write_bytes(STANDARD_JWKS)
    identity = {
        "jwt": {
            "issuer": ISSUER,
            "audiences": ["kthena"],
            "jwksFile": str(tmp_path / "jwks.json"),
            "priorityClaim": "tier",
        }
    }
    h = RouterHarness(identity=identity, fairness=ONE_SLOT)
    h.tree.startService()  # the key set is read
    return h


def test_a_verified_token_names_the_user_and_the_priority(jwt_harness: RouterHarness) -> None:
    h = jwt_harness
    client = h.chat([("authorization", f"Bearer {token(sub='carol', tier='critical')}")])
    h.upstream.last.respond_json(COMPLETION)
    assert client.got().status == 200
    assert (h.context.user, h.context.priority) == ("carol", "critical")
    assert json_record(h.context)["user_id"] == "carol"


BAD_TOKENS = {
    "missing": (None, "invalid_request", "missing bearer token"),
    "not a jwt": ("Bearer abc", "invalid_token", "malformed"),
    "expired": (f"Bearer {token(exp=1)}", "invalid_token", "expired"),
    "wrong audience": (f"Bearer {token(aud='other')}", "invalid_token", "audience"),
    "wrong issuer": (f"Bearer {token(iss='https://evil.example')}", "invalid_token", "issuer"),
    "bad signature": (f"Bearer {token(key=OTHER_RSA_KEY)}", "invalid_token", "signature"),
    "unknown key": (f"Bearer {token(kid='nobody')}", "invalid_token", "key"),
    "alg none": ("Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.", "invalid_token", "algorithm"),
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
def test_every_401_is_an_openai_error_counted_once(jwt_harness: RouterHarness, case: str) -> None:
    h = jwt_harness
    authorization, challenge_error, words = BAD_TOKENS[case]
    headers = [] if authorization is None else [("authorization", authorization)]
    wire = h.chat(headers).got()
    assert wire.status == 401, wire
    error = wire.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert words in error["message"].lower(), error
    challenge = wire.header("www-authenticate") or ""
    assert challenge.startswith("Bearer ")
    if challenge_error == "invalid_token":
        assert 'error="invalid_token"' in challenge
    assert not h.upstream.calls  # no pod, no queue, no bucket saw it
    assert h.context.error_type.value == "unauthorized"
    counted = sample_sum(h.metrics.registry, "kthena_router_requests_total", status_code="401")
    assert counted == 1
    assert queued(h) == 0


# -- the fairness queue


def test_a_light_user_waits_much_less_than_a_heavy_one() -> None:
    """One slot; a heavy user keeps four requests queued, a light one sends now and then."""
    h = RouterHarness(identity=HEADER_IDENTITY, fairness=ONE_SLOT)
    clients: list[tuple[str, Client]] = []
    answered = 0
    for step in range(40):
        while sum(1 for u, c in clients if u == "heavy" and c.response is None) < 4:
            clients.append(("heavy", h.chat(as_user("heavy"))))
        if step % 4 == 0:
            clients.append(("light", h.chat(as_user("light"))))
        h.clock.advance(0.1)
        if answered < len(h.upstream.calls):  # the one in the slot ends
            h.upstream.calls[answered].respond_json(COMPLETION)
            answered += 1
    waits: dict[str, list[float]] = {"heavy": [], "light": []}
    for record in h.contexts:
        ticket_wait = record.upstream_started - record.started if record.upstream_started else None
        if ticket_wait is not None and record.user is not None:
            waits[record.user].append(ticket_wait)
    heavy, light = sorted(waits["heavy"]), sorted(waits["light"])
    assert len(light) >= 8 and len(heavy) >= 20
    assert light[len(light) // 2] * 3 <= heavy[len(heavy) // 2]


def test_critical_overtakes_queued_standard_work() -> None:
    h = RouterHarness(identity=HEADER_IDENTITY, fairness=ONE_SLOT)
    h.chat(as_user("a"))  # takes the slot
    for user in ("b", "c"):
        h.chat(as_user(user, "standard"))
    h.chat(as_user("d", "critical"))
    answered = 0
    for _ in range(4):
        answered = answer_all(h, answered)
    assert [r.user for r in h.contexts] == ["a", "d", "b", "c"]


def test_a_full_queue_refuses_sheddable_work_first_with_503() -> None:
    fairness = {"models": [{"model": BASE_MODEL, "maxConcurrency": 1, "maxLength": 2}]}
    h = RouterHarness(identity=HEADER_IDENTITY, fairness=fairness)
    h.chat(as_user("a"))
    shed = h.chat(as_user("s", "sheddable"))
    h.chat(as_user("b"))
    refused = h.chat(as_user("late", "sheddable")).got()  # the queue is full
    assert refused.status == 503 and refused.json()["error"]["message"].startswith(
        "the fairness queue of model m is full"
    )
    h.chat(as_user("c"))  # standard work takes the sheddable request's place
    assert shed.got().status == 503
    assert "shed from the full fairness queue" in shed.got().json()["error"]["message"]
    assert queued(h) == 2
    assert sample_sum(h.metrics.registry, "kthena_router_requests_total", status_code="503") == 2


def test_queued_past_the_timeout_is_504() -> None:
    h = RouterHarness(identity=HEADER_IDENTITY, fairness=ONE_SLOT)
    h.chat(as_user("a"))
    waiting = h.chat(as_user("b"))
    h.clock.advance(10)
    wire = waiting.got()
    assert wire.status == 504
    assert "fairness queue" in wire.json()["error"]["message"]
    assert queued(h) == 0
    assert h.contexts[-1].error_type.value == "queue_timeout"


def test_a_client_that_leaves_the_queue_is_gone_at_once() -> None:
    h = RouterHarness(identity=HEADER_IDENTITY, fairness=ONE_SLOT)
    h.chat(as_user("a"))
    leaving = h.chat(as_user("b"))
    staying = h.chat(as_user("c"))
    assert queued(h) == 2
    leaving.disconnect()
    assert queued(h) == 1
    assert h.contexts[-1].error_type.value == "client_disconnect"
    answer_all(h, 0)  # the first, then the one that stayed
    assert staying.got().status == 200
    assert len(h.upstream.calls) == 2  # the one that left never reached a pod
    assert queued(h) == 0 and h.fairness.fairness._queues[BASE_MODEL].in_flight == 0


def test_a_failed_request_hands_its_slot_on() -> None:
    """Whatever ends a request (here no pod answers) releases its ticket."""
    h = RouterHarness(identity=HEADER_IDENTITY, fairness=ONE_SLOT)
    first = h.chat(as_user("a"))
    second = h.chat(as_user("b"))
    h.upstream.last.fail(ConnectionRefusedError("refused"))
    assert first.got().status >= 500
    assert len(h.upstream.calls) >= 2  # the second got the slot
    answer_all(h, len(h.upstream.calls) - 1)
    assert second.got().status == 200
    assert h.fairness.fairness._queues[BASE_MODEL].in_flight == 0


def test_a_reload_that_changes_the_queue_keeps_the_queued_requests() -> None:
    h = RouterHarness(identity=HEADER_IDENTITY, fairness=ONE_SLOT)
    h.chat(as_user("a"))
    waiting = [h.chat(as_user(u)) for u in ("b", "c")]
    wider = {"models": [{"model": BASE_MODEL, "maxConcurrency": 3}]}
    h.reload(RouterHarness(identity=HEADER_IDENTITY, fairness=wider).config)
    assert len(h.upstream.calls) == 3  # both queued requests went on under the new bound
    answer_all(h, 0)
    assert [c.got().status for c in waiting] == [200, 200]


def test_queue_metrics_have_bounded_user_labels_and_the_debug_view(tmp_path: Path) -> None:
    fairness = {"topUsers": 1, **ONE_SLOT}
    h = RouterHarness(identity=HEADER_IDENTITY, fairness=fairness)
    answered = 0
    for _ in range(3):  # heavy is the top user by usage
        h.chat(as_user("heavy"))
        answered = answer_all(h, answered)
    h.chat(as_user("heavy"))  # in the slot
    for user in ("heavy", "u1", "u2", "u3"):
        h.chat(as_user(user))
    h.clock.advance(2)
    h.metrics.before_scrape()
    registry = h.metrics.registry
    assert registry.get_sample_value(QUEUE_SIZE, {"model": BASE_MODEL, "user_id": "heavy"}) == 1
    assert registry.get_sample_value(QUEUE_SIZE, {"model": BASE_MODEL, "user_id": "other"}) == 3
    users = {
        s.labels["user_id"]
        for family in registry.collect()
        if family.name in (QUEUE_SIZE, QUEUE_WAIT)
        for s in family.samples
    }
    assert users == {"heavy", "other"}
    state: dict[str, Any] = h.fairness.state()[BASE_MODEL]
    assert state["length"] == 4 and state["oldest_wait_seconds"] == 2.0
    assert set(state["users"]) == {"heavy", "other"}
    answer_all(h, answered)  # each answer lets the next queued request on
    h.metrics.before_scrape()
    assert registry.get_sample_value(QUEUE_SIZE, {"model": BASE_MODEL, "user_id": "heavy"}) is None
    assert registry.get_sample_value(QUEUE_SIZE, {"model": BASE_MODEL, "user_id": "other"}) == 0
    waits = sample_sum(registry, QUEUE_WAIT + "_count")
    assert waits == 8  # every admission observed once, those that went on at once too
    json.dumps(state)  # the debug view is JSON as it is


def test_stopping_fails_what_is_still_queued_and_leaves_no_timer() -> None:
    h = RouterHarness(identity=HEADER_IDENTITY, fairness=ONE_SLOT)
    h.tree.startService()
    h.chat(as_user("a"))
    waiting = h.chat(as_user("b"))
    h.fairness.stopService()
    assert waiting.got().status == 503
    assert queued(h) == 0
    assert not [c for c in h.clock.getDelayedCalls() if c.active() and "fairness" in repr(c)]
