"""
Reading resource documents (C{ModelRoute}, C{ModelServer}, C{Pod}; the Inference
Extension's, L{kthena.config.inference_documents}) into their types
(L{kthena.config.resources}): everything Kthena's CRD schema and webhook check, and what
its router would only discover at request time (half-weighted targets, bad regexes,
targets naming a missing server), with errors that name the file, the document and the
field.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kthena.config.gateway import parse_gateway_document, parse_parent_ref
from kthena.config.inference import (
    GATEWAY_API,
    INFERENCE_API,
    REWRITE_API,
    HTTPRoute,
    ModelRewrite,
)
from kthena.config.inference_documents import (
    parse_http_route,
    parse_inference_pool,
    parse_model_rewrite,
)
from kthena.config.limits import parse_rate_limit
from kthena.config.metadata import read_document, read_metadata
from kthena.config.resources import (
    DEFAULT_ENGINE_PORTS,
    ENGINES,
    KTHENA_API,
    KV_CONNECTORS,
    PORT_ANNOTATION,
    ModelMatch,
    ModelRoute,
    ModelServer,
    PDGroup,
    PDPolicy,
    Pod,
    Retry,
    Rule,
    StringMatch,
    TargetModel,
)
from kthena.config.resourceset import Resource, ResourceSet, resource_set
from kthena.config.validate import (
    Where,
    choice,
    duration,
    integer,
    mapping,
    number,
    optional_string,
    regex,
    selector,
    sequence,
    string,
)


def _string_match(value: object, where: Where) -> StringMatch:
    spec = mapping(value, where, ("exact", "prefix", "regex"))
    if not spec:  # Kthena: a StringMatch with no matcher set matches everything
        return StringMatch("any", "")
    if len(spec) != 1:
        where.fail("must set one of exact, prefix, regex (or none, to match anything)")
    ((kind, raw),) = spec.items()
    if kind == "regex":
        return StringMatch(kind, str(raw), regex(raw, where.at(kind)))
    return StringMatch(kind, string(raw, where.at(kind), empty=True))


def _model_match(value: object, where: Where) -> ModelMatch | None:
    if value is None:
        return None
    spec = mapping(value, where, ("headers", "uri", "body"))
    headers = tuple(
        (string(name, where.at("headers")).lower(), _string_match(m, where.at("headers").at(name)))
        for name, m in mapping(spec.get("headers"), where.at("headers")).items()
    )
    uri = None if spec.get("uri") is None else _string_match(spec["uri"], where.at("uri"))
    body = mapping(spec.get("body"), where.at("body"), ("model",))
    body_model = optional_string(body.get("model"), where.at("body").at("model"))
    return ModelMatch(headers, uri, body_model)


def _rule(value: object, where: Where) -> Rule:
    spec = mapping(value, where, ("name", "modelMatch", "targetModels"), required=("targetModels",))
    targets_where = where.at("targetModels")
    raw_targets = sequence(spec["targetModels"], targets_where, max_items=16)
    if not raw_targets:
        targets_where.fail("needs at least one target")
    targets: list[TargetModel] = []
    for i, raw in enumerate(raw_targets):
        t_where = targets_where.at(i)
        target = mapping(raw, t_where, ("modelServerName", "weight"), required=("modelServerName",))
        weight = target.get("weight")
        targets.append(
            TargetModel(
                string(target["modelServerName"], t_where.at("modelServerName")),
                None
                if weight is None
                else integer(weight, t_where.at("weight"), minimum=0, maximum=100),
            )
        )
    weighted = {t.weight is not None for t in targets}
    if len(weighted) > 1:
        targets_where.fail("weight must be set on every target or on none")
    if weighted == {True} and sum(t.weight or 0 for t in targets) == 0:
        targets_where.fail("weights add up to 0, so no target could ever be chosen")
    return Rule(
        name=string(spec.get("name", ""), where.at("name"), empty=True),
        match=_model_match(spec.get("modelMatch"), where.at("modelMatch")),
        targets=tuple(targets),
    )


def parse_model_route(doc: Mapping[str, Any], where: Where, order: int) -> ModelRoute:
    meta, where, s_where, spec = read_document(
        doc,
        where,
        order,
        ("modelName", "loraAdapters", "parentRefs", "rules", "rateLimit", "pdPolicy"),
        required=("rules",),
    )
    model_name = string(spec.get("modelName", ""), s_where.at("modelName"), empty=True)
    loras = tuple(
        string(x, s_where.at("loraAdapters").at(i))
        for i, x in enumerate(
            sequence(spec.get("loraAdapters"), s_where.at("loraAdapters"), max_items=10)
        )
    )
    if not model_name and not loras:
        s_where.fail("modelName and loraAdapters cannot both be empty")
    r_where = s_where.at("parentRefs")
    parents = tuple(
        parse_parent_ref(ref, r_where.at(i), meta.namespace)
        for i, ref in enumerate(sequence(spec.get("parentRefs"), r_where, max_items=32))
    )
    raw_rules = sequence(spec["rules"], s_where.at("rules"), max_items=16)
    if not raw_rules:
        s_where.at("rules").fail("needs at least one rule")
    return ModelRoute(
        meta=meta,
        model_name=model_name,
        lora_adapters=loras,
        rules=tuple(_rule(r, s_where.at("rules").at(i)) for i, r in enumerate(raw_rules)),
        rate_limit=parse_rate_limit(spec.get("rateLimit"), s_where.at("rateLimit")),
        spec=spec,
        pd_policy=_pd_policy(spec.get("pdPolicy"), s_where.at("pdPolicy")),
        parent_refs=parents,
    )


_PD_POLICY = ("decodeOnlyBelowTokens", "decodeOnlyPrefixHit")


def _pd_policy(value: object, where: Where) -> PDPolicy | None:
    """C{pdPolicy} (ours): short prompts, or prompts a decode pod mostly holds already,
    skip the prefill leg."""
    if value is None:
        return None
    spec = mapping(value, where, _PD_POLICY)
    if not spec:
        where.fail(f"names none of {', '.join(_PD_POLICY)}")
    below = spec.get("decodeOnlyBelowTokens")
    hit = spec.get("decodeOnlyPrefixHit")
    h_where = where.at("decodeOnlyPrefixHit")
    if hit is not None and not 0 < number(hit, h_where) <= 1:
        h_where.fail(f"must be a share of the prompt, above 0 and at most 1, not {hit}")
    return PDPolicy(
        below_tokens=None
        if below is None
        else integer(below, where.at("decodeOnlyBelowTokens"), minimum=1),
        prefix_hit=None if hit is None else float(hit),
    )


def _pd_group(value: object, where: Where) -> PDGroup | None:
    if value is None:
        return None
    group = mapping(
        value,
        where,
        ("groupKey", "prefillLabels", "decodeLabels"),
        required=("groupKey", "prefillLabels", "decodeLabels"),
    )
    return PDGroup(
        group_key=string(group["groupKey"], where.at("groupKey")),
        prefill_labels=selector(group["prefillLabels"], where.at("prefillLabels")),
        decode_labels=selector(group["decodeLabels"], where.at("decodeLabels")),
    )


def _retry(value: object, where: Where) -> Retry | None:
    if value is None:
        return None
    raw = mapping(value, where, ("attempts", "retryInterval"))
    return Retry(
        attempts=integer(raw.get("attempts", 0), where.at("attempts"), minimum=0, maximum=100),
        interval=duration(raw.get("retryInterval", "100ms"), where.at("retryInterval")),
    )


def parse_model_server(doc: Mapping[str, Any], where: Where, order: int) -> ModelServer:
    meta, where, s_where, spec = read_document(
        doc,
        where,
        order,
        ("model", "inferenceEngine", "workloadSelector", "workloadPort", "trafficPolicy",
         "kvConnector"),
        required=("inferenceEngine", "workloadSelector"),
    )  # fmt: skip
    engine = choice(spec["inferenceEngine"], s_where.at("inferenceEngine"), ENGINES)
    sel_where = s_where.at("workloadSelector")
    workload = mapping(spec["workloadSelector"], sel_where, ("matchLabels", "pdGroup"))
    selector_labels = selector(workload.get("matchLabels"), sel_where.at("matchLabels"))
    p_where = s_where.at("workloadPort")
    port_spec = mapping(spec.get("workloadPort"), p_where, ("port", "protocol"))
    port = port_spec.get("port", DEFAULT_ENGINE_PORTS[engine])
    t_where = s_where.at("trafficPolicy")
    policy = mapping(spec.get("trafficPolicy"), t_where, ("timeout", "retry"))
    timeout = policy.get("timeout")
    kv_where = s_where.at("kvConnector")
    kv = mapping(spec.get("kvConnector"), kv_where, ("type", "blockSize", "bytesPerToken"))
    per_token = kv.get("bytesPerToken")
    model = spec.get("model")
    return ModelServer(
        meta=meta,
        model=None if model is None else string(model, s_where.at("model")),
        engine=engine,
        match_labels=selector_labels,
        pd_group=_pd_group(workload.get("pdGroup"), sel_where.at("pdGroup")),
        port=integer(port, p_where.at("port"), minimum=1, maximum=65535),
        protocol=choice(
            port_spec.get("protocol", "http"), p_where.at("protocol"), ("http", "https")
        ),
        timeout=None if timeout is None else duration(timeout, t_where.at("timeout")),
        retry=_retry(policy.get("retry"), t_where.at("retry")),
        kv_connector=None
        if spec.get("kvConnector") is None
        else choice(kv.get("type", "http"), kv_where.at("type"), KV_CONNECTORS),
        spec=spec,
        kv_block_size=integer(kv.get("blockSize", 16), kv_where.at("blockSize"), minimum=1),
        kv_bytes_per_token=None
        if per_token is None
        else integer(per_token, kv_where.at("bytesPerToken"), minimum=1),
    )


def parse_pod(doc: Mapping[str, Any], where: Where, order: int) -> Pod:
    meta = read_metadata(doc.get("metadata"), where.at("metadata"), order)
    where = where.named(f"Pod {meta.key}")
    # Accepted as is (pods come from outside); only the debug views read it (nodeName).
    pod_spec = mapping(doc.get("spec"), where.at("spec"))
    st_where = where.at("status")
    status = mapping(doc.get("status"), st_where)
    ip = status.get("podIP")
    ready = False
    for i, cond in enumerate(sequence(status.get("conditions"), st_where.at("conditions"))):
        c_where = st_where.at("conditions").at(i)
        c = mapping(cond, c_where)
        if c.get("type") == "Ready":
            ready = string(c.get("status"), c_where.at("status")) == "True"
    port_text = meta.annotations.get(PORT_ANNOTATION)
    port = None
    if port_text is not None:
        a_where = where.at("metadata").at("annotations").at(PORT_ANNOTATION)
        if not port_text.isdigit():
            a_where.fail(f"must be a port number, not {port_text!r}")
        port = integer(int(port_text), a_where, minimum=1, maximum=65535)
    if ip is not None:
        ip = string(ip, st_where.at("podIP"))
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            st_where.at("podIP").fail(f"must be an IP address, not {ip!r}")
    return Pod(
        meta=meta,
        ip=ip,
        phase=string(status.get("phase", "Pending"), st_where.at("phase")),
        ready=ready,
        port=port,
        status=status,
        spec=pod_spec,
    )


_PARSERS: dict[tuple[str, str], Callable[[Mapping[str, Any], Where, int], Resource]] = {
    (KTHENA_API, "ModelRoute"): parse_model_route,
    (KTHENA_API, "ModelServer"): parse_model_server,
    ("v1", "Pod"): parse_pod,
    (INFERENCE_API, "InferencePool"): parse_inference_pool,
    (GATEWAY_API, "HTTPRoute"): parse_http_route,
    (REWRITE_API, "InferenceModelRewrite"): parse_model_rewrite,
    (GATEWAY_API, "Gateway"): parse_gateway_document,
}


def parse_document(doc: object, where: Where, order: int) -> Resource:
    """One resource document, by its apiVersion and kind."""
    body = mapping(doc, where)
    api = body.get("apiVersion")
    kind = body.get("kind")
    parser = _PARSERS.get((api, kind))  # type: ignore[arg-type]
    if parser is None:
        known = ", ".join(f"{k} ({a})" for a, k in _PARSERS)
        where.fail(f"unsupported apiVersion/kind {api}/{kind}; supported: {known}")
    mapping(body, where, ("apiVersion", "kind", "metadata", "spec", "status"))
    return parser(body, where, order)


def missing_targets(resource: Resource, present: set[tuple[str, str]]) -> list[tuple[str, str]]:
    """
    What C{resource} sends to that is not in C{present} (C{(kind, namespace/name)}
    pairs): each as the field that names it and what it names.
    """
    missing = []
    if isinstance(resource, ModelRoute):
        for i, rule in enumerate(resource.rules):
            for j, target in enumerate(rule.targets):
                key = f"{resource.meta.namespace}/{target.model_server_name}"
                if ("ModelServer", key) not in present:
                    missing.append((f"spec.rules[{i}].targetModels[{j}].modelServerName",
                                    _named("ModelServer", key)))  # fmt: skip
    elif isinstance(resource, HTTPRoute):
        for http_rule in resource.rules:
            for backend in http_rule.backends:
                if ("InferencePool", backend.key) not in present:
                    missing.append((f"spec.rules[{http_rule.index}].backendRefs",
                                    _named("InferencePool", backend.key)))  # fmt: skip
    elif isinstance(resource, ModelRewrite) and ("InferencePool", resource.pool) not in present:
        missing.append(("spec.poolRef", _named("InferencePool", resource.pool)))
    return missing


def _named(kind: str, key: str) -> str:
    namespace, _, name = key.partition("/")
    return f"{kind} {name!r} in namespace {namespace!r}"


def build_resource_set(resources: Iterable[tuple[Resource, Where]]) -> ResourceSet:
    """
    Check names are unique per kind and everything a route or rewrite sends to exists
    (in its namespace, unless it names another).

    @raise ConfigError: naming the offending document.
    """
    seen: dict[tuple[str, str], Where] = {}
    kept: list[Resource] = []
    for resource, found_at in resources:
        where = found_at.named(f"{resource.kind} {resource.meta.key}")
        key = (resource.kind, resource.meta.key)
        if key in seen:
            where.fail(
                f"{resource.kind} {resource.meta.key} is defined twice (first in "
                f"{seen[key].describe()})"
            )
        seen[key] = where
        kept.append(resource)
    present = set(seen)
    for resource in kept:
        for field, what in missing_targets(resource, present):
            seen[(resource.kind, resource.meta.key)].at(field).fail(f"no {what}")
    return resource_set(kept)
