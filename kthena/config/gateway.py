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
"""

from __future__ import annotations

from kthena.config.resources import GATEWAY_GROUP, GatewayListener, ParentRef
from kthena.config.validate import Where, integer, mapping, optional_string, string


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
