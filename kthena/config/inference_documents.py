"""
Reading the Gateway API Inference Extension's documents (L{kthena.config.inference}):
what their CRDs' schemas check, and what the router cannot do refused by name rather than
ignored (C{filters}, a pool without target ports).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kthena.config.gateway import hostname_of, parse_parent_ref
from kthena.config.inference import (
    ENGINE_ANNOTATION,
    INFERENCE_GROUP,
    PATH_EXACT,
    PATH_PREFIX,
    PATH_REGEX,
    HeaderMatch,
    HTTPRoute,
    HTTPRouteRule,
    InferencePool,
    ModelRewrite,
    PoolBackend,
    PoolServer,
    RewriteRule,
    RewriteTarget,
    RouteMatchRule,
)
from kthena.config.metadata import read_document
from kthena.config.resources import ENGINES
from kthena.config.validate import (
    Where,
    choice,
    integer,
    mapping,
    regex,
    selector,
    sequence,
    string,
)


def parse_inference_pool(doc: Mapping[str, Any], where: Where, order: int) -> InferencePool:
    meta, where, s_where, spec = read_document(
        doc,
        where,
        order,
        ("selector", "targetPorts", "appProtocol", "endpointPickerRef"),
        required=("selector", "targetPorts"),
    )
    sel_where = s_where.at("selector")
    chosen = mapping(spec["selector"], sel_where, ("matchLabels",), required=("matchLabels",))
    match_labels = selector(chosen["matchLabels"], sel_where.at("matchLabels"))
    p_where = s_where.at("targetPorts")
    raw_ports = sequence(spec["targetPorts"], p_where, max_items=8)
    if not raw_ports:
        p_where.fail("needs at least one port")
    ports = tuple(
        integer(
            mapping(p, p_where.at(i), ("number",), required=("number",))["number"],
            p_where.at(i).at("number"),
            minimum=1,
            maximum=65535,
        )
        for i, p in enumerate(raw_ports)
    )
    if len(set(ports)) != len(ports):
        p_where.fail("lists a port twice")
    choice(spec.get("appProtocol", "http"), s_where.at("appProtocol"), ("http",))
    engine = meta.annotations.get(ENGINE_ANNOTATION, "vLLM")
    if engine not in ENGINES:
        where.at("metadata.annotations").at(ENGINE_ANNOTATION).fail(
            f"must be one of {', '.join(ENGINES)}, not {engine!r}"
        )
    server = PoolServer(
        meta=meta,
        model=None,
        engine=engine,
        match_labels=match_labels,
        pd_group=None,
        port=ports[0],
        protocol="http",
        timeout=None,
        retry=None,
        kv_connector=None,
        spec=spec,
        ports=ports,
    )
    return InferencePool(meta, match_labels, ports, server, spec)


_MATCH_FIELDS = ("path", "headers", "queryParams", "method")
_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")


def _route_match(value: object, where: Where) -> RouteMatchRule:
    spec = mapping(value, where, _MATCH_FIELDS)
    path = mapping(spec.get("path"), where.at("path"), ("type", "value"))
    path_type = choice(
        path.get("type", PATH_PREFIX), where.at("path.type"), (PATH_EXACT, PATH_PREFIX, PATH_REGEX)
    )
    value = string(path.get("value", "/"), where.at("path.value"))
    pattern = None
    if path_type == PATH_REGEX:
        pattern = regex(value, where.at("path.value"))
    elif not value.startswith("/"):
        where.at("path.value").fail(f"must start with '/', not {value!r}")
    if path_type == PATH_PREFIX:
        value = value.rstrip("/")
    method = spec.get("method")
    h_where = where.at("headers")
    headers: dict[str, HeaderMatch] = {}
    for i, raw in enumerate(sequence(spec.get("headers"), h_where, max_items=16)):
        header = mapping(raw, h_where.at(i), ("type", "name", "value"), ("name", "value"))
        kind = choice(header.get("type", "Exact"), h_where.at(i).at("type"), ("Exact", PATH_REGEX))
        text = string(header["value"], h_where.at(i).at("value"), empty=True)
        name = string(header["name"], h_where.at(i).at("name")).lower()
        found = regex(text, h_where.at(i).at("value")) if kind == PATH_REGEX else None
        # The Gateway API: later entries naming the same header are ignored.
        headers.setdefault(name, HeaderMatch(name, text, found))
    return RouteMatchRule(
        path_type=path_type,
        value=value,
        pattern=pattern,
        method=None if method is None else choice(method, where.at("method"), _METHODS),
        headers=tuple(headers.values()),
        evaluable=not sequence(spec.get("queryParams"), where.at("queryParams")),
    )


_BACKEND_FIELDS = ("group", "kind", "name", "namespace", "port", "weight", "filters")


def _backends(value: object, where: Where, namespace: str) -> tuple[PoolBackend, ...]:
    backends = []
    for i, raw in enumerate(sequence(value, where, max_items=16)):
        ref = mapping(raw, where.at(i), _BACKEND_FIELDS, required=("name",))
        if ref.get("filters"):
            where.at(i).at("filters").fail("backend filters are not supported by the router")
        weight = integer(ref.get("weight", 1), where.at(i).at("weight"), minimum=0)
        if ref.get("group") != INFERENCE_GROUP or ref.get("kind") != "InferencePool":
            continue  # not the router's to send to (as Kthena)
        if weight == 0:
            continue  # the Gateway API: no traffic
        backends.append(
            PoolBackend(
                string(ref.get("namespace", namespace), where.at(i).at("namespace")),
                string(ref["name"], where.at(i).at("name")),
                weight,
            )
        )
    return tuple(backends)


def _http_rule(value: object, where: Where, index: int, namespace: str) -> HTTPRouteRule:
    spec = mapping(value, where, ("name", "matches", "filters", "backendRefs", "timeouts", "retry"))
    for unsupported in ("filters", "timeouts", "retry"):
        if spec.get(unsupported):
            where.at(unsupported).fail(
                "is not supported by the router (it would not do what it says): remove it"
            )
    m_where = where.at("matches")
    return HTTPRouteRule(
        index=index,
        name=string(spec.get("name", f"rules[{index}]"), where.at("name")),
        matches=tuple(
            _route_match(m, m_where.at(i))
            for i, m in enumerate(sequence(spec.get("matches"), m_where, max_items=64))
        ),
        backends=_backends(spec.get("backendRefs"), where.at("backendRefs"), namespace),
    )


def parse_http_route(doc: Mapping[str, Any], where: Where, order: int) -> HTTPRoute:
    meta, where, s_where, spec = read_document(
        doc, where, order, ("parentRefs", "hostnames", "rules"), required=("parentRefs",)
    )
    r_where = s_where.at("parentRefs")
    parents = tuple(
        parse_parent_ref(ref, r_where.at(i), meta.namespace)
        for i, ref in enumerate(sequence(spec["parentRefs"], r_where, max_items=32))
    )
    if not parents:
        r_where.fail("needs at least one Gateway")
    h_where = s_where.at("hostnames")
    hostnames = tuple(
        hostname_of(h, h_where.at(i))
        for i, h in enumerate(sequence(spec.get("hostnames"), h_where, max_items=16))
    )
    rules_where = s_where.at("rules")
    raw_rules = sequence(spec.get("rules") or [{}], rules_where, max_items=16)
    return HTTPRoute(
        meta=meta,
        parent_refs=parents,
        hostnames=hostnames,
        rules=tuple(
            _http_rule(r, rules_where.at(i), i, meta.namespace) for i, r in enumerate(raw_rules)
        ),
        spec=spec,
    )


def _rewrite_rule(value: object, where: Where) -> RewriteRule:
    spec = mapping(value, where, ("matches", "targets"))
    m_where = where.at("matches")
    models = []
    for i, raw in enumerate(sequence(spec.get("matches"), m_where)):
        match = mapping(raw, m_where.at(i), ("model",), required=("model",))
        model = mapping(match["model"], m_where.at(i).at("model"), ("type", "value"), ("value",))
        choice(model.get("type", "Exact"), m_where.at(i).at("model.type"), ("Exact",))
        models.append(string(model["value"], m_where.at(i).at("model.value")))
    t_where = where.at("targets")
    raw_targets = sequence(spec.get("targets"), t_where)
    if not raw_targets:
        t_where.fail("needs at least one target")
    weighted = ["weight" in mapping(t, t_where.at(i)) for i, t in enumerate(raw_targets)]
    if any(weighted) and not all(weighted):
        t_where.fail("either every target has a weight or none has")
    targets = []
    for i, raw in enumerate(raw_targets):
        target = mapping(raw, t_where.at(i), ("modelRewrite", "weight"), ("modelRewrite",))
        targets.append(
            RewriteTarget(
                string(target["modelRewrite"], t_where.at(i).at("modelRewrite")),
                integer(target.get("weight", 1), t_where.at(i).at("weight"), minimum=1),
            )
        )
    return RewriteRule(tuple(models), tuple(targets))


def parse_model_rewrite(doc: Mapping[str, Any], where: Where, order: int) -> ModelRewrite:
    meta, where, s_where, spec = read_document(
        doc, where, order, ("poolRef", "rules"), required=("poolRef", "rules")
    )
    p_where = s_where.at("poolRef")
    ref = mapping(spec["poolRef"], p_where, ("group", "kind", "name"), required=("name",))
    if ref.get("group", INFERENCE_GROUP) != INFERENCE_GROUP:
        p_where.at("group").fail(f"must be {INFERENCE_GROUP}")
    choice(ref.get("kind", "InferencePool"), p_where.at("kind"), ("InferencePool",))
    rules_where = s_where.at("rules")
    raw_rules = sequence(spec["rules"], rules_where, max_items=64)
    if not raw_rules:
        rules_where.fail("needs at least one rule")
    return ModelRewrite(
        meta=meta,
        pool=f"{meta.namespace}/{string(ref['name'], p_where.at('name'))}",
        rules=tuple(_rewrite_rule(r, rules_where.at(i)) for i, r in enumerate(raw_rules)),
        spec=spec,
    )
