"""
Gateway API in the config: a ModelRoute's C{parentRefs}, and the C{gateway} section,
which makes the proxy listener a listener of a Gateway, so that ModelRoutes with
C{parentRefs} serve its requests as Kthena's router serves them
(L{kthena.config.resources.ModelRoute.attaches}), and HTTPRoutes attached to it send
them to their InferencePools.

    gateway:
      name: kthena-system/default   # the Gateway, namespace/name
      listener: http                # the listener's name (a parentRef's sectionName)
      port: 8080                    # the listener's port (a parentRef's port)

Without it requests come through no Gateway: routes with C{parentRefs}, and every
HTTPRoute, serve none of them (404 C{route_not_found}, as in Kthena).

Gateway objects (C{gateway.networking.k8s.io/v1}, from files or the cluster) and the
C{gatewayAPI} section, with which the router opens a port for each of their HTTP
listeners (L{listeners_by_port}); the Gateway API's hostnames and how a host is matched
against them (L{host_rank}), for Gateway listeners and HTTPRoutes alike.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kthena.config.metadata import read_document
from kthena.config.resources import GATEWAY_GROUP, GatewayListener, Metadata, ParentRef
from kthena.config.validate import (
    Where,
    boolean,
    choice,
    integer,
    mapping,
    optional_string,
    sequence,
    string,
)

_HOSTNAME = re.compile(r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def hostname_of(value: object, where: Where) -> str:
    """A Gateway API C{Hostname}: a DNS name, or C{*.} and one (no IP, no bare C{*})."""
    name = string(value, where).lower().rstrip(".")
    if not _HOSTNAME.match(name) or len(name) > 253:
        where.fail(f"must be a DNS name or a wildcard such as *.example.com, not {value!r}")
    return name


def parse_gateway(value: object, where: Where) -> GatewayListener | None:
    if value is None:
        return None
    spec = mapping(value, where, ("name", "listener", "port"), required=("name",))
    key = string(spec["name"], where.at("name"))
    namespace, _, name = key.rpartition("/")
    if not namespace or not name:
        where.at("name").fail(f"must be namespace/name, not {key!r}")
    port = spec.get("port")
    return GatewayListener(
        namespace,
        name,
        optional_string(spec.get("listener"), where.at("listener")),
        None if port is None else integer(port, where.at("port"), minimum=1, maximum=65535),
    )


def parse_parent_ref(value: object, where: Where, namespace: str) -> ParentRef:
    """A Gateway API C{ParentReference}; the namespace defaults to the route's."""
    ref = mapping(
        value, where, ("group", "kind", "namespace", "name", "sectionName", "port"), ("name",)
    )
    group = ref.get("group", GATEWAY_GROUP)
    kind = ref.get("kind", "Gateway")
    port = ref.get("port")
    return ParentRef(
        namespace=string(ref.get("namespace", namespace), where.at("namespace")),
        name=string(ref["name"], where.at("name")),
        section_name=optional_string(ref.get("sectionName"), where.at("sectionName")),
        gateway=group == GATEWAY_GROUP and kind == "Gateway",
        port=None if port is None else integer(port, where.at("port"), minimum=1, maximum=65535),
    )


GATEWAY_CLASS = "kthena-router"
"""The C{gatewayClassName} whose Gateways the router listens for (Kthena's)."""


@dataclass(frozen=True, slots=True)
class GatewayAPIConfig:
    """
    The C{gatewayAPI} section: the router opens a port for each HTTP listener of the
    Gateways of its class (from the config's files or the cluster), as Kthena's router
    does, and requests through it come through that listener.

        gatewayAPI:
          gatewayClassName: kthena-router   # the Gateways it serves
          interface: 0.0.0.0                # where their ports open ("": every one)

    The section's presence turns it on.
    """

    enabled: bool = False
    class_name: str = GATEWAY_CLASS
    interface: str = ""


def parse_gateway_api(value: object, where: Where) -> GatewayAPIConfig:
    if value is None:
        return GatewayAPIConfig()
    spec = mapping(value, where, ("enabled", "gatewayClassName", "interface"))
    return GatewayAPIConfig(
        enabled=boolean(spec.get("enabled", True), where.at("enabled")),
        class_name=string(
            spec.get("gatewayClassName", GATEWAY_CLASS), where.at("gatewayClassName")
        ),
        interface=string(spec.get("interface", ""), where.at("interface"), empty=True),
    )


@dataclass(frozen=True, slots=True)
class Listener:
    """
    One of a Gateway's C{listeners}: C{hostname} C{None} takes any host.

    @ivar routes_from: the namespaces whose HTTPRoutes may attach (C{allowedRoutes}):
        C{Same} (the Gateway API's default), C{All}, or C{None} (a namespace selector,
        which the router cannot judge without reading Namespaces, or C{kinds} without
        HTTPRoute).
    """

    name: str
    port: int
    protocol: str
    hostname: str | None
    routes_from: str = "Same"


def _routes_from(value: object, where: Where) -> str:
    """A listener's C{allowedRoutes} as L{Listener.routes_from}."""
    allowed = mapping(value, where)
    k_where = where.at("kinds")
    kinds = [mapping(k, k_where.at(i), ("group", "kind"), ("kind",))
             for i, k in enumerate(sequence(allowed.get("kinds"), k_where))]  # fmt: skip
    if kinds and not any(
        k["kind"] == "HTTPRoute" and k.get("group", GATEWAY_GROUP) == GATEWAY_GROUP for k in kinds
    ):
        return "None"
    n_where = where.at("namespaces")
    namespaces = mapping(allowed.get("namespaces"), n_where, ("from", "selector"))
    found = choice(namespaces.get("from", "Same"), n_where.at("from"), ("Same", "All", "Selector"))
    return "None" if found == "Selector" else found


@dataclass(frozen=True, slots=True)
class Gateway:
    """A C{gateway.networking.k8s.io/v1} Gateway: its class and its listeners."""

    meta: Metadata
    class_name: str
    listeners: tuple[Listener, ...]
    spec: Mapping[str, Any] = field(repr=False)

    kind = "Gateway"


def parse_gateway_document(doc: Mapping[str, Any], where: Where, order: int) -> Gateway:
    # Fields beyond these (addresses, infrastructure, TLS) are the Gateway API's to add:
    # read past, not refused.
    meta, where, s_where, spec = read_document(
        doc, where, order, None, required=("gatewayClassName", "listeners")
    )
    l_where = s_where.at("listeners")
    raw = sequence(spec["listeners"], l_where, max_items=64)
    if not raw:
        l_where.fail("needs at least one listener")
    listeners = []
    for i, item in enumerate(raw):
        at = l_where.at(i)
        listener = mapping(item, at, None, required=("name", "port", "protocol"))
        hostname = listener.get("hostname")
        listeners.append(
            Listener(
                name=string(listener["name"], at.at("name")),
                port=integer(listener["port"], at.at("port"), minimum=1, maximum=65535),
                protocol=string(listener["protocol"], at.at("protocol")),
                hostname=None if hostname is None else hostname_of(hostname, at.at("hostname")),
                routes_from=_routes_from(listener.get("allowedRoutes"), at.at("allowedRoutes")),
            )
        )
    names = [listener.name for listener in listeners]
    if len(set(names)) != len(names):
        l_where.fail("names a listener twice")
    return Gateway(
        meta, string(spec["gatewayClassName"], s_where.at("gatewayClassName")),
        tuple(listeners), spec,
    )  # fmt: skip


def normalize_host(host: str) -> str:
    """The Host header without its port, brackets, trailing dot or upper case."""
    host = host.strip()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host[1:]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".").lower()


def host_rank(hostnames: Sequence[str], host: str) -> tuple[int, int] | None:
    """How specifically C{hostnames} take C{host} (normalized); C{None}: they do not."""
    if not hostnames:
        return (0, 0)
    best: tuple[int, int] | None = None
    for pattern in hostnames:
        suffix = pattern[1:]  # a wildcard's ".example.com"
        if pattern == host:
            rank = (2, len(pattern))
        elif pattern[0] == "*" and host.endswith(suffix) and len(host) > len(suffix):
            rank = (1, len(suffix))
        else:
            continue
        if best is None or rank > best:
            best = rank
    return best


@dataclass(frozen=True, slots=True)
class PortListeners:
    """
    The Gateway listeners on one port, and which takes a request by its host: an exact
    hostname, then the longest wildcard (C{*.example.com} takes C{a.example.com}, not
    C{example.com}), then one without a hostname (Kthena's order).
    """

    number: int
    listeners: tuple[tuple[GatewayListener, str | None], ...]

    def resolve(self, host: str) -> GatewayListener | None:
        """The listener that takes C{host} (a Host header); C{None}: none does."""
        host = normalize_host(host)
        best: tuple[tuple[int, int], GatewayListener] | None = None
        for via, hostname in self.listeners:
            rank = host_rank((hostname,) if hostname is not None else (), host)
            if rank is not None and (best is None or rank > best[0]):
                best = (rank, via)
        return best[1] if best is not None else None


def listeners_by_port(gateways: tuple[Gateway, ...], class_name: str) -> dict[int, PortListeners]:
    """The HTTP listeners of the Gateways of C{class_name}, by port (others are not the
    router's: HTTPS and TLS need certificates it does not read)."""
    ports: dict[int, list[tuple[GatewayListener, str | None]]] = {}
    for gateway in gateways:
        if gateway.class_name != class_name:
            continue
        for listener in gateway.listeners:
            if listener.protocol != "HTTP":
                continue
            via = GatewayListener(
                gateway.meta.namespace,
                gateway.meta.name,
                listener.name,
                listener.port,
                listener.routes_from,
            )
            ports.setdefault(listener.port, []).append((via, listener.hostname))
    return {port: PortListeners(port, tuple(found)) for port, found in sorted(ports.items())}
