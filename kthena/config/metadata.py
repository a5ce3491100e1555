"""
The C{metadata} every resource document carries, and the parts of a document with a
C{spec} (Kthena's and the Gateway API's kinds alike), read into L{Metadata}.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from kthena.config.resources import Metadata
from kthena.config.validate import Where, labels, mapping, string

_METADATA_FIELDS = frozenset(
    {
        "name",
        "namespace",
        "labels",
        "annotations",
        "creationTimestamp",
        "deletionTimestamp",
        "uid",
        "resourceVersion",
        "generation",
        "generateName",
        "ownerReferences",
        "finalizers",
        "managedFields",
    }
)
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def read_document(
    doc: Mapping[str, Any],
    where: Where,
    order: int,
    keys: tuple[str, ...] | None,
    required: tuple[str, ...],
) -> tuple[Metadata, Where, Where, Mapping[str, Any]]:
    """A document's metadata, where it is (named by kind and key), and its spec (with
    only C{keys}, unless C{None})."""
    meta = read_metadata(doc.get("metadata"), where.at("metadata"), order)
    where = where.named(f"{doc.get('kind')} {meta.key}")
    s_where = where.at("spec")
    return meta, where, s_where, mapping(doc.get("spec"), s_where, keys, required=required)


def read_metadata(value: object, where: Where, order: int) -> Metadata:
    meta = mapping(value, where, _METADATA_FIELDS, required=("name",))
    name = string(meta["name"], where.at("name"))
    if not _DNS_LABEL.match(name):
        where.at("name").fail(f"must be a lower-case DNS name, not {name!r}")
    namespace = string(meta.get("namespace", "default"), where.at("namespace"))
    created = _timestamp(meta.get("creationTimestamp"), where.at("creationTimestamp"))
    return Metadata(
        name=name,
        namespace=namespace,
        labels=labels(meta.get("labels"), where.at("labels")),
        annotations=labels(meta.get("annotations"), where.at("annotations")),
        created=None if created is None else _rfc3339(created),
        deleting=meta.get("deletionTimestamp") is not None,
        order=order,
        created_at=None if created is None else created.timestamp(),
    )


def _timestamp(value: object, where: Where) -> datetime | None:
    """An RFC 3339 time (YAML reads an unquoted one as a datetime already)."""
    if value is None:
        return None
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            where.fail(f"must be an RFC 3339 time (2026-01-01T00:00:00Z), not {value!r}")
    else:
        where.fail(f"must be an RFC 3339 time, not {type(value).__name__}")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # Kubernetes writes UTC
    return moment.astimezone(UTC)


def _rfc3339(moment: datetime) -> str:
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if moment.microsecond:
        text += f".{moment.microsecond:06d}".rstrip("0")
    return text + "Z"
