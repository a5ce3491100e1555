"""
What the proxy serves and how it answers what it does not: the inference paths only
(never an engine's admin endpoint, never a path with dot segments or escapes), the model
list and one model, health; every answer counted and logged; request ids kept only when
they are sane; the client's Authorization forwarded or not as configured.
"""

from __future__ import annotations

import pytest

from kthena.errors import ErrorType
from tests.unit.proxyfixtures import BASE_MODEL, LORA, RouterHarness
from tests.unit.routerfixtures import pod, server, simple_route
from tests.unit.test_proxy_resource import COMPLETION, HEX32, assert_error

ADMIN_PATHS = [
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
    "/v1/../v1/chat/completions",
    "/v1/./chat/completions",
    "/v1/chat/completions/",
    "/v1//chat/completions",
    "/v1/chat%2Fcompletions",
    "/v1%2Fchat/completions",
    "/v1/chat/%63ompletions",
    "/v1/x",
    "/tokenize",
    "/metrics",
    "/sim/faults",
]


@pytest.mark.parametrize("path", ADMIN_PATHS)
def test_paths_outside_the_inference_set_never_reach_a_pod(path: str) -> None:
    h = RouterHarness()
    body = {"model": BASE_MODEL, "lora_name": "evil", "lora_path": "/models/evil"}
    response = h.post(path, body).got()
    assert_error(response, 404, ErrorType.NOT_FOUND)
    assert h.upstream.calls == []
    ctx = h.context
    assert (ctx.status, ctx.error_type, ctx.path) == (404, ErrorType.NOT_FOUND, path)
    assert h.metrics.path_label(ctx.path) == "other"


def test_dot_segments_are_named_in_the_answer() -> None:
    h = RouterHarness()
    error = assert_error(h.post("/v1/../v1/chat/completions", {}).got(), 404, ErrorType.NOT_FOUND)
    assert error["message"].startswith("paths with dot segments")


@pytest.mark.parametrize(
    "path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank"]
)
def test_inference_paths_are_proxied(path: str) -> None:
    h = RouterHarness()
    client = h.post(path, {"model": BASE_MODEL, "messages": [], "prompt": "hi", "input": "hi"})
    assert h.upstream.last.uri == path.encode()
    h.upstream.last.respond_json(COMPLETION)
    assert client.got().status == 200
    assert h.metrics.path_label(h.context.path) == path


def test_inference_paths_are_configurable() -> None:
    h = RouterHarness(inferencePaths=["/v1/chat/completions", "/tokenize"])
    h.post("/tokenize", {"model": BASE_MODEL, "prompt": "hi"})
    assert h.upstream.last.uri == b"/tokenize"
    assert_error(h.post("/v1/completions", {"model": BASE_MODEL}).got(), 404, ErrorType.NOT_FOUND)
    assert len(h.upstream.calls) == 1


def test_query_strings_go_along_but_do_not_change_the_path() -> None:
    h = RouterHarness()
    h.post("/v1/chat/completions?trace=1", {"model": BASE_MODEL, "messages": []})
    assert h.upstream.last.uri == b"/v1/chat/completions?trace=1"


# -- answered by the router, and recorded like every other request


def test_router_answers_are_counted_and_recorded() -> None:
    h = RouterHarness(readiness="anyModel")
    for path in ("/healthz", "/readyz", "/v1/models", f"/v1/models/{BASE_MODEL}"):
        response = h.get(path).got()
        assert response.status == 200, path
        assert HEX32.match(response.header("x-request-id") or "")
    assert [(c.path, c.status, c.error_type) for c in h.contexts] == [
        ("/healthz", 200, ErrorType.SUCCESS),
        ("/readyz", 200, ErrorType.SUCCESS),
        ("/v1/models", 200, ErrorType.SUCCESS),
        (f"/v1/models/{BASE_MODEL}", 200, ErrorType.SUCCESS),
    ]
    requests = h.metrics.requests
    assert requests.value(("unknown", "/healthz", "200", "successful_request")) == 1
    assert requests.value(("unknown", "/v1/models", "200", "successful_request")) == 1
    # One label for every model id: bounded.
    assert requests.value(("unknown", "/v1/models/{model}", "200", "successful_request")) == 1


def test_retrieve_a_model_as_the_openai_sdk_does() -> None:
    h = RouterHarness()
    listed = h.get("/v1/models").got().json()["data"]
    for model in listed:
        assert h.get(f"/v1/models/{model['id']}").got().json() == model
    assert h.get(f"/v1/models/{LORA}").got().json()["id"] == LORA


def test_retrieve_an_unknown_model_is_404() -> None:
    h = RouterHarness()
    error = assert_error(h.get("/v1/models/gpt-9").got(), 404, ErrorType.ROUTE_NOT_FOUND)
    assert error["message"] == "the model `gpt-9` does not exist"
    assert (h.context.model, h.context.status) == ("gpt-9", 404)


def test_model_ids_may_hold_slashes() -> None:
    h = RouterHarness()
    assert_error(h.get("/v1/models/org/none").got(), 404, ErrorType.ROUTE_NOT_FOUND)
    assert h.context.model == "org/none"


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/m", "/healthz", "/readyz"])
def test_router_paths_take_get_and_head_only(path: str) -> None:
    h = RouterHarness()
    response = h.post(path, {}).got()
    assert_error(response, 405, ErrorType.METHOD_NOT_ALLOWED)
    assert response.header("allow") == "GET, HEAD"
    assert h.context.status == 405


# -- request ids


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("abc-123", True),
        ("my id", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("caf\xe9", False),
        ("tab\there", False),
    ],
)
def test_request_ids_are_kept_only_when_sane(given: str, kept: bool) -> None:
    h = RouterHarness()
    proxied = h.chat(headers=[("x-request-id", given)])
    h.upstream.last.respond_json(COMPLETION)
    refused = h.post("/v1/nope", {}, headers=[("x-request-id", given)])
    sent = h.upstream.last.header("x-request-id")
    assert sent is not None
    proxied_id = proxied.got().header("x-request-id")
    refused_id = refused.got().header("x-request-id")
    assert proxied_id == sent[0]
    assert [c.request_id for c in h.contexts] == [proxied_id, refused_id]
    if kept:
        assert proxied_id == refused_id == given
    else:
        assert proxied_id is not None and HEX32.match(proxied_id)
        assert refused_id is not None and HEX32.match(refused_id)


# -- the client's credentials


def test_authorization_is_forwarded_by_default() -> None:
    h = RouterHarness()
    h.chat(headers=[("Authorization", "Bearer sk-client")])
    assert h.upstream.last.header("authorization") == ["Bearer sk-client"]


def test_authorization_is_dropped_when_configured() -> None:
    h = RouterHarness(upstream={"forwardAuthorization": False})
    h.chat(headers=[("Authorization", "Bearer sk-client"), ("X-Tier", "gold")])
    assert h.upstream.last.header("authorization") is None
    assert h.upstream.last.header("x-tier") == ["gold"]


def test_models_and_readiness_are_those_served_through_the_gateway() -> None:
    """A route bound (parentRefs) to another Gateway, or to one when requests come through
    none, is neither listed by /v1/models nor counted by /readyz: it serves nobody here."""
    bound = simple_route("bound", "bound-model", "s")
    bound["spec"]["parentRefs"] = [{"name": "gw"}]
    docs = [
        server("s", {"app": "s"}),
        pod("p", "10.0.0.1", {"app": "s"}),
        simple_route("free", "free-model", "s"),
        bound,
        simple_route("nowhere", "dead-model", "no-pods-server"),
        server("no-pods-server", {"app": "none"}),
    ]
    docs[-2]["spec"]["parentRefs"] = [{"name": "gw"}]  # dead-model: only through gw
    outside = RouterHarness(resources=docs)
    ids = [m["id"] for m in outside.get("/v1/models").got().json()["data"]]
    assert ids == ["free-model"]
    assert outside.get("/v1/models/bound-model").got().status == 404
    assert outside.get("/readyz").got().status == 200  # dead-model serves nobody here
    through = RouterHarness(resources=docs, gateway={"name": "default/gw"})
    ids = [m["id"] for m in through.get("/v1/models").got().json()["data"]]
    assert ids == ["bound-model", "dead-model", "free-model"]
    assert through.get("/readyz").got().status == 503  # dead-model has no pod
