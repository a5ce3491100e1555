"""Builders of router resources and configs for tests."""

from __future__ import annotations

import copy
from typing import Any

from kthena.config.resources import KTHENA_API

Doc = dict[str, Any]


def route(name: str, spec: Doc, namespace: str = "default", created: str | None = None) -> Doc:
    meta: Doc = {"name": name, "namespace": namespace}
    if created:
        meta["creationTimestamp"] = created
    return {"apiVersion": KTHENA_API, "kind": "ModelRoute", "metadata": meta, "spec": spec}


def server(
    name: str,
    labels: dict[str, str],
    model: str | None = None,
    engine: str = "vLLM",
    port: int = 8000,
    **spec: Any,
) -> Doc:
    body: Doc = {
        "inferenceEngine": engine,
        "workloadSelector": {"matchLabels": labels},
        "workloadPort": {"port": port},
        **spec,
    }
    if model is not None:
        body["model"] = model
    return {
        "apiVersion": KTHENA_API,
        "kind": "ModelServer",
        "metadata": {"name": name, "namespace": "default"},
        "spec": body,
    }


def pod(
    name: str,
    ip: str,
    labels: dict[str, str],
    *,
    phase: str = "Running",
    ready: bool = True,
    port: int | None = None,
    deleting: bool = False,
    namespace: str = "default",
) -> Doc:
    meta: Doc = {"name": name, "namespace": namespace, "labels": labels}
    if port is not None:
        meta["annotations"] = {"kthena.io/workload-port": str(port)}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "status": {
            "podIP": ip,
            "phase": phase,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def pd_server(name: str, app: str, model: str, **spec: Any) -> Doc:
    """A ModelServer with Kthena's pdGroup: pods labelled C{app}, C{role: prefill|decode}
    and C{group: <value>} (the group key)."""
    selector = {
        "matchLabels": {"app": app},
        "pdGroup": {
            "groupKey": "group",
            "prefillLabels": {"role": "prefill"},
            "decodeLabels": {"role": "decode"},
        },
    }
    return server(name, {"app": app}, model=model, workloadSelector=selector, **spec)


def simple_route(name: str, model: str, *targets: str, **spec: Any) -> Doc:
    return route(
        name,
        {
            "modelName": model,
            "rules": [
                {"name": "default", "targetModels": [{"modelServerName": t} for t in targets]}
            ],
            **spec,
        },
    )


def inference_pool(name: str, labels: dict[str, str], *ports: int, **meta: Any) -> Doc:
    """An InferencePool (C{inference.networking.k8s.io/v1}) selecting C{labels}."""
    return {
        "apiVersion": "inference.networking.k8s.io/v1",
        "kind": "InferencePool",
        "metadata": {"name": name, "namespace": "default", **meta},
        "spec": {
            "selector": {"matchLabels": labels},
            "targetPorts": [{"number": p} for p in ports or (8000,)],
        },
    }


def pool_ref(name: str, weight: int | None = None) -> Doc:
    """An HTTPRoute backendRef to an InferencePool."""
    ref: Doc = {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": name}
    if weight is not None:
        ref["weight"] = weight
    return ref


def http_route(
    name: str,
    gateway: str,
    rules: list[Doc],
    hostnames: list[str] | None = None,
    created: str | None = None,
) -> Doc:
    """An HTTPRoute (C{gateway.networking.k8s.io/v1}) attached to Gateway C{gateway}."""
    meta: Doc = {"name": name, "namespace": "default"}
    if created:
        meta["creationTimestamp"] = created
    spec: Doc = {"parentRefs": [{"name": gateway}], "rules": rules}
    if hostnames is not None:
        spec["hostnames"] = hostnames
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": meta, "spec": spec}  # fmt: skip


def model_rewrite(name: str, pool: str, rules: list[Doc], created: str | None = None) -> Doc:
    """An InferenceModelRewrite (C{inference.networking.x-k8s.io/v1alpha2}) of C{pool}."""
    meta: Doc = {"name": name, "namespace": "default"}
    if created:
        meta["creationTimestamp"] = created
    return {
        "apiVersion": "inference.networking.x-k8s.io/v1alpha2",
        "kind": "InferenceModelRewrite",
        "metadata": meta,
        "spec": {"poolRef": {"name": pool}, "rules": rules},
    }


def in_namespace(namespace: str, doc: Doc) -> Doc:
    """A copy of C{doc} in another namespace."""
    doc = copy.deepcopy(doc)
    doc["metadata"]["namespace"] = namespace
    return doc
