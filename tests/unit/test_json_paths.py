"""
The request path's JSON: parsed once by orjson, with the standard library for what orjson
refuses or reads otherwise, and re-serialised compactly, with the same fallback.
"""

from __future__ import annotations

import json

import pytest

from kthena.errors import ProxyError
from kthena.pipeline.parse import loads
from kthena.webutil import json_bytes


def test_what_orjson_reads_otherwise_is_read_as_python_does() -> None:
    for big in (2**70, 2**64, -(2**63) - 1, 2**64 - 1, -(2**63)):
        assert loads(b'{"seed": %d}' % big) == {"seed": big}  # not a float
        assert loads(b"[%d]" % big) == [big]
    assert loads(b'{"x": "\\ud800"}') == {"x": "\ud800"}  # a lone surrogate escape
    assert json.dumps(loads(b'{"t": NaN}')) == '{"t": NaN}'
    assert loads('{"t": "h\u00e9llo", "n": [1, 2.5, null, true]}'.encode()) == {
        "t": "h\u00e9llo",
        "n": [1, 2.5, None, True],
    }


def test_what_neither_reads_is_a_400_with_pythons_message() -> None:
    with pytest.raises(ProxyError) as raised:
        loads(b'{"a": 1} trailing')
    assert raised.value.status == 400
    assert "invalid JSON body: Extra data: line 1 column 10" in str(raised.value)


def test_bodies_are_compact_utf8_or_ascii_escapes_when_they_must() -> None:
    assert json_bytes({"m": "h\u00e9", "n": [1, 2.5]}) == '{"m":"h\u00e9","n":[1,2.5]}'.encode()
    assert json_bytes({"s": "\ud800"}) == b'{"s":"\\ud800"}'
    assert json_bytes({"seed": 2**70}) == b'{"seed":%d}' % 2**70


def test_a_body_holds_no_more_memory_than_its_length() -> None:
    import tracemalloc

    value = {"model": "m", "messages": [{"role": "user", "content": "x" * 4096}]}
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        bodies = [json_bytes(value) for _ in range(20)]
        held = (tracemalloc.get_traced_memory()[0] - before) / len(bodies)
    finally:
        tracemalloc.stop()
    assert held < len(bodies[0]) + 512
