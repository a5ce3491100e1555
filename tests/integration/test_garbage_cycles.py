"""
What a served request leaves for CPython's cyclic collector: nothing of the router's.

Objects freed by their reference counts go as the request ends; objects in reference
cycles stay until a collection finds them, and every collection walks whatever was
allocated since the last one. Under load that was ~4% of the router's CPU (a PodResponse,
its Relay and the relay's Deferred, per request). The router's objects (the types of
C{kthena}, the simulated pods aside) must all go by reference counting: the collector,
set to keep what it finds (C{DEBUG_SAVEALL}), finds none of them after plain, streamed,
refused and failed requests, and streams the client hung up on.
"""

from __future__ import annotations

import gc
from collections import Counter

from tests.integration.router_helpers import Cluster, chat_body, closed_port, inline
from tests.unit.routerfixtures import pod, server, simple_route

CHAT = "/v1/chat/completions"


def _on_a_cycle(thing: object, found: list[object]) -> bool:
    """Whether C{thing} is reachable from itself through what the collector found (an
    object merely held by a cycle of others, such as the body an C{Agent} request of the
    test's client holds, goes with that cycle: it is not the router's to break)."""
    among = {id(other) for other in found}
    seen: set[int] = set()
    todo = list(gc.get_referents(thing))
    while todo:
        other = todo.pop()
        if other is thing:
            return True
        if id(other) in among and id(other) not in seen:
            seen.add(id(other))
            todo.extend(gc.get_referents(other))
    return False


def _routers(found: list[object]) -> Counter[str]:
    """The router's objects on reference cycles among those the collector found, by type."""
    names: Counter[str] = Counter()
    for thing in found:
        module = type(thing).__module__
        ours = module.startswith("kthena.") and not module.startswith("kthena.sim.")
        if ours and _on_a_cycle(thing, found):
            names[type(thing).__qualname__] += 1
    return names


@inline
async def test_served_requests_leave_no_cycles(cluster: Cluster) -> None:
    sim = cluster.sim("org/upstream")
    docs = [
        simple_route("r", "client-model", "srv"),
        server("srv", {"app": "srv"}, "org/upstream"),
        cluster.pod("pod-0", sim, {"app": "srv"}),
        simple_route("gone", "gone-model", "gone-srv"),
        server("gone-srv", {"app": "gone"}, "org/upstream"),
        pod("pod-gone", "127.0.0.1", {"app": "gone"}, port=closed_port()),
    ]
    router = cluster.router(docs)
    slow = chat_body("client-model", stream=True, max_tokens=50)
    for _ in range(2):  # connections, pools and caches made once are not per request
        await cluster.post(router, CHAT, chat_body("client-model"))
        await cluster.stream(router, CHAT, chat_body("client-model", stream=True))
        await cluster.post(router, CHAT, chat_body("gone-model"))
    gc.collect()
    # Held through the window: what earlier tests left (their routers, still referenced
    # from pytest's frames) is neither collected in it nor mistaken for this test's.
    earlier = gc.get_objects()
    known = {id(thing) for thing in earlier}
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(5):
            assert (await cluster.post(router, CHAT, chat_body("client-model"))).status == 200
            reply = await cluster.stream(router, CHAT, chat_body("client-model", stream=True))
            assert reply.done
            await cluster.stream(router, CHAT, slow, hang_up_after=1)
            assert (await cluster.post(router, CHAT, chat_body("nobody"))).status == 404
            assert (await cluster.post(router, CHAT, b"{")).status == 400
            assert (await cluster.post(router, CHAT, chat_body("gone-model"))).status >= 500
        gc.collect()
    finally:
        gc.set_debug(0)
        found = [thing for thing in gc.garbage if id(thing) not in known]
        gc.garbage.clear()
        del earlier
    assert _routers(found) == Counter()
