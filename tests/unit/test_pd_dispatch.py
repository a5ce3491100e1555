"""
Prefill/decode requests through the pipeline, in memory: what each leg's pod receives per
connector, the decode leg relayed as an aggregated answer (streams too), the record's
pods, a failing prefill pod retried on the next pair, Kthena's 500 when every pair
failed, and a client that leaves during the prefill cancelling it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from kthena.config.router import parse_config
from kthena.config.validate import ConfigError
from kthena.observability.records import format_text, json_record
from kthena.pd.pairs import PDPlan
from tests.unit.proxyfixtures import FakeResponse, RouterHarness, sse_response
from tests.unit.routerfixtures import pd_server, pod, server, simple_route
from tests.unit.test_proxy_resource import COMPLETION, DONE, USAGE_ONLY, delta, event

MODEL = "pdm"
KV = {
    "do_remote_prefill": True,
    "do_remote_decode": False,
    "remote_block_ids": [1, 2],
    "remote_engine_id": "e",
    "remote_host": "10.0.9.1",
    "remote_port": 5600,
}
PREFILL_REPLY = {**COMPLETION, "kv_transfer_params": KV}


def pd_harness(
    connector: str,
    retry: bool = False,
    pd_policy: dict[str, Any] | None = None,
    rate_limit: dict[str, Any] | None = None,
    upstream: dict[str, Any] | None = None,
    **kv_connector: Any,
) -> RouterHarness:
    spec: dict[str, Any] = {
        "kvConnector": {"type": connector, **kv_connector},
    }
    if retry:
        spec["trafficPolicy"] = {"retry": {"attempts": 2, "retryInterval": "0s"}}
    policy: dict[str, Any] = {} if pd_policy is None else {"pdPolicy": pd_policy}
    if rate_limit is not None:
        policy["rateLimit"] = rate_limit
    docs = [
        simple_route("pd", MODEL, "pd", **policy),
        pd_server("pd", "pd", "org/pd", **spec),
        pod("d1", "10.0.9.1", {"app": "pd", "role": "decode", "group": "g1"}),
        pod("p1", "10.0.9.2", {"app": "pd", "role": "prefill", "group": "g1"}),
        pod("d2", "10.0.9.3", {"app": "pd", "role": "decode", "group": "g2"}),
        pod("p2", "10.0.9.4", {"app": "pd", "role": "prefill", "group": "g2"}),
    ]
    # the config's scheduler when the policy reads its prefix-cache score; by name otherwise
    h = RouterHarness(configured_scheduler="decodeOnlyPrefixHit" in (pd_policy or {}))
    top: dict[str, Any] = {"resources": docs} | ({"upstream": upstream} if upstream else {})
    h.reload(parse_config(top, "pd.yaml", Path("."), []))
    return h


def chat(h: RouterHarness, **body: Any) -> Any:
    return h.post(
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body},
    )


def test_nixl_round_trips_kv_transfer_params_and_relays_the_decode() -> None:
    h = pd_harness("nixl")
    client = chat(h, max_tokens=20)
    prefill = h.upstream.last
    assert prefill.pod.name == "p1"
    sent = prefill.json()
    assert sent["kv_transfer_params"] == {"do_remote_decode": True, "do_remote_prefill": False}
    assert (sent["max_tokens"], sent["model"]) == (1, "org/pd")
    prefill.respond_json(PREFILL_REPLY)
    decode = h.upstream.last
    assert decode.pod.name == "d1"  # the pair of group g1
    assert decode.json() == {
        "model": "org/pd",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 20,
        "kv_transfer_params": KV,
    }
    decode.respond_json(COMPLETION)
    wire = client.got()
    assert wire.status == 200 and wire.json() == COMPLETION
    record = h.context
    assert record.pod is not None and record.pod.name == "d1"
    assert [(leg.group, leg.role, leg.pod, leg.status) for leg in record.legs or ()] == [
        ("g1", "prefill", "p1", 200),
        ("g1", "decode", "d1", 200),
    ]
    assert all(leg.ended is not None for leg in record.legs or ())
    assert (record.prompt_tokens, record.completion_tokens) == (9, 3)
    assert all(p.in_flight == 0 for p in h.store.pods.values())


def test_a_stream_goes_to_decode_and_the_prefill_is_one_token_unstreamed() -> None:
    h = pd_harness("http")
    client = chat(h, stream=True)
    prefill = h.upstream.last
    assert "stream" not in prefill.json() and prefill.json()["max_tokens"] == 1
    prefill.respond_json(COMPLETION)
    decode = h.upstream.last
    assert decode.json()["stream"] is True
    assert decode.json()["stream_options"] == {"include_usage": True}  # the router asks
    response = decode.answer(sse_response())
    response.send(event(delta("hel")) + event(delta("lo")) + event(USAGE_ONLY) + DONE)
    response.end()
    wire = client.got()
    assert wire.status == 200
    assert len(wire.events()) == 3  # two deltas and [DONE]; the usage chunk hidden
    assert (h.context.prompt_tokens, h.context.completion_tokens) == (4, 2)  # USAGE_ONLY


def test_a_failing_prefill_pod_is_retried_on_the_next_pair() -> None:
    h = pd_harness("nixl", retry=True)
    client = chat(h)
    h.upstream.last.respond_json({"error": "boom"}, 503)
    second = h.upstream.last
    assert second.pod.name == "p2"  # the next pair: d2 with its own group's prefill
    second.respond_json(PREFILL_REPLY)
    decode = h.upstream.last
    assert decode.pod.name == "d2"
    decode.respond_json(COMPLETION)
    assert client.got().status == 200
    assert h.context.failed_attempts == [("p1", "prefill pod p1 answered 503")]
    legs = [(leg.role, leg.pod, leg.status) for leg in h.context.legs or ()]
    assert legs == [("prefill", "p1", 503), ("prefill", "p2", 200), ("decode", "d2", 200)]


def test_every_pair_failed_is_kthenas_500() -> None:
    h = pd_harness("nixl", retry=True)
    client = chat(h)
    for _ in range(3):  # one try and two retries, round the two pairs
        h.upstream.last.respond_json({"error": "boom"}, 503)
    wire = client.got()
    assert wire.status == 500
    assert wire.json()["error"]["message"].startswith(
        "all prefill/decode pairs failed: 3 attempts, the last: prefill pod p1 answered 503"
    )
    assert [c.pod.name for c in h.upstream.calls] == ["p1", "p2", "p1"]


def test_a_prefill_answer_without_kv_params_fails_the_pair() -> None:
    h = pd_harness("nixl")
    client = chat(h)
    h.upstream.last.respond_json(COMPLETION)  # no kv_transfer_params
    wire = client.got()
    assert wire.status == 500
    assert "no kv_transfer_params" in wire.json()["error"]["message"]
    assert len(h.upstream.calls) == 1  # no decode leg without them


def test_a_client_leaving_during_the_prefill_cancels_it() -> None:
    h = pd_harness("http")
    client = chat(h)
    prefill = h.upstream.last
    client.disconnect()
    assert prefill.cancelled
    assert len(h.upstream.calls) == 1
    assert h.context.error_type.value == "client_disconnect"
    assert all(p.in_flight == 0 for p in h.store.pods.values())


def test_sglang_sends_both_legs_at_once_with_one_room() -> None:
    h = pd_harness("sglang")
    client = chat(h)
    prefill, decode = h.upstream.calls  # both sent before either answered
    assert (prefill.pod.name, decode.pod.name) == ("p1", "d1")
    room = prefill.json()["bootstrap_room"]
    assert prefill.json()["bootstrap_host"] == "10.0.9.2"
    assert prefill.json()["max_tokens"] == 1
    assert (decode.json()["bootstrap_room"], decode.json()["bootstrap_host"]) == (room, "10.0.9.2")
    prefill.respond_json(COMPLETION)
    decode.respond_json(COMPLETION)
    assert client.got().status == 200
    assert [(leg.role, leg.status) for leg in h.context.legs or ()] == [
        ("prefill", 200),
        ("decode", 200),
    ]


def test_a_prefill_still_running_when_its_decode_ended_is_cancelled_not_failed() -> None:
    h = pd_harness("sglang")
    client = chat(h)
    prefill, decode = h.upstream.calls
    decode.respond_json(COMPLETION)
    assert client.got().status == 200
    assert prefill.cancelled
    assert h.context.failed_attempts is None  # the prefill pod is not blamed
    assert h.store.pods["default/p1"].failures == 0
    assert all(p.in_flight == 0 for p in h.store.pods.values())


def test_a_client_leaving_cancels_both_sglang_legs() -> None:
    h = pd_harness("sglang")
    client = chat(h)
    prefill, decode = h.upstream.calls
    client.disconnect()
    assert prefill.cancelled and decode.cancelled
    assert all(p.in_flight == 0 for p in h.store.pods.values())


def test_pd_metrics_and_access_log_fields_say_what_the_pods_did() -> None:
    h = pd_harness("nixl", retry=True)
    client = chat(h)
    h.clock.advance(0.2)
    h.upstream.last.respond_json({"error": "boom"}, 503)  # p1 fails after 0.2 s
    h.clock.advance(0.1)
    h.upstream.last.respond_json(PREFILL_REPLY)  # p2 after 0.1 s
    h.clock.advance(0.5)
    h.upstream.last.respond_json(COMPLETION)  # d2 after 0.5 s
    assert client.got().status == 200
    r = h.metrics.registry

    def value(name: str, **labels: str) -> float | None:
        return r.get_sample_value(name, labels)

    assert value("kthena_pd_group_requests_total", group_key="g1", role="prefill", model=MODEL) == 1
    assert value("kthena_pd_group_requests_total", group_key="g2", role="prefill", model=MODEL) == 1
    assert value("kthena_pd_group_requests_total", group_key="g2", role="decode", model=MODEL) == 1
    assert (
        value("kthena_pd_group_requests_total", group_key="g1", role="decode", model=MODEL) is None
    )
    decisions = {"source_role": "prefill", "target_role": "decode"}
    assert value("kthena_pd_group_routing_decisions", group_key="g1", **decisions) == 1
    assert value("kthena_pd_group_routing_decisions", group_key="g2", **decisions) == 1
    ops = "kthena_kv_cache_operations_total"
    assert value(ops, connector_type="nixl", operation="prefill", status="failure") == 1
    assert value(ops, connector_type="nixl", operation="prefill", status="success") == 1
    path = "/v1/chat/completions"
    prefill = "kthena_router_request_prefill_duration_seconds"
    assert value(prefill + "_sum", model=MODEL, path=path, status_code="200") == pytest.approx(0.1)
    assert value(prefill + "_count", model=MODEL, path=path, status_code="503") is None
    decode = "kthena_router_request_decode_duration_seconds"
    assert value(decode + "_sum", model=MODEL, path=path, status_code="200") == pytest.approx(0.5)
    assert value("kthena_router_upstream_requests_total", model_server="default/pd") == 3
    assert value("kthena_router_upstream_failures_total", model_server="default/pd") == 1
    line = json_record(h.context)
    assert (line["selected_pod"], line["prefill_pod"]) == ("d2", "p2")
    assert (line["duration_prefill"], line["duration_decode"]) == (100, 500)
    assert "prefill_pod=p2" in format_text(h.context)


def test_aggregated_requests_have_no_pd_fields_or_series() -> None:
    h = RouterHarness()
    h.chat()
    h.upstream.last.respond_json(COMPLETION)
    assert h.context.legs is None
    assert "prefill_pod" not in json_record(h.context)
    families = {f.name: f.samples for f in h.metrics.registry.collect()}
    assert families["kthena_pd_group_requests"] == []


def test_a_client_leaving_during_the_decode_cancels_the_decode() -> None:
    h = pd_harness("nixl")
    client = chat(h)
    h.upstream.last.respond_json(PREFILL_REPLY)
    decode = h.upstream.last
    client.disconnect()
    assert decode.cancelled and not h.upstream.calls[0].cancelled
    assert h.context.error_type.value == "client_disconnect"
    assert all(p.in_flight == 0 for p in h.store.pods.values())


def test_a_short_prompt_goes_straight_to_a_decode_pod_by_the_routes_policy() -> None:
    h = pd_harness("nixl", pd_policy={"decodeOnlyBelowTokens": 50})
    client = chat(h)  # "hi": a few tokens
    decode = h.upstream.last
    assert decode.pod.name == "d1" and "kv_transfer_params" not in decode.json()
    decode.respond_json(COMPLETION)
    assert client.got().status == 200
    assert [(leg.role, leg.pod) for leg in h.context.legs or ()] == [("decode", "d1")]
    decisions = {"source_role": "decode", "target_role": "decode"}
    registry = h.metrics.registry
    assert (
        registry.get_sample_value(
            "kthena_pd_group_routing_decisions", {"group_key": "g1", **decisions}
        )
        == 1
    )
    long = chat(h, messages=[{"role": "user", "content": "word " * 100}])
    assert h.upstream.last.pod.name == "p1"  # a long prompt gets its prefill leg
    h.upstream.last.respond_json(PREFILL_REPLY)
    h.upstream.last.respond_json(COMPLETION)
    assert long.got().status == 200


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ({"decodeOnlyBelowTokens": 0}, "pdPolicy.decodeOnlyBelowTokens: must be at least 1"),
        ({"shortPrompts": 5}, "pdPolicy.shortPrompts: unknown field"),
        ({}, "pdPolicy: names none of decodeOnlyBelowTokens, decodeOnlyPrefixHit"),
        ({"decodeOnlyPrefixHit": 0}, "pdPolicy.decodeOnlyPrefixHit: must be a share"),
        ({"decodeOnlyPrefixHit": 1.5}, "pdPolicy.decodeOnlyPrefixHit: must be a share"),
        ({"decodeOnlyPrefixHit": "90%"}, "pdPolicy.decodeOnlyPrefixHit: must be a number"),
    ],
)
def test_pd_policy_errors_name_the_field(policy: dict[str, Any], message: str) -> None:
    route = simple_route("pd", MODEL, "pd", pdPolicy=policy)
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config({"resources": [route, server("pd", {"app": "pd"})]}, "t.yaml", Path("."), [])


def test_a_prompt_the_best_decode_pod_holds_goes_straight_to_it() -> None:
    h = pd_harness("nixl", pd_policy={"decodeOnlyPrefixHit": 0.9})
    prompt = [{"role": "user", "content": "a long shared system prompt " * 20}]
    first = chat(h, messages=prompt)
    assert h.upstream.last.pod.name in ("p1", "p2")  # nothing is known yet: both legs
    h.upstream.last.respond_json(PREFILL_REPLY)
    served = h.upstream.last.pod.name
    h.upstream.last.respond_json(COMPLETION)
    assert first.got().status == 200
    again = chat(h, messages=prompt)  # the decode pod that served the prefix holds it
    decode = h.upstream.last
    assert decode.pod.name == served and "kv_transfer_params" not in decode.json()
    decode.respond_json(COMPLETION)
    assert again.got().status == 200
    plan = h.contexts[-1].pd_plan
    assert isinstance(plan, PDPlan)
    assert plan.why_direct == f"{served} holds 1.00 of the prefix (>= 0.9)"
    assert [(leg.role, leg.pod) for leg in h.contexts[-1].legs or ()] == [("decode", served)]
    other = chat(h, messages=[{"role": "user", "content": "another prompt " * 30}])
    assert h.upstream.last.pod.name in ("p1", "p2")  # a prompt no pod holds: both legs
    h.upstream.last.respond_json(PREFILL_REPLY)
    h.upstream.last.respond_json(COMPLETION)
    assert other.got().status == 200


def test_a_direct_decode_that_fails_is_retried_with_a_prefill_leg() -> None:
    h = pd_harness("nixl", retry=True, pd_policy={"decodeOnlyPrefixHit": 0.5})
    prompt = [{"role": "user", "content": "a long shared system prompt " * 20}]
    chat(h, messages=prompt)
    h.upstream.last.respond_json(PREFILL_REPLY)
    served = h.upstream.last.pod.name
    h.upstream.last.respond_json(COMPLETION)
    client = chat(h, messages=prompt)
    assert h.upstream.last.pod.name == served
    h.upstream.last.respond_json({"error": {"message": "boom"}}, code=500)
    other = {"d1": "p2", "d2": "p1"}[served]
    assert h.upstream.last.pod.name == other  # the next pair, with its prefill leg
    h.upstream.last.respond_json(PREFILL_REPLY)
    h.upstream.last.respond_json(COMPLETION)
    assert client.got().status == 200
    legs = [(leg.role, leg.pod, leg.status) for leg in h.contexts[-1].legs or ()]
    decode = {"p1": "d1", "p2": "d2"}[other]
    assert legs == [("decode", served, 500), ("prefill", other, 200), ("decode", decode, 200)]


def test_the_prefix_condition_needs_the_prefix_cache_score() -> None:
    route = simple_route("pd", MODEL, "pd", pdPolicy={"decodeOnlyPrefixHit": 0.8})
    scheduler = {"plugins": {"Score": {"enabled": [{"name": "least-request"}]}}}
    message = "default/pd use pdPolicy.decodeOnlyPrefixHit, judged on the prefix-cache score"
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(
            {"resources": [route, server("pd", {"app": "pd"})], "scheduler": scheduler},
            "t.yaml", Path("."), [],
        )  # fmt: skip


BYTES_PER_TOKEN = 12288  # Qwen2.5-0.5B: 2 x 24 layers x 2 KV heads x 64 x 2 bytes (bf16)


def transfer_bytes(h: RouterHarness, connector: str) -> dict[str, float | None]:
    name = "kthena_kv_cache_transfer_bytes_total"
    return {
        direction: h.metrics.registry.get_sample_value(
            name, {"connector_type": connector, "direction": direction}
        )
        for direction in ("send", "receive")
    }


def test_kv_bytes_are_the_engines_blocks_times_block_size_times_bytes_per_token() -> None:
    h = pd_harness("nixl", blockSize=32, bytesPerToken=BYTES_PER_TOKEN)
    client = chat(h)
    h.upstream.last.respond_json(PREFILL_REPLY)  # two remote_block_ids
    h.upstream.last.respond_json(COMPLETION)
    assert client.got().status == 200
    moved = 2 * 32 * BYTES_PER_TOKEN
    assert transfer_bytes(h, "nixl") == {"send": moved, "receive": moved}
    assert h.contexts[-1].legs is not None and h.contexts[-1].legs[0].kv_blocks == 2


def test_a_decode_leg_that_fails_received_no_kv() -> None:
    h = pd_harness("nixl", bytesPerToken=BYTES_PER_TOKEN)
    client = chat(h)
    h.upstream.last.respond_json(PREFILL_REPLY)
    h.upstream.last.respond_json({"error": {"message": "no"}}, code=500)
    assert client.got().status == 500
    assert transfer_bytes(h, "nixl") == {"send": 2 * 16 * BYTES_PER_TOKEN, "receive": None}


def test_without_engine_blocks_the_prompt_tokens_make_the_blocks() -> None:
    h = pd_harness("http", bytesPerToken=100)
    client = chat(h)
    reply = {**COMPLETION, "usage": {"prompt_tokens": 33, "completion_tokens": 1}}
    h.upstream.last.respond_json(reply)  # 33 tokens: three blocks of 16
    h.upstream.last.respond_json(COMPLETION)
    assert client.got().status == 200
    assert transfer_bytes(h, "http") == {"send": 3 * 16 * 100, "receive": 3 * 16 * 100}
    estimated = chat(h)  # no usage in the prefill answer: the router's estimate
    h.upstream.last.respond(FakeResponse(200, {}, body=b"data: not JSON"))
    h.upstream.last.respond_json(COMPLETION)
    assert estimated.got().status == 200
    blocks = -(-(h.contexts[-1].input_estimate or 0) // 16)
    assert h.contexts[-1].legs is not None and h.contexts[-1].legs[0].kv_blocks == blocks


def test_without_bytes_per_token_no_bytes_are_counted() -> None:
    h = pd_harness("nixl")
    client = chat(h)
    h.upstream.last.respond_json(PREFILL_REPLY)
    h.upstream.last.respond_json(COMPLETION)
    assert client.got().status == 200
    assert transfer_bytes(h, "nixl") == {"send": None, "receive": None}
    assert h.contexts[-1].legs is not None and h.contexts[-1].legs[0].kv_blocks == 2


@pytest.mark.parametrize(
    ("kv", "message"),
    [
        ({"blockSize": 0}, "kvConnector.blockSize: must be at least 1"),
        ({"bytesPerToken": "12k"}, "kvConnector.bytesPerToken: must be a whole number"),
        ({"bytesPerToken": 0}, "kvConnector.bytesPerToken: must be at least 1"),
    ],
)
def test_kv_sizing_errors_name_the_field(kv: dict[str, Any], message: str) -> None:
    docs = [simple_route("pd", MODEL, "pd"), pd_server("pd", "pd", "org/pd", kvConnector=kv)]
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config({"resources": docs}, "t.yaml", Path("."), [])


def test_a_pd_requests_tokens_are_the_decodes_for_limits_and_fairness() -> None:
    h = pd_harness("nixl", rate_limit={"outputTokensPerUnit": 10, "unit": "hour"})
    client = chat(h)
    one_token = {**PREFILL_REPLY, "usage": {"prompt_tokens": 9, "completion_tokens": 1}}
    h.upstream.last.respond_json(one_token)
    h.upstream.last.respond_json(COMPLETION)  # the decode: 3 tokens
    assert client.got().status == 200
    record = h.context
    assert (record.prompt_tokens, record.completion_tokens) == (9, 3)  # fairness reads these
    bucket = h.limits.limiter.routes["default/pd"].buckets(None)[0].spec
    assert h.limits.local.level(bucket) == 7  # settled on the decode's 3, not 1 or 4
    output = {"model": MODEL, "path": "/v1/chat/completions", "token_type": "output"}
    assert h.metrics.registry.get_sample_value("kthena_router_tokens_total", output) == 3
    assert json_record(record)["output_tokens"] == 3


def test_a_prefill_leg_served_ends_its_pods_failures_in_a_row() -> None:
    """Outlier detection counts failures in a row: a prefill pod that fails now and then,
    between legs it serves, is never ejected (its successes reset the count)."""
    outliers = {"outlierDetection": {"consecutiveFailures": 2}}
    h = pd_harness("nixl", retry=True, upstream=outliers)
    for _ in range(3):  # p1 fails, the retry's p2 serves; then p1 serves
        client = chat(h)
        assert h.upstream.last.pod.name == "p1"
        h.upstream.last.respond_json({"error": {"message": "busy"}}, code=503)
        h.upstream.last.respond_json(PREFILL_REPLY)  # the next pair's prefill: p2
        h.upstream.last.respond_json(COMPLETION)
        assert client.got().status == 200
        client = chat(h)
        assert h.upstream.last.pod.name == "p1"
        h.upstream.last.respond_json(PREFILL_REPLY)
        h.upstream.last.respond_json(COMPLETION)
        assert client.got().status == 200
    assert h.pod("p1").outlier.ejections == 0


def test_with_no_healthy_prefill_pod_the_unhealthy_ones_are_paired() -> None:
    """As an aggregated server falls back to its unhealthy pods: a PD server whose prefill
    pods are all ejected still pairs its healthy decode pods with them, rather than
    refusing every request while the ejection lasts."""
    h = pd_harness("nixl")
    for name in ("p1", "p2"):
        h.pod(name).outlier.ejected_until = h.clock.seconds() + 30
    client = chat(h)
    assert h.upstream.last.pod.name in ("p1", "p2")
    h.upstream.last.respond_json(PREFILL_REPLY)
    h.upstream.last.respond_json(COMPLETION)
    assert client.got().status == 200
    assert h.context.unhealthy_fallback
    fallbacks = {"model_server": "default/pd"}
    sample = "kthena_router_unhealthy_fallbacks_total"
    assert h.metrics.registry.get_sample_value(sample, fallbacks) == 1
