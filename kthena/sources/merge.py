"""
The config's own resources and the cluster's, as the one set the datastore routes by.

The config's files are validated whole when loaded (a broken file is refused). The
cluster's objects are not the router's to refuse: one that does not parse, that names
what a file already defines, or whose route targets a ModelServer that does not exist
(yet: objects arrive in any order) is left out, with the reason; the others stand. A
Kubernetes admission webhook (Kthena's) keeps most of these out in the first place.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kthena.config.documents import parse_document
from kthena.config.resources import ModelRoute, ModelServer, Pod, ResourceSet
from kthena.config.validate import ConfigError, Where


def with_cluster(
    files: ResourceSet, objects: Iterable[dict[str, Any]]
) -> tuple[ResourceSet, list[str]]:
    """
    @param objects: the cluster's objects as the API gave them (C{apiVersion}, C{kind},
        C{metadata}, C{spec}, C{status}).
    @return: the merged set, and why each object left out was.
    """
    problems: list[str] = []
    routes = list(files.routes)
    servers = list(files.servers)
    pods = list(files.pods)
    taken: set[tuple[str, str]] = set()
    for kept in (routes, servers, pods):
        taken.update((r.kind, r.meta.key) for r in kept)
    order = len(taken)
    cluster_routes: list[ModelRoute] = []
    for item in objects:
        meta = item.get("metadata") or {}
        name = f"{item.get('kind')} {meta.get('namespace') or 'default'}/{meta.get('name')}"
        order += 1
        try:
            resource = parse_document(item, Where(f"kubernetes {name}"), order)
        except ConfigError as error:
            problems.append(str(error))
            continue
        key = (resource.kind, resource.meta.key)
        if key in taken:
            problems.append(f"kubernetes {name}: the config's files define it too; theirs stands")
            continue
        taken.add(key)
        if isinstance(resource, ModelRoute):
            cluster_routes.append(resource)
        elif isinstance(resource, ModelServer):
            servers.append(resource)
        elif isinstance(resource, Pod):
            pods.append(resource)
    server_keys = {s.meta.key for s in servers}
    for route in cluster_routes:
        missing = [
            t.model_server_name
            for rule in route.rules
            for t in rule.targets
            if f"{route.meta.namespace}/{t.model_server_name}" not in server_keys
        ]
        if missing:
            problems.append(
                f"kubernetes ModelRoute {route.meta.key}: no ModelServer "
                f"{', '.join(sorted(set(missing)))} in namespace {route.meta.namespace}; "
                "not routed until there is"
            )
            continue
        routes.append(route)
    return ResourceSet(tuple(routes), tuple(servers), tuple(pods)), problems
