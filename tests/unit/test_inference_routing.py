"""
HTTPRoute matching, InferencePool backend choice and InferenceModelRewrite renames
(L{kthena.inference_routing}, L{kthena.store.Datastore.match_http_route}), and the parsing
of the Gateway API Inference Extension documents
(L{kthena.config.inference_documents}), against Kthena's Go router
(C{pkg/kthena-router/router/httproute_match.go} and its test) and the Inference
Extension's InferenceModelRewrite precedence.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pytest

from kthena.config.documents import build_resource_set, parse_document
from kthena.config.gateway import normalize_host
from kthena.config.inference import GATEWAY_API, INFERENCE_API, INFERENCE_GROUP, REWRITE_API
from kthena.config.resources import KTHENA_API, GatewayListener
from kthena.config.resourceset import ResourceSet
from kthena.config.validate import ConfigError, Where
from kthena.store import Datastore
from tests.unit.routerfixtures import pod

Doc = dict[str, Any]

GW_NS, GW_NAME = "kthena-system", "gw"
VIA = GatewayListener(GW_NS, GW_NAME, "http", 8080)
"""The listener requests come through, unless a test says otherwise."""

NEWER = "2026-01-02T00:00:00Z"
OLDER = "2026-01-01T23:00:00Z"


# -- document builders


def _meta(name: str, namespace: str, created: object, **extra: Any) -> Doc:
    meta: Doc = {"name": name, "namespace": namespace, **extra}
    if created is not None:
        meta["creationTimestamp"] = created
    return meta


def prefix(value: str | None = None, **extra: Any) -> Doc:
    path: Doc = {"type": "PathPrefix"}
    if value is not None:
        path["value"] = value
    return {"path": path, **extra}


def exact(value: str, **extra: Any) -> Doc:
    return {"path": {"type": "Exact", "value": value}, **extra}


def regex(value: str, **extra: Any) -> Doc:
    return {"path": {"type": "RegularExpression", "value": value}, **extra}


def backend(name: str, weight: int | None = None, **extra: Any) -> Doc:
    ref: Doc = {"group": INFERENCE_GROUP, "kind": "InferencePool", "name": name, **extra}
    if weight is not None:
        ref["weight"] = weight
    return ref


def rule(*matches: Doc, to: str | list[Doc] | None = "pool-a", **extra: Any) -> Doc:
    """A rule sending to one pool (by name) or to the backendRefs given."""
    body: Doc = dict(extra)
    if matches:
        body["matches"] = list(matches)
    if isinstance(to, str):
        body["backendRefs"] = [backend(to)]
    elif to is not None:
        body["backendRefs"] = to
    return body


def parent(**extra: Any) -> Doc:
    return {"name": GW_NAME, "namespace": GW_NS, **extra}


def httproute(
    name: str,
    *rules: Doc,
    hostnames: list[str] | None = None,
    namespace: str = "default",
    created: object = None,
    parents: list[Doc] | None = None,
) -> Doc:
    spec: Doc = {"parentRefs": parents if parents is not None else [parent()]}
    if hostnames is not None:
        spec["hostnames"] = hostnames
    if rules:
        spec["rules"] = list(rules)
    return {
        "apiVersion": GATEWAY_API,
        "kind": "HTTPRoute",
        "metadata": _meta(name, namespace, created),
        "spec": spec,
    }


def pool(
    name: str,
    labels: Mapping[str, str] | None = None,
    ports: list[int] | None = None,
    namespace: str = "default",
    annotations: dict[str, str] | None = None,
    **spec: Any,
) -> Doc:
    meta = _meta(name, namespace, None)
    if annotations is not None:
        meta["annotations"] = annotations
    return {
        "apiVersion": INFERENCE_API,
        "kind": "InferencePool",
        "metadata": meta,
        "spec": {
            "selector": {"matchLabels": dict(labels or {"app": name})},
            "targetPorts": [{"number": p} for p in (ports or [8000])],
            **spec,
        },
    }


def target(model: str, weight: int | None = None) -> Doc:
    t: Doc = {"modelRewrite": model}
    if weight is not None:
        t["weight"] = weight
    return t


def rewrite_rule(models: list[str], *targets: Doc) -> Doc:
    r: Doc = {"targets": list(targets)}
    if models:
        r["matches"] = [{"model": {"type": "Exact", "value": m}} for m in models]
    return r


def rewrite(
    name: str,
    pool_name: str,
    *rules: Doc,
    created: object = None,
    namespace: str = "default",
    pool_ref: Doc | None = None,
) -> Doc:
    return {
        "apiVersion": REWRITE_API,
        "kind": "InferenceModelRewrite",
        "metadata": _meta(name, namespace, created),
        "spec": {"poolRef": pool_ref or {"name": pool_name}, "rules": list(rules)},
    }


POOLS = [pool(f"pool-{x}") for x in "abcd"]


# -- parsing and the store


def resources(*docs: Doc) -> ResourceSet:
    parsed = []
    for i, doc in enumerate(docs):
        where = Where("test", f"document {i + 1}")
        parsed.append((parse_document(doc, where, i), where))
    return build_resource_set(parsed)


def store_of(*docs: Doc, seed: int = 7, pools: bool = True) -> Datastore:
    """A store of C{docs} (and, unless told, the pools C{pool-a} to C{pool-d})."""
    named = {(d["kind"], d["metadata"]["namespace"], d["metadata"]["name"]) for d in docs}
    extra = (
        []
        if not pools
        else [p for p in POOLS if ("InferencePool", "default", p["metadata"]["name"]) not in named]
    )
    store = Datastore(random.Random(seed))
    store.replace(resources(*docs, *extra))
    return store


def header_lookup(values: Mapping[str, str]) -> Any:
    lowered = {k.lower(): v for k, v in values.items()}
    return lambda name: lowered.get(name.lower())


def found(
    store: Datastore,
    path: str = "/v1/chat/completions",
    host: str = "api.example.com",
    *,
    method: str = "POST",
    headers: Mapping[str, str] | None = None,
    model: str = "m",
    via: GatewayListener | None = VIA,
) -> tuple[str, str | None] | None:
    """Which HTTPRoute (namespace/name) takes the request, and which pool (or None)."""
    result = store.match_http_route(model, host, method, path, header_lookup(headers or {}), via)
    if result is None:
        return None
    choice, match = result
    return choice.route.meta.key, (match.inference_pool if match is not None else None)


def pool_of(store: Datastore, path: str = "/v1/chat/completions", **kw: Any) -> str | None:
    result = found(store, path, **kw)
    assert result is not None, "no HTTPRoute took the request"
    return result[1]


def parse_error(doc: Doc) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_document(doc, Where("test", "document 1"), 0)
    return str(caught.value)


# -- hostnames (TestMatchHTTPRouteHostname, and cross-route hostname precedence)


@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("api.example.com", "api.example.com", True),
        ("API.EXAMPLE.COM.", "api.example.com", True),  # the pattern is normalised
        ("*.example.com", "api.example.com", True),
        ("*.example.com", "v1.api.example.com", True),  # a wildcard takes nested labels
        ("*.example.com", "example.com", False),  # but not the apex
        ("*.example.com", "api.example.net", False),
        ("*.example.com", "apiexample.com", False),
        ("api.example.com", "other.example.com", False),
    ],
)
def test_hostname_patterns(pattern: str, host: str, matches: bool) -> None:
    store = store_of(httproute("r", rule(), hostnames=[pattern]))
    assert (found(store, host=host) is not None) is matches


@pytest.mark.parametrize(
    "host",
    [
        "api.example.com",
        "API.Example.COM",
        "api.example.com:8080",
        "api.example.com.",
        "Api.Example.Com.:443",
        "  api.example.com  ",
    ],
)
def test_host_header_is_normalised(host: str) -> None:
    store = store_of(httproute("r", rule(), hostnames=["api.example.com"]))
    assert found(store, host=host) == ("default/r", "default/pool-a")


@pytest.mark.parametrize(
    ("host", "normal"),
    [
        ("[::1]:8080", "::1"),
        ("[::1]", "::1"),
        ("::1", "::1"),
        ("[2001:DB8::1]:443", "2001:db8::1"),
        ("10.0.0.1:80", "10.0.0.1"),
        ("example.com:", "example.com"),
        ("EXAMPLE.com.", "example.com"),
        ("", ""),
    ],
)
def test_normalize_host(host: str, normal: str) -> None:
    assert normalize_host(host) == normal


def test_route_without_hostnames_takes_any_host_even_none() -> None:
    store = store_of(httproute("r", rule()))
    assert found(store, host="") == ("default/r", "default/pool-a")
    assert found(store, host="whatever.test:1") == ("default/r", "default/pool-a")


def test_route_with_hostnames_takes_no_request_without_a_host() -> None:
    store = store_of(httproute("r", rule(), hostnames=["api.example.com", "*.example.com"]))
    assert found(store, host="") is None


def test_hostname_precedence_exact_over_wildcard_over_none() -> None:
    docs = [
        httproute("any", rule(to="pool-a")),
        httproute("wild", rule(to="pool-b"), hostnames=["*.example.com"]),
        httproute("exact", rule(to="pool-c"), hostnames=["api.example.com"]),
    ]
    for order in (docs, docs[::-1]):
        store = store_of(*order)
        assert pool_of(store, host="api.example.com") == "default/pool-c"
        assert pool_of(store, host="web.example.com") == "default/pool-b"
        assert pool_of(store, host="api.example.org") == "default/pool-a"


def test_longer_wildcard_over_shorter() -> None:
    store = store_of(
        httproute("short", rule(to="pool-a"), hostnames=["*.example.com"], created=OLDER),
        httproute("long", rule(to="pool-b"), hostnames=["*.api.example.com"], created=NEWER),
    )
    assert pool_of(store, host="v1.api.example.com") == "default/pool-b"
    assert pool_of(store, host="web.example.com") == "default/pool-a"


def test_best_hostname_of_a_route_counts() -> None:
    # a route's rank is its most specific hostname that takes the host
    store = store_of(
        httproute("wild", rule(to="pool-a"), hostnames=["*.example.com"], created=OLDER),
        httproute(
            "both",
            rule(to="pool-b"),
            hostnames=["*.example.com", "api.example.com"],
            created=NEWER,
        ),
    )
    assert pool_of(store, host="api.example.com") == "default/pool-b"
    assert pool_of(store, host="web.example.com") == "default/pool-a"  # the older one


def test_exact_hostname_wins_before_path_specificity() -> None:
    # TestRouter_FindHTTPRouteMatchCrossRoutePrecedence: "exact hostname wins before path"
    store = store_of(
        httproute(
            "wildcard-route", rule(prefix("/chat")), hostnames=["*.example.com"], created=NEWER
        ),
        httproute("exact-route", rule(prefix("/")), hostnames=["api.example.com"], created=OLDER),
    )
    assert found(store, "/chat/completions", host="api.example.com") == (
        "default/exact-route",
        "default/pool-a",
    )


# Was a bug at aec5bae (fixed in 8129ba9): '*' and '*example.com' were accepted and
# matched as suffix wildcards; Kthena matches only '*.' wildcards (httproute_match.go,
# matchHTTPRouteHostnamePattern: HasPrefix(pattern, "*.")).
@pytest.mark.parametrize(
    ("pattern", "host"), [("*", "api.example.com"), ("*example.com", "badexample.com")]
)
def test_malformed_wildcard_hostnames_are_refused_or_never_match(pattern: str, host: str) -> None:
    try:
        store = store_of(httproute("r", rule(), hostnames=[pattern]))
    except ConfigError:
        return  # refused at parse: fine
    assert found(store, host=host) is None


# -- Gateway listeners (TestRouter_FindHTTPRouteMatch's parentRef cases)


@pytest.mark.parametrize(
    ("ref", "via", "attaches"),
    [
        ({"sectionName": "public", "port": 8080}, ("public", 8080), True),
        ({"sectionName": "private", "port": 8081}, ("private", 8081), True),
        ({"sectionName": "private", "port": 8081}, ("public", 8080), False),
        ({"sectionName": "http", "port": 8081}, ("http", 8080), False),
        ({}, ("public", 8080), True),
        ({"sectionName": "public"}, ("public", 8080), True),
        ({"sectionName": "private"}, ("public", 8080), False),
        ({"port": 8080}, ("public", 8080), True),
        ({"port": 9090}, ("public", 8080), False),
        ({"sectionName": "private", "port": 8081}, (None, None), False),
        ({}, (None, None), True),
        ({"kind": "Service"}, ("public", 8080), False),
        ({"group": "example.com"}, ("public", 8080), False),
    ],
)
def test_listener_attachment(ref: Doc, via: tuple[str | None, int | None], attaches: bool) -> None:
    store = store_of(httproute("route", rule(prefix("/chat")), parents=[parent(**ref)]))
    listener = GatewayListener(GW_NS, GW_NAME, *via)
    assert (found(store, "/chat", via=listener) is not None) is attaches


def test_second_parent_ref_attaches() -> None:
    parents = [
        {"name": "other-gw", "namespace": GW_NS, "sectionName": "private"},
        parent(sectionName="public"),
    ]
    store = store_of(httproute("route", rule(prefix("/chat")), parents=parents))
    assert found(store, "/chat", via=GatewayListener(GW_NS, GW_NAME, "public", 8080)) == (
        "default/route",
        "default/pool-a",
    )


def test_either_parent_ref_without_listener_context() -> None:
    parents = [parent(sectionName="private", port=8081), parent()]
    store = store_of(httproute("route", rule(prefix("/chat")), parents=parents))
    assert found(store, "/chat", via=GatewayListener(GW_NS, GW_NAME)) is not None


def test_no_gateway_no_httproute() -> None:
    store = store_of(httproute("route", rule()))
    assert found(store, via=None) is None
    assert found(store, via=GatewayListener(GW_NS, "another-gw", "http", 8080)) is None


def test_parent_namespace_defaults_to_the_routes() -> None:
    store = store_of(
        httproute("r", rule(), namespace=GW_NS, parents=[{"name": GW_NAME}]),
        pool("pool-a", namespace=GW_NS),
    )
    assert found(store) == (f"{GW_NS}/r", f"{GW_NS}/pool-a")


# -- paths


@pytest.mark.parametrize(
    ("value", "path", "matches"),
    [
        ("/chat", "/chat", True),
        ("/chat", "/chat/", True),
        ("/chat", "/chat/completions", True),
        ("/chat", "/chatx", False),
        ("/chat", "/cha", False),
        ("/chat/", "/chat", True),  # a trailing slash is ignored
        ("/chat/", "/chat/completions", True),
        ("/chat/", "/chatx", False),
        ("/v1/chat", "/v1/chat/completions", True),
        ("/v1/chat", "/v1/chatter", False),
        ("/", "/anything/at/all", True),
        ("/", "/", True),
        (None, "/x", True),  # the default value is "/"
    ],
)
def test_path_prefix_segments(value: str | None, path: str, matches: bool) -> None:
    store = store_of(httproute("r", rule(prefix(value))))
    assert (found(store, path) is not None) is matches


@pytest.mark.parametrize(
    ("value", "path", "matches"),
    [
        ("/v1/chat", "/v1/chat", True),
        ("/v1/chat", "/v1/chat/", False),
        ("/v1/chat", "/v1/chat/completions", False),
        ("/v1/chat", "/V1/chat", False),
        ("/v1/chat/", "/v1/chat", False),
    ],
)
def test_exact_path(value: str, path: str, matches: bool) -> None:
    store = store_of(httproute("r", rule(exact(value))))
    assert (found(store, path) is not None) is matches


@pytest.mark.parametrize(
    ("pattern", "path", "matches"),
    [
        ("chat", "/v1/chat/completions", True),  # found anywhere, as Go's MatchString
        ("^/v1/chat$", "/v1/chat/completions", False),
        ("^/v1/chat$", "/v1/chat", True),
        ("/v[0-9]+/", "/api/v2/x", True),
        ("^/v[0-9]+/", "/api/v2/x", False),
        ("COMPLETIONS", "/v1/completions", False),  # case-sensitive
    ],
)
def test_regular_expression_path(pattern: str, path: str, matches: bool) -> None:
    store = store_of(httproute("r", rule(regex(pattern))))
    assert (found(store, path) is not None) is matches


def test_rule_without_matches_takes_every_path() -> None:
    store = store_of(httproute("r", rule()))
    assert found(store, "/anything") == ("default/r", "default/pool-a")


def test_route_without_rules_takes_every_path_and_has_no_pool() -> None:
    # the Gateway API's default rule: PathPrefix "/", no backends (500, not 404)
    store = store_of(httproute("r"))
    assert found(store, "/v1/completions") == ("default/r", None)


def test_longest_prefix_in_one_route() -> None:
    # "prefers longest prefix in a single route"
    store = store_of(
        httproute("route", rule(prefix("/"), to="pool-a"), rule(prefix("/chat"), to="pool-b"))
    )
    assert pool_of(store, "/chat/completions") == "default/pool-b"
    assert pool_of(store, "/v1/completions") == "default/pool-a"


def test_no_rule_matches() -> None:
    store = store_of(httproute("route", rule(prefix("/api"))))
    assert found(store, "/chat") is None


def test_exact_over_prefix_over_regex_whatever_the_order() -> None:
    rules = [
        rule(regex("^/v1/chat/completions$"), to="pool-a"),
        rule(prefix("/"), to="pool-b"),
        rule(prefix("/v1/chat"), to="pool-c"),
        rule(exact("/v1/chat/completions"), to="pool-d"),
    ]
    for ordered in (rules, rules[::-1]):
        store = store_of(httproute("r", *ordered))
        assert pool_of(store, "/v1/chat/completions") == "default/pool-d"
        assert pool_of(store, "/v1/chat/other") == "default/pool-c"
        assert pool_of(store, "/v1/completions") == "default/pool-b"


def test_catch_all_prefix_beats_a_regex_in_the_same_route() -> None:
    store = store_of(
        httproute("r", rule(regex("completions"), to="pool-a"), rule(prefix("/"), to="pool-b"))
    )
    assert pool_of(store, "/v1/completions") == "default/pool-b"


def test_regex_when_nothing_else_matches() -> None:
    store = store_of(
        httproute(
            "r", rule(prefix("/other"), to="pool-a"), rule(regex("completions$"), to="pool-b")
        )
    )
    assert pool_of(store, "/v1/completions") == "default/pool-b"


def test_longer_exact_over_shorter_exact_across_matches() -> None:
    store = store_of(
        httproute(
            "r",
            rule(exact("/v1/completions"), prefix("/v1"), to="pool-a"),
            rule(prefix("/v1/completions"), to="pool-b"),
        ),
    )
    # rule 0's Exact match outranks rule 1's longer prefix
    assert pool_of(store, "/v1/completions") == "default/pool-a"
    # rule 0 only by its prefix /v1 now: rule 1's longer prefix wins
    assert pool_of(store, "/v1/completions/x") == "default/pool-b"


def test_rule_order_breaks_ties_within_a_route() -> None:
    store = store_of(
        httproute("r", rule(prefix("/v1"), to="pool-a"), rule(prefix("/v1/"), to="pool-b"))
    )
    assert pool_of(store, "/v1/x") == "default/pool-a"
    store = store_of(
        httproute("r", rule(prefix("/v1/"), to="pool-b"), rule(prefix("/v1"), to="pool-a"))
    )
    assert pool_of(store, "/v1/x") == "default/pool-b"


def test_default_rule_ties_with_a_root_prefix_by_rule_order() -> None:
    store = store_of(httproute("r", rule(to="pool-a"), rule(prefix("/"), to="pool-b")))
    assert pool_of(store, "/x") == "default/pool-a"
    store = store_of(httproute("r", rule(prefix("/"), to="pool-b"), rule(to="pool-a")))
    assert pool_of(store, "/x") == "default/pool-b"


def test_regex_ties_by_rule_order() -> None:
    store = store_of(
        httproute("r", rule(regex("^/v1/"), to="pool-a"), rule(regex("completions"), to="pool-b"))
    )
    assert pool_of(store, "/v1/completions") == "default/pool-a"


# -- across routes (TestRouter_FindHTTPRouteMatchCrossRoutePrecedence)


def test_longest_prefix_regardless_of_route_order() -> None:
    store = store_of(
        httproute("root-route", rule(prefix("/"), to="pool-a"), created=OLDER),
        httproute("chat-route", rule(prefix("/chat"), to="pool-b"), created=NEWER),
    )
    assert found(store, "/chat/completions") == ("default/chat-route", "default/pool-b")


def test_oldest_route_wins_equal_path_specificity() -> None:
    for names in (("new-route", "old-route"), ("old-route", "new-route")):
        docs = [
            httproute(
                n,
                rule(prefix("/chat"), to="pool-a" if n == "new-route" else "pool-b"),
                created=NEWER if n == "new-route" else OLDER,
            )
            for n in names
        ]
        store = store_of(*docs)
        assert found(store, "/chat/completions") == ("default/old-route", "default/pool-b")


def test_namespace_then_name_break_timestamp_ties() -> None:
    store = store_of(
        httproute("a-route", rule(prefix("/chat"), to="pool-a"), namespace="team-b", created=OLDER),
        httproute("z-route", rule(prefix("/chat"), to="pool-a"), namespace="team-a", created=OLDER),
        pool("pool-a", namespace="team-a"),
        pool("pool-a", namespace="team-b"),
    )
    assert found(store, "/chat/completions") == ("team-a/z-route", "team-a/pool-a")
    store = store_of(
        httproute("b", rule(prefix("/chat"), to="pool-b"), created=OLDER),
        httproute("a", rule(prefix("/chat"), to="pool-a"), created=OLDER),
    )
    assert found(store, "/chat/completions") == ("default/a", "default/pool-a")


def test_namespace_then_name_without_timestamps() -> None:
    store = store_of(
        httproute("b", rule(prefix("/chat"), to="pool-b")),
        httproute("a", rule(prefix("/chat"), to="pool-a")),
    )
    assert found(store, "/chat/completions") == ("default/a", "default/pool-a")


def test_exact_in_a_newer_route_beats_prefix_in_an_older() -> None:
    store = store_of(
        httproute("old", rule(prefix("/v1/chat/completions"), to="pool-a"), created=OLDER),
        httproute("new", rule(exact("/v1/chat/completions"), to="pool-b"), created=NEWER),
    )
    assert found(store, "/v1/chat/completions") == ("default/new", "default/pool-b")


def test_a_route_whose_rules_do_not_match_lets_another_take_it() -> None:
    store = store_of(
        httproute("specific", rule(exact("/nope"), to="pool-a"), hostnames=["api.example.com"]),
        httproute("general", rule(prefix("/"), to="pool-b")),
    )
    assert found(store, "/v1/completions") == ("default/general", "default/pool-b")


# Was a bug at aec5bae (fixed in 8129ba9): creationTimestamps compared as text; Kthena
# compares times (httproute_match.go, compareHTTPRouteMatchPrecedence).
@pytest.mark.parametrize(
    ("older", "newer"),
    [
        # 2026-01-01T23:00:00Z, written with an offset, against a later time in Z
        ("2026-01-02T01:00:00+02:00", "2026-01-01T23:30:00Z"),
        # a string, against a later time as yaml.safe_load reads an unquoted timestamp
        ("2026-01-01T22:00:00Z", datetime(2026, 1, 1, 23, 0, tzinfo=UTC)),
    ],
)
def test_oldest_route_by_time_not_by_text(older: Any, newer: Any) -> None:
    store = store_of(
        httproute("b-newer", rule(prefix("/chat"), to="pool-b"), created=newer),
        httproute("a-older", rule(prefix("/chat"), to="pool-a"), created=older),
    )
    assert found(store, "/chat") == ("default/a-older", "default/pool-a")


# -- method, headers and queryParams


def test_query_params_never_match() -> None:
    # "skips unsupported query param match instead of treating it as path only"
    q = {"queryParams": [{"name": "version", "value": "v1"}]}
    store = store_of(
        httproute(
            "route", rule(prefix("/chat", **q), to="pool-query"), rule(prefix("/"), to="pool-root")
        ),
        pool("pool-query"),
        pool("pool-root"),
    )
    assert pool_of(store, "/chat/completions") == "default/pool-root"
    store = store_of(httproute("route", rule(prefix("/chat", **q))))
    assert found(store, "/chat/completions") is None


def test_query_params_match_does_not_spoil_the_rules_other_matches() -> None:
    q = {"queryParams": [{"name": "version", "value": "v1"}]}
    store = store_of(httproute("route", rule(prefix("/chat", **q), prefix("/v1"))))
    assert found(store, "/v1/x") is not None
    assert found(store, "/chat/x") is None


def test_method_is_evaluated() -> None:
    # Kthena skips the match; the router evaluates it (an intended difference)
    store = store_of(
        httproute(
            "route",
            rule(prefix("/chat", method="POST"), to="pool-a"),
            rule(prefix("/"), to="pool-b"),
        )
    )
    assert pool_of(store, "/chat/completions", method="POST") == "default/pool-a"
    assert pool_of(store, "/chat/completions", method="GET") == "default/pool-b"


def test_headers_are_anded_and_names_case_insensitive() -> None:
    headers = [
        {"name": "X-Model-Tier", "value": "gold"},
        {"name": "x-region", "type": "Exact", "value": "eu"},
    ]
    store = store_of(
        httproute(
            "route",
            rule(prefix("/chat", headers=headers), to="pool-a"),
            rule(prefix("/"), to="pool-b"),
        )
    )
    both = {"x-model-tier": "gold", "X-Region": "eu"}
    assert pool_of(store, "/chat/x", headers=both) == "default/pool-a"
    assert pool_of(store, "/chat/x", headers={"x-model-tier": "gold"}) == "default/pool-b"
    assert pool_of(store, "/chat/x", headers={**both, "x-region": "EU"}) == "default/pool-b"
    assert pool_of(store, "/chat/x") == "default/pool-b"


def test_header_regex_found_anywhere() -> None:
    headers = [{"name": "user-agent", "type": "RegularExpression", "value": "curl/[0-9]+"}]
    store = store_of(httproute("route", rule(prefix("/", headers=headers), to="pool-a")))
    assert found(store, "/x", headers={"user-agent": "x curl/8.1 y"}) is not None
    assert found(store, "/x", headers={"user-agent": "wget"}) is None
    assert found(store, "/x") is None  # an absent header does not match, even ".*"
    anchored = [{"name": "user-agent", "type": "RegularExpression", "value": "^curl$"}]
    store = store_of(httproute("route", rule(prefix("/", headers=anchored), to="pool-a")))
    assert found(store, "/x", headers={"user-agent": "curl/8"}) is None
    assert found(store, "/x", headers={"user-agent": "curl"}) is not None


def test_absent_header_does_not_match_any_regex() -> None:
    headers = [{"name": "x-any", "type": "RegularExpression", "value": ".*"}]
    store = store_of(httproute("route", rule(prefix("/", headers=headers))))
    assert found(store, "/x") is None
    assert found(store, "/x", headers={"x-any": ""}) is not None


def test_a_match_with_failing_headers_lets_a_shorter_match_take_it() -> None:
    headers = [{"name": "x-canary", "value": "1"}]
    store = store_of(
        httproute(
            "route",
            rule(exact("/v1/chat", headers=headers), to="pool-a"),
            rule(prefix("/v1"), to="pool-b"),
        )
    )
    assert pool_of(store, "/v1/chat") == "default/pool-b"
    assert pool_of(store, "/v1/chat", headers={"x-canary": "1"}) == "default/pool-a"


# A regression test: the path kept the last header match's pattern.
def test_regex_path_with_an_exact_header_match() -> None:
    headers = [{"name": "x-tier", "value": "gold"}]
    store = store_of(httproute("route", rule(regex("^/v1/", headers=headers))))
    assert found(store, "/v1/chat", headers={"x-tier": "gold"}) == (
        "default/route",
        "default/pool-a",
    )


# A regression test: the path kept the last header match's pattern.
def test_regex_path_with_a_regex_header_match() -> None:
    headers = [{"name": "x-tier", "type": "RegularExpression", "value": "v1"}]
    store = store_of(httproute("route", rule(regex("^/admin$", headers=headers))))
    assert found(store, "/v1/chat", headers={"x-tier": "v1"}) is None
    assert found(store, "/admin", headers={"x-tier": "v1"}) is not None


def test_method_ranks_before_header_count() -> None:
    two = [{"name": "x-a", "value": "1"}, {"name": "x-b", "value": "2"}]
    store = store_of(
        httproute(
            "route",
            rule(prefix("/v1", headers=two), to="pool-a"),
            rule(prefix("/v1", method="POST"), to="pool-b"),
        )
    )
    both = {"x-a": "1", "x-b": "2"}
    assert pool_of(store, "/v1/x", headers=both) == "default/pool-b"
    assert pool_of(store, "/v1/x", headers=both, method="GET") == "default/pool-a"


def test_more_header_matches_outrank_fewer_across_routes() -> None:
    one = [{"name": "x-a", "value": "1"}]
    two = [*one, {"name": "x-b", "value": "2"}]
    store = store_of(
        httproute("old", rule(prefix("/v1", headers=one), to="pool-a"), created=OLDER),
        httproute("new", rule(prefix("/v1", headers=two), to="pool-b"), created=NEWER),
    )
    assert pool_of(store, "/v1/x", headers={"x-a": "1", "x-b": "2"}) == "default/pool-b"
    assert pool_of(store, "/v1/x", headers={"x-a": "1"}) == "default/pool-a"


def test_path_ranks_before_method_and_headers() -> None:
    headers = [{"name": "x-a", "value": "1"}]
    store = store_of(
        httproute(
            "route",
            rule(prefix("/v1", method="POST", headers=headers), to="pool-a"),
            rule(prefix("/v1/chat"), to="pool-b"),
            rule(exact("/v1/chat/x"), to="pool-c"),
        )
    )
    assert pool_of(store, "/v1/chat/y", headers={"x-a": "1"}) == "default/pool-b"
    assert pool_of(store, "/v1/chat/x", headers={"x-a": "1"}) == "default/pool-c"


# Was a bug at aec5bae (fixed in 8129ba9): method and header matches did not rank (gateway-api
# apis/v1/httproute_types.go, HTTPRouteRule.Matches: '* Method match. * Largest number of
# header matches.').
def test_header_match_outranks_rule_order_at_equal_path() -> None:
    headers = [{"name": "x-canary", "value": "1"}]
    store = store_of(
        httproute(
            "route",
            rule(prefix("/v1"), to="pool-a"),
            rule(prefix("/v1", headers=headers), to="pool-b"),
        )
    )
    assert pool_of(store, "/v1/chat", headers={"x-canary": "1"}) == "default/pool-b"


# Was a bug at aec5bae (fixed in 8129ba9): the same, across routes.
def test_method_match_outranks_older_route_at_equal_path() -> None:
    store = store_of(
        httproute("old", rule(prefix("/v1"), to="pool-a"), created=OLDER),
        httproute("new", rule(prefix("/v1", method="POST"), to="pool-b"), created=NEWER),
    )
    assert pool_of(store, "/v1/chat", method="POST") == "default/pool-b"


# Was a bug at aec5bae (fixed in 8129ba9): gateway-api apis/v1/httproute_types.go,
# HTTPHeaderMatch.Name: 'Subsequent entries with an equivalent header name MUST be ignored'.
def test_only_the_first_of_equivalent_header_names_counts() -> None:
    headers = [{"name": "x-tier", "value": "gold"}, {"name": "X-Tier", "value": "silver"}]
    store = store_of(httproute("route", rule(prefix("/", headers=headers))))
    assert found(store, "/x", headers={"x-tier": "gold"}) is not None


# -- backends (TestInferencePoolFromHTTPRouteRuleWeights, TestSelectWeightedInferencePool)


def test_zero_weight_backend_gets_no_traffic() -> None:
    store = store_of(
        httproute("r", rule(to=[backend("pool-zero", 0), backend("pool-live", 1)])),
        pool("pool-zero"),
        pool("pool-live"),
    )
    assert {pool_of(store) for _ in range(50)} == {"default/pool-live"}


def test_omitted_weight_is_one() -> None:
    store = store_of(httproute("r", rule(to=[backend("pool-default")])), pool("pool-default"))
    assert pool_of(store) == "default/pool-default"
    store = store_of(httproute("r", rule(to=[backend("pool-a"), backend("pool-b", 1)])))
    counts = Counter(pool_of(store) for _ in range(4000))
    assert 0.45 < counts["default/pool-a"] / 4000 < 0.55


def test_all_weights_zero_is_no_pool() -> None:
    store = store_of(httproute("r", rule(to=[backend("pool-zero", 0)])), pool("pool-zero"))
    assert found(store) == ("default/r", None)


def test_weighted_choice_follows_the_weights() -> None:
    store = store_of(httproute("r", rule(to=[backend("pool-a", 3), backend("pool-b", 1)])))
    counts = Counter(pool_of(store) for _ in range(8000))
    assert set(counts) == {"default/pool-a", "default/pool-b"}
    assert 0.72 < counts["default/pool-a"] / 8000 < 0.78


def test_backends_other_than_inference_pools_are_not_the_routers() -> None:
    refs: list[Doc] = [
        {"name": "svc", "port": 80},  # a Service (the default group and kind)
        {"kind": "InferencePool", "name": "no-group"},
        {"group": INFERENCE_GROUP, "name": "no-kind"},
        {"group": "example.com", "kind": "InferencePool", "name": "wrong-group"},
        backend("pool-a"),
    ]
    store = store_of(httproute("r", rule(to=refs)))
    assert {pool_of(store) for _ in range(50)} == {"default/pool-a"}
    store = store_of(httproute("r", rule(to=[{"name": "svc", "port": 80}])))
    assert found(store) == ("default/r", None)


def test_backend_in_another_namespace() -> None:
    store = store_of(
        httproute("r", rule(to=[backend("shared", namespace="models")])),
        pool("shared", namespace="models"),
    )
    assert pool_of(store) == "models/shared"


def test_backend_namespace_defaults_to_the_routes() -> None:
    store = store_of(httproute("r", rule(to="p"), namespace="team"), pool("p", namespace="team"))
    assert pool_of(store) == "team/p"


def test_the_chosen_rules_backends_not_the_first_rules() -> None:
    store = store_of(
        httproute("r", rule(prefix("/other"), to="pool-a"), rule(prefix("/v1"), to="pool-b"))
    )
    assert pool_of(store, "/v1/x") == "default/pool-b"


def test_match_names_route_rule_and_pool() -> None:
    store = store_of(httproute("r", rule(prefix("/v1"), to="pool-b", name="main")))
    result = store.match_http_route("m", "h", "POST", "/v1/x", header_lookup({}), VIA)
    assert result is not None
    choice, match = result
    assert match is not None
    assert (choice.rule.name, choice.rule.index) == ("main", 0)
    assert (match.http_route, match.inference_pool, match.model_route) == (
        "default/r",
        "default/pool-b",
        None,
    )
    assert match.via == VIA
    assert match.server.kind == "InferencePool"
    assert match.upstream_model("m") == "m"  # no rewrite: the model as asked


# -- InferencePools and their pods


def test_pool_pods_are_its_serving_pods_in_its_namespace() -> None:
    store = store_of(
        pool("p", {"app": "llm"}, ports=[8001, 8002]),
        pod("ok", "10.0.0.1", {"app": "llm", "extra": "x"}),
        pod("not-ready", "10.0.0.2", {"app": "llm"}, ready=False),
        pod("pending", "10.0.0.3", {"app": "llm"}, phase="Pending"),
        pod("other-app", "10.0.0.4", {"app": "other"}),
        pod("other-ns", "10.0.0.5", {"app": "llm"}, namespace="elsewhere"),
        pools=False,
    )
    (p,) = store.resources.pools
    members = store.server_pods(p.server)
    # Each pod and target port is an endpoint (the Inference Extension's rule).
    assert [(e.key, e.host, e.port) for e in members] == [
        ("default/ok", "10.0.0.1", 8001),
        ("default/ok:8002", "10.0.0.1", 8002),
    ]
    assert p.target_ports == (8001, 8002)
    assert p.server.port == 8001
    assert p.server.engine == "vLLM"


def test_pool_engine_annotation() -> None:
    store = store_of(pool("p", annotations={"kthena.io/inference-engine": "SGLang"}), pools=False)
    (p,) = store.resources.pools
    assert p.server.engine == "SGLang"
    assert p.server.model is None


def test_pool_match_carries_the_pools_server() -> None:
    store = store_of(
        httproute("r", rule(to="p")),
        pool("p", {"app": "llm"}, ports=[9000]),
        pod("a", "10.0.0.1", {"app": "llm"}),
        pools=False,
    )
    result = store.match_http_route("m", "h", "POST", "/v1/x", header_lookup({}), VIA)
    assert result is not None and result[1] is not None
    server = result[1].server
    assert server.port == 9000
    assert [e.authority for e in store.server_pods(server)] == ["10.0.0.1:9000"]


# Was a bug at aec5bae (fixed in 8129ba9): the pod's one endpoint had the ModelServer's
# port; Kthena sends every pool request to the pool's first targetPort (router.go:574).
def test_pool_pods_use_the_pools_port_even_when_a_model_server_shares_them() -> None:
    server_doc = {
        "apiVersion": KTHENA_API,
        "kind": "ModelServer",
        "metadata": {"name": "ms", "namespace": "default"},
        "spec": {
            "inferenceEngine": "vLLM",
            "workloadSelector": {"matchLabels": {"app": "llm"}},
            "workloadPort": {"port": 8000},
        },
    }
    store = store_of(
        server_doc,
        pool("p", {"app": "llm"}, ports=[9000]),
        pod("a", "10.0.0.1", {"app": "llm"}),
        pools=False,
    )
    (p,) = store.resources.pools
    assert [e.port for e in store.server_pods(p.server)] == [9000]


# -- InferenceModelRewrite


def rewritten(store: Datastore, model: str) -> tuple[str | None, bool]:
    result = store.match_http_route(model, "h", "POST", "/v1/x", header_lookup({}), VIA)
    assert result is not None and result[1] is not None
    match = result[1]
    return match.rewritten, match.declared


def test_no_rewrite() -> None:
    store = store_of(httproute("r", rule()))
    assert rewritten(store, "m") == (None, False)


def test_exact_rule_of_a_newer_rewrite_beats_a_generic_rule_of_an_older() -> None:
    store = store_of(
        httproute("r", rule()),
        rewrite("old", "pool-a", rewrite_rule([], target("generic")), created=OLDER),
        rewrite("new", "pool-a", rewrite_rule(["m"], target("exact")), created=NEWER),
    )
    assert rewritten(store, "m") == ("exact", True)
    assert rewritten(store, "other") == ("generic", False)


def test_exact_rule_after_a_generic_one_in_the_same_rewrite_wins() -> None:
    store = store_of(
        httproute("r", rule()),
        rewrite(
            "rw",
            "pool-a",
            rewrite_rule([], target("generic")),
            rewrite_rule(["m"], target("exact")),
        ),
    )
    assert rewritten(store, "m") == ("exact", True)


def test_oldest_rewrite_wins_among_exact_rules() -> None:
    for order in ((OLDER, NEWER), (NEWER, OLDER)):
        store = store_of(
            httproute("r", rule()),
            rewrite("one", "pool-a", rewrite_rule(["m"], target("from-one")), created=order[0]),
            rewrite("two", "pool-a", rewrite_rule(["m"], target("from-two")), created=order[1]),
        )
        expected = "from-one" if order[0] == OLDER else "from-two"
        assert rewritten(store, "m") == (expected, True)


def test_oldest_rewrite_wins_among_generic_rules() -> None:
    store = store_of(
        httproute("r", rule()),
        rewrite("b", "pool-a", rewrite_rule([], target("from-b")), created=NEWER),
        rewrite("a", "pool-a", rewrite_rule([], target("from-a")), created=OLDER),
    )
    assert rewritten(store, "x") == ("from-a", False)


def test_first_matching_rule_within_a_rewrite() -> None:
    store = store_of(
        httproute("r", rule()),
        rewrite(
            "rw",
            "pool-a",
            rewrite_rule(["other"], target("no")),
            rewrite_rule(["m", "n"], target("first")),
            rewrite_rule(["m"], target("second")),
            rewrite_rule([], target("g1")),
            rewrite_rule([], target("g2")),
        ),
    )
    assert rewritten(store, "m") == ("first", True)
    assert rewritten(store, "n") == ("first", True)  # matches are ORed
    assert rewritten(store, "other") == ("no", True)
    assert rewritten(store, "zzz") == ("g1", False)


def test_rewrite_without_a_matching_rule() -> None:
    store = store_of(
        httproute("r", rule()), rewrite("rw", "pool-a", rewrite_rule(["x"], target("y")))
    )
    assert rewritten(store, "m") == (None, False)


def test_rewrites_of_another_pool_do_not_apply() -> None:
    store = store_of(
        httproute("r", rule(to="pool-a")),
        rewrite("rw", "pool-b", rewrite_rule([], target("b-model"))),
        rewrite("rw", "pool-a", rewrite_rule([], target("a-model")), namespace="other"),
        pool("pool-a", namespace="other"),
    )
    assert rewritten(store, "m") == (None, False)


def test_rewrite_targets_by_weight() -> None:
    store = store_of(
        httproute("r", rule()),
        rewrite("rw", "pool-a", rewrite_rule(["m"], target("v1", 10), target("v2", 90))),
    )
    counts = Counter(rewritten(store, "m")[0] for _ in range(5000))
    assert set(counts) == {"v1", "v2"}
    assert 0.07 < counts["v1"] / 5000 < 0.13


def test_unweighted_rewrite_targets_share_equally() -> None:
    store = store_of(
        httproute("r", rule()),
        rewrite("rw", "pool-a", rewrite_rule([], target("v1"), target("v2"))),
    )
    counts = Counter(rewritten(store, "m")[0] for _ in range(4000))
    assert 0.45 < counts["v1"] / 4000 < 0.55


def test_rewritten_model_goes_upstream() -> None:
    store = store_of(
        httproute("r", rule()), rewrite("rw", "pool-a", rewrite_rule(["m"], target("real/m")))
    )
    result = store.match_http_route("m", "h", "POST", "/", header_lookup({}), VIA)
    assert result is not None and result[1] is not None
    assert result[1].upstream_model("m") == "real/m"


def test_rewrite_applies_to_the_chosen_pool() -> None:
    store = store_of(
        httproute("r", rule(prefix("/a"), to="pool-a"), rule(prefix("/b"), to="pool-b")),
        rewrite("ra", "pool-a", rewrite_rule([], target("from-a"))),
        rewrite("rb", "pool-b", rewrite_rule([], target("from-b"))),
    )
    for path, model in (("/a", "from-a"), ("/b", "from-b")):
        result = store.match_http_route("m", "h", "POST", path, header_lookup({}), VIA)
        assert result is not None and result[1] is not None
        assert result[1].rewritten == model
    (pa,) = [p for p in store.resources.pools if p.meta.name == "pool-a"]
    assert [r.meta.name for r in store.pool_rewrites(pa)] == ["ra"]


def test_rewrite_pool_ref_defaults() -> None:
    store = store_of(
        httproute("r", rule()),
        rewrite(
            "rw",
            "pool-a",
            rewrite_rule([], target("x")),
            pool_ref={"group": INFERENCE_GROUP, "kind": "InferencePool", "name": "pool-a"},
        ),
    )
    assert rewritten(store, "m") == ("x", False)


# -- parse errors


def _route_with_match(match: Doc) -> Doc:
    return httproute("r", rule(match))


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            _route_with_match({"path": {"type": "Prefix", "value": "/"}}),
            "spec.rules[0].matches[0].path.type: must be one of Exact, PathPrefix, "
            "RegularExpression, not 'Prefix'",
        ),
        (
            _route_with_match(prefix("v1")),
            "spec.rules[0].matches[0].path.value: must start with '/', not 'v1'",
        ),
        (
            _route_with_match(exact("v1/chat")),
            "spec.rules[0].matches[0].path.value: must start with '/'",
        ),
        (
            _route_with_match(regex("^/v1/(chat")),
            "spec.rules[0].matches[0].path.value: is not a valid regular expression",
        ),
        (
            _route_with_match(
                prefix("/", headers=[{"name": "x", "value": "(", "type": "RegularExpression"}])
            ),
            "spec.rules[0].matches[0].headers[0].value: is not a valid regular expression",
        ),
        (
            _route_with_match(prefix("/", headers=[{"name": "x", "value": "y", "type": "Prefix"}])),
            "spec.rules[0].matches[0].headers[0].type: must be one of Exact, RegularExpression",
        ),
        (
            _route_with_match(prefix("/", method="FETCH")),
            "spec.rules[0].matches[0].method: must be one of GET",
        ),
        (
            httproute("r", rule(filters=[{"type": "URLRewrite", "urlRewrite": {}}])),
            "HTTPRoute default/r): spec.rules[0].filters: is not supported by the router",
        ),
        (
            httproute("r", rule(timeouts={"request": "10s"})),
            "spec.rules[0].timeouts: is not supported by the router",
        ),
        (
            httproute("r", rule(retry={"attempts": 2})),
            "spec.rules[0].retry: is not supported by the router",
        ),
        (
            httproute("r", rule(to=[backend("p", filters=[{"type": "RequestHeaderModifier"}])])),
            "spec.rules[0].backendRefs[0].filters: backend filters are not supported",
        ),
        (
            httproute("r", rule(to=[backend("p", -1)])),
            "spec.rules[0].backendRefs[0].weight: must be at least 0, not -1",
        ),
        (
            {**httproute("r", rule()), "spec": {"rules": [rule()]}},
            "spec.parentRefs: is required",
        ),
        (
            httproute("r", rule(), hostnames=["*"]),
            "spec.hostnames[0]: must be a DNS name or a wildcard",
        ),
        (
            httproute("r", rule(), hostnames=["api.*.example.com"]),
            "spec.hostnames[0]: must be a DNS name or a wildcard",
        ),
        (
            httproute("r", rule(), hostnames=["api.example.com:8080"]),
            "spec.hostnames[0]: must be a DNS name or a wildcard",
        ),
        (
            httproute("r", rule(), created="yesterday"),
            "metadata.creationTimestamp: must be an RFC 3339 time",
        ),
        (
            httproute("r", rule(), parents=[]),
            "spec.parentRefs: needs at least one Gateway",
        ),
        (
            httproute("r", rule(prefix("/"), to="p", sessionPersistence={})),
            "spec.rules[0].sessionPersistence: unknown field",
        ),
    ],
)
def test_httproute_errors(doc: Doc, message: str) -> None:
    assert message in parse_error(doc)


def test_error_names_file_document_and_route() -> None:
    text = parse_error(_route_with_match(prefix("v1")))
    assert text.startswith("test: document 1 (HTTPRoute default/r): spec.rules[0]")


def _pool_spec(**spec: Any) -> Doc:
    doc = pool("p")
    doc["spec"] = spec
    return doc


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (_pool_spec(selector={"matchLabels": {"app": "p"}}), "spec.targetPorts: is required"),
        (
            _pool_spec(selector={"matchLabels": {"app": "p"}}, targetPorts=[]),
            "spec.targetPorts: needs at least one port",
        ),
        (pool("p", ports=[8000, 8001, 8000]), "spec.targetPorts: lists a port twice"),
        (
            pool("p", ports=list(range(8000, 8009))),
            "spec.targetPorts: has 9 items; at most 8 are allowed",
        ),
        (pool("p", ports=[0]), "spec.targetPorts[0].number: must be at least 1"),
        (pool("p", ports=[65536]), "spec.targetPorts[0].number: must be at most 65535"),
        (
            _pool_spec(selector={"matchLabels": {"app": "p"}}, targetPorts=[{"port": 1}]),
            "spec.targetPorts[0].port: unknown field",
        ),
        (
            pool("p", annotations={"kthena.io/inference-engine": "TGI"}),
            "metadata.annotations.kthena.io/inference-engine: must be one of vLLM, SGLang, "
            "not 'TGI'",
        ),
        (
            _pool_spec(targetPorts=[{"number": 8000}]),
            "spec.selector: is required",
        ),
        (
            _pool_spec(selector={"matchLabels": {}}, targetPorts=[{"number": 8000}]),
            "spec.selector.matchLabels: must hold at least one label",
        ),
        (
            pool("p", appProtocol="kubernetes.io/h2c"),
            "spec.appProtocol: must be one of http",
        ),
    ],
)
def test_inference_pool_errors(doc: Doc, message: str) -> None:
    text = parse_error(doc)
    assert message in text
    assert "(InferencePool default/p)" in text


def test_pool_with_eight_distinct_ports_is_fine() -> None:
    p = parse_document(pool("p", ports=list(range(8000, 8008))), Where("test"), 0)
    assert p.target_ports == tuple(range(8000, 8008))  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (
            rewrite("rw", "p", rewrite_rule(["m"], target("a", 1), target("b"))),
            "spec.rules[0].targets: either every target has a weight or none has",
        ),
        (
            rewrite(
                "rw",
                "p",
                rewrite_rule(["m"]),
            ),
            "spec.rules[0].targets: needs at least one target",
        ),
        (
            rewrite("rw", "p", rewrite_rule(["m"], target("a", 0))),
            "spec.rules[0].targets[0].weight: must be at least 1",
        ),
        (
            rewrite(
                "rw",
                "p",
                rewrite_rule([], target("a")),
                pool_ref={"group": "inference.networking.x-k8s.io", "name": "p"},
            ),
            "spec.poolRef.group: must be inference.networking.k8s.io",
        ),
        (
            rewrite(
                "rw", "p", rewrite_rule([], target("a")), pool_ref={"kind": "Service", "name": "p"}
            ),
            "spec.poolRef.kind: must be one of InferencePool",
        ),
        (
            {**rewrite("rw", "p"), "spec": {"poolRef": {"name": "p"}, "rules": []}},
            "spec.rules: needs at least one rule",
        ),
        (
            rewrite(
                "rw",
                "p",
                {
                    "matches": [{"model": {"type": "Prefix", "value": "m"}}],
                    "targets": [target("a")],
                },
            ),
            "spec.rules[0].matches[0].model.type: must be one of Exact",
        ),
    ],
)
def test_rewrite_errors(doc: Doc, message: str) -> None:
    text = parse_error(doc)
    assert message in text
    assert "(InferenceModelRewrite default/rw)" in text


def test_httproute_naming_a_missing_pool_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        resources(httproute("r", rule(prefix("/"), to="absent")))
    text = str(caught.value)
    assert "(HTTPRoute default/r)" in text
    assert "spec.rules[0].backendRefs: no InferencePool 'absent' in namespace 'default'" in text


def test_httproute_naming_a_pool_in_a_missing_namespace_is_refused() -> None:
    with pytest.raises(ConfigError, match="no InferencePool 'pool-a' in namespace 'models'"):
        resources(httproute("r", rule(to=[backend("pool-a", namespace="models")])), *POOLS)


def test_httproute_second_rule_naming_a_missing_pool_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"spec\.rules\[1\]\.backendRefs: no InferencePool"):
        resources(httproute("r", rule(to="pool-a"), rule(to="absent")), *POOLS)


def test_rewrite_naming_a_missing_pool_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        resources(rewrite("rw", "absent", rewrite_rule([], target("x"))))
    assert "spec.poolRef: no InferencePool 'absent' in namespace 'default'" in str(caught.value)


def test_pool_defined_twice_is_refused() -> None:
    with pytest.raises(ConfigError, match="InferencePool default/pool-a is defined twice"):
        resources(pool("pool-a"), pool("pool-a"))


def test_non_pool_backends_need_no_pool() -> None:
    rs = resources(httproute("r", rule(to=[{"name": "svc", "port": 80}])))
    assert len(rs.httproutes) == 1


def test_parsed_route_shape() -> None:
    rs = resources(
        httproute(
            "r",
            rule(
                prefix("/v1/"),
                exact("/x", method="POST", headers=[{"name": "X-A", "value": "1"}]),
                to=[backend("pool-a", 2), backend("pool-b", 0)],
                name="main",
            ),
            hostnames=["API.Example.com."],
        ),
        *POOLS,
    )
    (route,) = rs.httproutes
    assert route.hostnames == ("api.example.com",)
    (r,) = route.rules
    assert r.name == "main"
    assert [(m.path_type, m.value) for m in r.matches] == [("PathPrefix", "/v1"), ("Exact", "/x")]
    assert r.matches[1].method == "POST"
    assert [(h.name, h.value) for h in r.matches[1].headers] == [("x-a", "1")]
    assert [(b.key, b.weight) for b in r.backends] == [("default/pool-a", 2)]
