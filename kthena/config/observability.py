"""
The C{observability} section, exactly as the observability specification writes it
(C{metrics}, C{accessLog}, C{debug}), with what the specification leaves open: the
access log's sampling and buffer, the debug endpoints' allow-list and token, and
current Kthena's destination labels.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

from kthena.config.validate import (
    Where,
    boolean,
    choice,
    integer,
    mapping,
    number,
    sequence,
    string,
)


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """
    @ivar destination_labels: current Kthena's C{model_route}, C{backend_type},
        C{backend_name}, C{upstream_model} on the request, duration, token and
        active-upstream families, beyond the spec's label sets (C{destinationLabels}).
    """

    enabled: bool = True
    port: int = 9090
    path: str = "/metrics"
    destination_labels: bool = False


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    """
    The access log (C{observability.accessLog}).

    @ivar output: C{stdout}, C{stderr} or a file path (reopened on SIGUSR1, for logrotate).
    @ivar sample_rate: the share (0..1) of successful requests logged; errors always are.
    @ivar buffer_size: lines waiting for the writer thread; past that, lines are dropped
        (and counted) rather than slowing the proxy.
    """

    enabled: bool = True
    format: str = "json"
    output: str = "stdout"
    sample_rate: float = 1.0
    buffer_size: int = 10000


Network = ipaddress.IPv4Network | ipaddress.IPv6Network

LOOPBACK_NETWORKS: tuple[Network, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
MIN_DEBUG_TOKEN = 16
_BEARER_TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")  # RFC 6750 b64token


@dataclass(frozen=True, slots=True)
class DebugConfig:
    """
    The debug endpoints (C{observability.debug}).

    A request is answered when its peer address is in C{allow} (an empty list means any
    address, accepted only together with a token) and, when C{token} is set, it carries
    C{Authorization: Bearer <token>}; anything else gets 403.

    @ivar allow: networks whose clients may ask; loopback only by default.
    @ivar token: the bearer token asked of every request, when set (never logged or shown).
    """

    enabled: bool = True
    port: int = 9090
    allow: tuple[Network, ...] = LOOPBACK_NETWORKS
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class ObservabilityConfig:
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    access_log: AccessLogConfig = field(default_factory=AccessLogConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


def parse_observability(value: object, where: Where) -> ObservabilityConfig:
    spec = mapping(value, where, ("metrics", "accessLog", "debug"))
    m_where, a_where, d_where = where.at("metrics"), where.at("accessLog"), where.at("debug")
    m = mapping(spec.get("metrics"), m_where, ("enabled", "port", "path", "destinationLabels"))
    a = mapping(
        spec.get("accessLog"),
        a_where,
        ("enabled", "format", "output", "sampleRate", "bufferSize"),
    )
    path = string(m.get("path", "/metrics"), m_where.at("path"))
    if not path.startswith("/"):
        m_where.at("path").fail(f"must start with '/', not {path!r}")
    a_default = AccessLogConfig()
    sample_rate = number(
        a.get("sampleRate", a_default.sample_rate), a_where.at("sampleRate"), minimum=0
    )
    if not sample_rate <= 1:  # NaN too
        a_where.at("sampleRate").fail(f"must be a share from 0 to 1, not {a['sampleRate']}")
    return ObservabilityConfig(
        metrics=MetricsConfig(
            enabled=boolean(m.get("enabled", True), m_where.at("enabled")),
            port=integer(m.get("port", 9090), m_where.at("port"), minimum=0, maximum=65535),
            path=path,
            destination_labels=boolean(
                m.get("destinationLabels", False), m_where.at("destinationLabels")
            ),
        ),
        access_log=AccessLogConfig(
            enabled=boolean(a.get("enabled", True), a_where.at("enabled")),
            format=choice(a.get("format", "json"), a_where.at("format"), ("json", "text")),
            output=string(a.get("output", "stdout"), a_where.at("output")),
            sample_rate=sample_rate,
            buffer_size=integer(
                a.get("bufferSize", a_default.buffer_size), a_where.at("bufferSize"), minimum=1
            ),
        ),
        debug=_debug(spec.get("debug"), d_where),
    )


def _network(value: object, where: Where) -> Network:
    text = string(value, where)
    try:
        return ipaddress.ip_network(text)
    except ValueError as e:
        try:
            meant = ipaddress.ip_network(text, strict=False)
        except ValueError:
            where.fail(f"must be an IP address or network (CIDR), not {text!r}: {e}")
        where.fail(f"{text!r} has host bits set; did you mean {meant}?")


def _debug(value: object, where: Where) -> DebugConfig:
    spec = mapping(value, where, ("enabled", "port", "allow", "token"))
    token = spec.get("token")
    if token is not None:
        token = string(token, where.at("token"))
        if not _BEARER_TOKEN.match(token):
            where.at("token").fail(
                "must be a bearer token (letters, digits and -._~+/, then optional =)"
            )
        if len(token) < MIN_DEBUG_TOKEN:
            where.at("token").fail(f"must be at least {MIN_DEBUG_TOKEN} characters long")
    allow = LOOPBACK_NETWORKS
    if "allow" in spec:
        a_where = where.at("allow")
        if spec["allow"] is None:
            a_where.fail("must be a list of networks (an empty list means any address)")
        allow = tuple(
            _network(v, a_where.at(i)) for i, v in enumerate(sequence(spec["allow"], a_where))
        )
        if not allow and token is None:
            a_where.fail(
                "an empty list lets every address in, which needs a token; to open the "
                "debug endpoints without one, list 0.0.0.0/0 and ::/0"
            )
    return DebugConfig(
        enabled=boolean(spec.get("enabled", True), where.at("enabled")),
        port=integer(spec.get("port", 9090), where.at("port"), minimum=0, maximum=65535),
        allow=allow,
        token=token,
    )
