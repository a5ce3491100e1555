"""
C{/debug/config_dump/*}: the resources as Kthena writes them (its shapes and camelCase
keys, so that Kthena's tooling reads them), secrets redacted: ModelRoutes, ModelServers
and Pods, and (as Kthena's debug server) Gateways, HTTPRoutes, InferencePools, and ours,
InferenceModelRewrites, each as its name, namespace and spec.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kthena.config.resources import ModelServer, Pod
from kthena.observability.debug.common import DebugError, Views, _leaf, _timestamp, _unique
from kthena.pods import PodEndpoint
from kthena.redact import redact

SPEC_KINDS = {
    "modelroutes": ("routes", "ModelRoute"),
    "gateways": ("gateways", "Gateway"),
    "httproutes": ("httproutes", "HTTPRoute"),
    "inferencepools": ("pools", "InferencePool"),
    "inferencemodelrewrites": ("rewrites", "InferenceModelRewrite"),
}
"""The kinds shown as their spec: the path's name, the resource set's field, the kind."""

KINDS = ("modelroutes", "modelservers", "pods", *list(SPEC_KINDS)[1:])
"""Every kind C{/debug/config_dump/<kind>} and C{.../namespaces/<ns>/<kind>/<name>} show."""


def spec_view(resource: Any) -> dict[str, object]:
    return {
        "name": resource.meta.name,
        "namespace": resource.meta.namespace,
        "spec": redact(resource.spec, leaf=_leaf),
    }


class ConfigDump(Views):
    def server_view(self, server: ModelServer) -> dict[str, object]:
        members = self.store.server_pods(server)
        names = [p.key for p in members]
        roles = [(p.key, server.pd_role(p.pod)) for p in members]
        return {
            "name": server.meta.name,
            "namespace": server.meta.namespace,
            "spec": redact(server.spec, leaf=_leaf),
            "pods": names,
            "associatedPods": names,
            "prefillPods": [key for key, role in roles if role == "prefill"],
            "decodePods": [key for key, role in roles if role == "decode"],
        }

    def pod_view(self, pod: Pod, servers: Mapping[str, ModelServer]) -> dict[str, object]:
        endpoint = self._endpoint(pod)
        member_of = list(endpoint.servers) if endpoint is not None else []
        engine = servers[member_of[0]].engine if member_of else None
        state = endpoint.state if endpoint is not None else None
        status = pod.status
        start = status.get("startTime")
        return {
            "name": pod.meta.name,
            "namespace": pod.meta.namespace,
            "podInfo": {
                "podIP": pod.ip or "",
                "nodeName": str(pod.spec.get("nodeName") or ""),
                "phase": pod.phase,
                "startTime": None if start is None else _timestamp(start),
                "labels": dict(pod.meta.labels),
            },
            "engine": engine,
            # The last scrape's figures; zeros before the first one (and for pods that do
            # not serve), as Kthena shows them.
            "metrics": {
                "gpuCacheUsage": state.kv_usage if state is not None else 0.0,
                "requestWaitingNum": state.waiting if state is not None else 0,
                "requestRunningNum": state.running if state is not None else 0,
                "tpot": state.tpot if state is not None else 0.0,
                "ttft": state.ttft if state is not None else 0.0,
            },
            "models": self._models_of(endpoint, member_of, servers),
            "modelServers": member_of,
        }

    def _models_of(
        self,
        endpoint: PodEndpoint | None,
        member_of: Sequence[str],
        servers: Mapping[str, ModelServer],
    ) -> list[str]:
        """
        What a pod serves: what its own C{/v1/models} said at the last scrape (base
        models, then adapters); before that, what the config tells: its servers' models,
        the route model names sent as they are (servers without C{model}) and the routes'
        LoRA adapters.
        """
        if endpoint is None or not member_of:
            return []
        state = endpoint.state
        if state.models or state.loras:
            return _unique([*sorted(state.models - state.loras), *sorted(state.loras)])
        mine = set(member_of)
        models: list[str] = [m for key in member_of if (m := servers[key].model)]
        for route in self._resources.routes:
            for rule in route.rules:
                for target in rule.targets:
                    key = f"{route.meta.namespace}/{target.model_server_name}"
                    if key not in mine:
                        continue
                    if servers[key].model is None:
                        models.append(route.model_name)
                    models.extend(route.lora_adapters)
        return _unique(models)

    def listing(self, kind: str) -> dict[str, object]:
        """C{/debug/config_dump/<kind>}."""
        resources = self._resources
        if kind == "modelservers":
            return {kind: [self.server_view(s) for s in resources.servers]}
        if kind == "pods":
            servers = self._servers()
            return {kind: [self.pod_view(p, servers) for p in resources.pods]}
        if kind not in SPEC_KINDS:
            raise DebugError(404, f"unknown kind {kind!r}; known kinds: {', '.join(KINDS)}")
        return {kind: [spec_view(r) for r in getattr(resources, SPEC_KINDS[kind][0])]}

    def config_object(self, namespace: str, kind: str, name: str) -> dict[str, object]:
        resources = self._resources
        if kind in SPEC_KINDS:
            field, title = SPEC_KINDS[kind]
            for resource in getattr(resources, field):
                if (resource.meta.namespace, resource.meta.name) == (namespace, name):
                    return spec_view(resource)
            raise DebugError(404, f"{title} {namespace}/{name} not found")
        if kind == "modelservers":
            for server in resources.servers:
                if (server.meta.namespace, server.meta.name) == (namespace, name):
                    return self.server_view(server)
            raise DebugError(404, f"ModelServer {namespace}/{name} not found")
        if kind == "pods":
            for pod in resources.pods:
                if (pod.meta.namespace, pod.meta.name) == (namespace, name):
                    return self.pod_view(pod, self._servers())
            raise DebugError(404, f"Pod {namespace}/{name} not found")
        raise DebugError(404, f"unknown kind {kind!r}; known kinds: {', '.join(KINDS)}")
