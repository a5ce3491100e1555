"""
The config's own resources and the cluster's, as the one set the datastore routes by.

The config's files are validated whole when loaded (a broken file is refused). The
cluster's objects are not the router's to refuse: one that does not parse, that names
what a file already defines, or that sends to what does not exist (yet: objects arrive
in any order; a ModelRoute's ModelServer, an HTTPRoute's or a rewrite's InferencePool)
is left out, with the reason; the others stand. A Kubernetes admission webhook
(Kthena's) keeps most of these out in the first place.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kthena.config.documents import missing_targets, parse_document
from kthena.config.resourceset import Resource, ResourceSet, resource_set
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
    kept = files.members()
    taken = {(r.kind, r.meta.key) for r in kept}
    order = len(taken)
    cluster: list[Resource] = []
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
        cluster.append(resource)
    for resource in cluster:
        missing = missing_targets(resource, taken)
        if missing:
            names = ", ".join(sorted({what for _, what in missing}))
            problems.append(
                f"kubernetes {resource.kind} {resource.meta.key}: no {names}; "
                "not routed until there is"
            )
            continue
        kept.append(resource)
    return resource_set(kept), problems
