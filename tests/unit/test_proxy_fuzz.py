"""
No request escapes the books: whatever a body holds (JSON the OpenAI schema allows and
JSON it does not) and whatever breaks inside the router, the client gets an answer (the
pod's, or an OpenAI error object), and the request is counted once and recorded once.
Internal errors are logged once per cause, not once per request.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import capturedLogs

from kthena.errors import ErrorType
from tests.unit.proxyfixtures import BASE_MODEL, RouterHarness, sse_response
from tests.unit.test_proxy_resource import COMPLETION, DONE, USAGE_ONLY, assert_error, event

CHAT = "/v1/chat/completions"


def chat(content: object) -> dict[str, Any]:
    return {"model": BASE_MODEL, "messages": [{"role": "user", "content": content}]}


def test_a_lone_surrogate_is_proxied() -> None:
    h = RouterHarness(configured_scheduler=True)  # prefix-cache hashes the prompt
    client = h.post(CHAT, chat("x\ud800y"))
    call = h.upstream.last
    assert call.json()["messages"][0]["content"] == "x\ud800y"  # as the client sent it
    call.respond_json(COMPLETION)
    assert client.got().status == 200
    assert (h.context.status, h.context.error_type) == (200, ErrorType.SUCCESS)


def test_a_lone_surrogate_in_a_rewritten_body() -> None:
    h = RouterHarness(configured_scheduler=True)
    h.post(CHAT, {**chat("x\ud800y"), "stream": True})  # the body is re-serialised
    assert h.upstream.last.json()["messages"][0]["content"] == "x\ud800y"


def test_a_text_part_that_is_no_string_is_400() -> None:
    h = RouterHarness(configured_scheduler=True)
    response = h.post(CHAT, chat([{"type": "text", "text": 5}])).got()
    error = assert_error(response, 400, ErrorType.INVALID_REQUEST)
    assert error["message"] == "messages[0].content[0].text must be a string"
    assert h.upstream.calls == []
    assert h.context.status == 400


def test_an_internal_error_is_a_500_counted_and_logged_once_per_cause() -> None:
    h = RouterHarness()

    def broken(body: dict[str, Any]) -> int:
        raise KeyError("a bug")

    h.plane.scheduling.estimator.estimate = broken  # type: ignore[method-assign]
    with capturedLogs() as events:
        responses = [h.chat().got() for _ in range(50)]
        h.clock.advance(61)
        h.chat().got()
    for response in responses:
        error = assert_error(response, 500, ErrorType.INTERNAL)
        assert response.header("x-request-id") in error["message"]
    assert len(h.contexts) == 51
    assert h.metrics.requests.value((BASE_MODEL, CHAT, "500", "internal")) == 51
    failures = [e for e in events if e.get("log_failure") is not None]
    assert len(failures) == 1  # one traceback
    again = [e for e in events if "again" in str(e.get("log_format"))]
    assert len(again) == 1 and again[0]["count"] == 50


# -- fuzzing the request path

_text = st.text(
    st.characters(exclude_categories=()) | st.sampled_from(["\ud800", "\udfff", "\x00", "é"]),
    max_size=12,
)
"""Any text, lone surrogates (valid JSON, no UTF-8) and NULs often among it."""
_json_leaves = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | _text
)
_json = st.recursive(
    _json_leaves,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
_part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(_text, _json)}),
    st.fixed_dictionaries({"type": st.sampled_from(["image_url", "input_audio"]), "x": _json}),
    _json,
)
_content = st.one_of(
    st.text(st.characters(exclude_categories=())), st.lists(_part, max_size=3), _json
)
_message = st.one_of(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant"]) | _json, "content": _content}
    ),
    _json,
)
_prompt = st.one_of(
    _text,
    st.lists(_text, max_size=3),
    st.lists(st.integers(0, 50_000), max_size=5),
    st.lists(st.lists(st.integers(0, 50_000), max_size=3), max_size=3),
    _json,
)
_body = st.one_of(
    st.fixed_dictionaries(
        {"model": st.sampled_from([BASE_MODEL, "nope", ""]) | _json},
        optional={
            "messages": st.lists(_message, max_size=3) | _json,
            "prompt": _prompt,
            "stream": st.booleans() | _json,
            "stream_options": _json,
            "max_tokens": _json,
        },
    ),
    _json,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_body, path=st.sampled_from([CHAT, "/v1/completions", "/v1/embeddings"]))
def test_any_json_body_gets_one_answer_one_count_one_record(body: object, path: str) -> None:
    h = RouterHarness(configured_scheduler=True)
    client = h.post(path, json.dumps(body).encode())
    if h.upstream.calls:
        call = h.upstream.last
        call.json()  # the pod gets JSON it can parse
        if isinstance(body, dict) and body.get("stream") is True:
            stream = call.answer(sse_response())
            stream.send(event({"choices": [{"delta": {"content": "x"}}]}))
            stream.send(event(USAGE_ONLY) + DONE)
            stream.end()
        else:
            call.respond_json(COMPLETION)
    response = client.got()
    assert response.complete
    assert len(h.contexts) == 1
    ctx = h.context
    assert ctx.status == response.status
    if response.status >= 400:
        assert_error(response, response.status, ctx.error_type)
        assert ctx.error_type is not ErrorType.INTERNAL, ctx.error_message
    requests = h.metrics.requests
    assert sum(requests._values.values()) == 1
