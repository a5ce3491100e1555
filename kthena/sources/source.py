"""
ModelRoutes, ModelServers and Pods (and the Inference Extension's kinds, when asked) from
the Kubernetes API, for the router's datastore:
one L{Reflector} per kind and namespace, and the objects of them all handed to the router
whenever any changed (a burst of events, such as a list, is handed over once, on the next
turn of the reactor). Nothing is handed over before every kind has been listed once: a
route applied before its ModelServer is known would not route.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from zope.interface import implementer

from kthena.config.inference import GATEWAY_API, INFERENCE_API, REWRITE_API
from kthena.config.kubernetes import EVERY_NAMESPACE, KubernetesConfig
from kthena.config.resources import KTHENA_API
from kthena.config.router import RouterConfig
from kthena.interfaces import IReconfigurable, IServerReactor
from kthena.lifecycle import restart_needed
from kthena.sources.kubeaccess import KubeAccess, from_kubeconfig, in_cluster
from kthena.sources.kubeclient import KubeClient
from kthena.sources.reflector import Kind, Reflector

KINDS = (
    Kind(KTHENA_API, "ModelRoute", "modelroutes"),
    Kind(KTHENA_API, "ModelServer", "modelservers"),
    Kind("v1", "Pod", "pods"),
)
"""What the router reads, in Kthena's API group and the core one."""

INFERENCE_KINDS = (
    Kind(INFERENCE_API, "InferencePool", "inferencepools"),
    Kind(GATEWAY_API, "HTTPRoute", "httproutes"),
    Kind(REWRITE_API, "InferenceModelRewrite", "inferencemodelrewrites"),
)
"""What it reads besides with C{inferenceExtension}: the Gateway API Inference
Extension's kinds."""


GATEWAY_KINDS = (Kind(GATEWAY_API, "Gateway", "gateways"),)
"""What it reads besides with the C{gatewayAPI} section (it listens for them)."""


def kinds_for(config: KubernetesConfig, gateways: bool) -> tuple[Kind, ...]:
    return (
        KINDS
        + (INFERENCE_KINDS if config.inference_extension else ())
        + (GATEWAY_KINDS if gateways else ())
    )


@dataclass(frozen=True, slots=True)
class WatchStatus:
    """One reflector's state, for C{/debug/router/state} and the metrics."""

    kind: str
    namespace: str
    synced: bool
    objects: int
    errors: int
    failing: bool
    last_error: str | None
    last_sync: float | None


def access_for(config: KubernetesConfig) -> KubeAccess:
    """The API the config names: a kubeconfig's context, or the pod's service account."""
    if config.kubeconfig is not None:
        return from_kubeconfig(config.kubeconfig, config.context)
    return in_cluster()


@implementer(IReconfigurable)
class KubernetesSource(Service):
    """
    @param apply: given every object known, whenever one changed (after the first full
        list of every kind).
    @param gateways: read Gateways too (the config listens for them: C{gatewayAPI}).
    """

    name = "kubernetes"

    def __init__(
        self,
        reactor: IServerReactor,
        config: KubernetesConfig,
        apply: Callable[[list[dict[str, Any]]], None],
        access: KubeAccess | None = None,
        gateways: bool = False,
    ) -> None:
        self.reactor = reactor
        self.config = config
        self.apply = apply
        self.access = access if access is not None else access_for(config)
        self.client = KubeClient(reactor, self.access)
        namespaces = config.namespaces or (self.access.namespace,)
        self.reflectors = [
            Reflector(
                self.client,
                reactor,
                kind,
                None if namespace == EVERY_NAMESPACE else namespace,
                self._changed,
                idle_timeout=config.watch_idle_timeout,
            )
            for kind in kinds_for(config, gateways)
            for namespace in namespaces
        ]
        self._pending: IDelayedCall | None = None

    @property
    def synced(self) -> bool:
        """Every kind was listed once: what the router holds is the cluster's."""
        return all(r.synced for r in self.reflectors)

    def status(self) -> list[WatchStatus]:
        return [
            WatchStatus(
                kind=r.kind.kind,
                namespace=r.namespace or EVERY_NAMESPACE,
                synced=r.synced,
                objects=len(r.objects),
                errors=r.errors,
                failing=r.failing,
                last_error=r.last_error,
                last_sync=r.last_sync,
            )
            for r in self.reflectors
        ]

    def _changed(self) -> None:
        if self._pending is None and self.running and self.synced:
            self._pending = self.reactor.callLater(0, self._hand_over)

    def _hand_over(self) -> None:
        self._pending = None
        self.apply([item for r in self.reflectors for item in r.objects.values()])

    def startService(self) -> None:
        super().startService()
        for reflector in self.reflectors:
            reflector.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        for reflector in self.reflectors:
            reflector.stop()
        return Deferred.fromCoroutine(self.client.close())

    def reconfigure(self, config: RouterConfig) -> None:
        restart_needed("kubernetes", self.config, config.kubernetes)
