"""
How the router treats traffic on both sides: the paths it serves, the deadlines it gives
clients (C{downstream}), and how it talks to pods and stops sending to failing ones
(C{upstream}, C{upstream.outlierDetection}).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kthena.config.validate import (
    Where,
    boolean,
    choice,
    duration,
    integer,
    mapping,
    positive_duration,
    sequence,
    string,
)

DEFAULT_INFERENCE_PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/rerank",
    "/v1/score",
)
"""
The POST paths proxied to pods unless C{inferencePaths} says otherwise: OpenAI's inference
APIs that vLLM and SGLang serve. Everything else (the engines' admin endpoints such as
C{/v1/load_lora_adapter}) is answered 404 before any pod sees it.
"""

UPSTREAM_CLIENTS = ("twisted", "lean")
"""The HTTP clients towards pods (C{upstream.client})."""

DOWNSTREAM_SERVERS = ("twisted", "lean")
"""The HTTP servers under the pipeline (C{downstream.server})."""

ROUTER_PATHS = frozenset({"/v1/models", "/healthz", "/readyz"})
"""Paths the router answers itself."""

_SEGMENT = re.compile(r"^[A-Za-z0-9_~\-][A-Za-z0-9_~.\-]*$")


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """
    Passive outlier detection, as Envoy's: a pod whose attempts fail
    C{consecutive_failures} times in a row (5xx answers, connection failures, timeouts,
    cut responses) is ejected for C{base_ejection_time} x the number of times it was
    ejected, at most C{max_ejection_time}; at most C{max_ejection_percent} of a model
    server's pods are ejected at once (at least one may always be).
    """

    enabled: bool = True
    consecutive_failures: int = 5
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: int = 50


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """
    How the router talks to pods.

    @ivar pool_idle_timeout: idle pooled connections are closed after this long; it must
        stay below the pods' keep-alive (uvicorn, under vLLM, closes after 5 s) or a
        request may be sent on a connection the pod is closing.
    @ivar forward_authorization: the client's C{Authorization} header goes to the pod (as
        Kthena does; needed when pods run with C{--api-key}); off, it is dropped.
    @ivar client: the HTTP client towards pods: C{twisted} (C{Agent}) or C{lean}
        (L{kthena.http.client}: C{httptools}, cheaper per request); a restart changes it.
    """

    connect_timeout: float = 5.0
    idle_timeout: float = 300.0
    max_connections_per_pod: int = 128
    pool_idle_timeout: float = 4.0
    forward_authorization: bool = True
    outlier: OutlierConfig = field(default_factory=OutlierConfig)
    client: str = "lean"


@dataclass(frozen=True, slots=True)
class DownstreamConfig:
    """
    Deadlines for clients, so that slow or stalled ones (slowloris) cannot hold
    connections: the request head must arrive whole within C{header_timeout} of its first
    byte, and the body within C{body_timeout} of the head (else 408 and the connection
    closes); a keep-alive connection with no request is closed after C{idle_timeout}.

    @ivar server: the HTTP server under the pipeline: C{twisted} (twisted.web) or C{lean}
        (L{kthena.http.server}, parsing with httptools); changed only by a restart.
    """

    header_timeout: float = 10.0
    body_timeout: float = 60.0
    idle_timeout: float = 60.0
    server: str = "lean"


def parse_outlier(value: object, where: Where) -> OutlierConfig:
    spec = mapping(
        value,
        where,
        ("enabled", "consecutiveFailures", "baseEjectionTime", "maxEjectionTime",
         "maxEjectionPercent"),
    )  # fmt: skip
    d = OutlierConfig()
    config = OutlierConfig(
        enabled=boolean(spec.get("enabled", d.enabled), where.at("enabled")),
        consecutive_failures=integer(
            spec.get("consecutiveFailures", d.consecutive_failures),
            where.at("consecutiveFailures"),
            minimum=1,
        ),
        base_ejection_time=positive_duration(
            spec.get("baseEjectionTime", d.base_ejection_time), where.at("baseEjectionTime")
        ),
        max_ejection_time=positive_duration(
            spec.get("maxEjectionTime", d.max_ejection_time), where.at("maxEjectionTime")
        ),
        max_ejection_percent=integer(
            spec.get("maxEjectionPercent", d.max_ejection_percent),
            where.at("maxEjectionPercent"),
            minimum=0,
            maximum=100,
        ),
    )
    if config.max_ejection_time < config.base_ejection_time:
        where.at("maxEjectionTime").fail("must be at least baseEjectionTime")
    return config


def parse_upstream(value: object, where: Where) -> UpstreamConfig:
    spec = mapping(
        value,
        where,
        ("connectTimeout", "idleTimeout", "maxConnectionsPerPod", "poolIdleTimeout",
         "forwardAuthorization", "outlierDetection", "client"),
    )  # fmt: skip
    d = UpstreamConfig()
    return UpstreamConfig(
        connect_timeout=duration(
            spec.get("connectTimeout", d.connect_timeout), where.at("connectTimeout")
        ),
        idle_timeout=duration(spec.get("idleTimeout", d.idle_timeout), where.at("idleTimeout")),
        max_connections_per_pod=integer(
            spec.get("maxConnectionsPerPod", d.max_connections_per_pod),
            where.at("maxConnectionsPerPod"),
            minimum=1,
        ),
        pool_idle_timeout=duration(
            spec.get("poolIdleTimeout", d.pool_idle_timeout), where.at("poolIdleTimeout")
        ),
        forward_authorization=boolean(
            spec.get("forwardAuthorization", d.forward_authorization),
            where.at("forwardAuthorization"),
        ),
        outlier=parse_outlier(spec.get("outlierDetection"), where.at("outlierDetection")),
        client=choice(spec.get("client", d.client), where.at("client"), UPSTREAM_CLIENTS),
    )


def parse_downstream(value: object, where: Where) -> DownstreamConfig:
    spec = mapping(value, where, ("headerTimeout", "bodyTimeout", "idleTimeout", "server"))
    d = DownstreamConfig()
    return DownstreamConfig(
        header_timeout=positive_duration(
            spec.get("headerTimeout", d.header_timeout), where.at("headerTimeout")
        ),
        body_timeout=positive_duration(
            spec.get("bodyTimeout", d.body_timeout), where.at("bodyTimeout")
        ),
        idle_timeout=positive_duration(
            spec.get("idleTimeout", d.idle_timeout), where.at("idleTimeout")
        ),
        server=choice(spec.get("server", d.server), where.at("server"), DOWNSTREAM_SERVERS),
    )


def parse_inference_paths(value: object, where: Where) -> frozenset[str]:
    """C{inferencePaths}: clean absolute paths, none of them the router's own."""
    if value is None:
        return frozenset(DEFAULT_INFERENCE_PATHS)
    paths = set()
    for i, raw in enumerate(sequence(value, where)):
        p_where = where.at(i)
        path = string(raw, p_where)
        segments = path.split("/")
        if segments[0] != "" or not all(_SEGMENT.match(s) for s in segments[1:]):
            p_where.fail(
                f"must be an absolute path of plain segments (letters, digits, -._~; no "
                f"empty, . or .. segments, no %-escapes), not {path!r}"
            )
        if path in ROUTER_PATHS or path.startswith("/v1/models/"):
            p_where.fail(f"{path} is answered by the router itself")
        paths.add(path)
    if not paths:
        where.fail("must list at least one path (the router would serve no inference)")
    return frozenset(paths)
