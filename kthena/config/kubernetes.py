"""
The C{kubernetes} section: ModelRoutes, ModelServers and Pods read from the Kubernetes
API besides (or instead of) the config's resource files; with C{inferenceExtension}, the
Gateway API Inference Extension's InferencePools, HTTPRoutes and InferenceModelRewrites
too (their CRDs must be installed: a kind the API does not know is never listed, and the
router never ready).

    kubernetes:
      kubeconfig: /etc/kthena/kubeconfig   # omitted: the pod's service account
      context: prod                        # omitted: the kubeconfig's current context
      namespaces: [serving]                # omitted: the context's (the pod's) namespace;
                                           # ["*"]: every namespace
      watchIdleTimeout: 90s                # a watch silent this long is reopened
      inferenceExtension: true             # also InferencePools, HTTPRoutes, rewrites

The section's presence turns it on (C{enabled: false} keeps it written but off).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kthena.config.validate import (
    Where,
    boolean,
    mapping,
    optional_string,
    positive_duration,
    sequence,
    string,
)

EVERY_NAMESPACE = "*"

_DNS_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


@dataclass(frozen=True, slots=True)
class KubernetesConfig:
    """
    @ivar namespaces: the namespaces read; empty: the context's or the pod's own;
        C{("*",)}: every namespace (one cluster-wide watch per kind).
    """

    enabled: bool = False
    kubeconfig: str | None = None
    context: str | None = None
    namespaces: tuple[str, ...] = ()
    watch_idle_timeout: float = 90.0
    inference_extension: bool = False


def parse_kubernetes(value: object, where: Where, base: Path) -> KubernetesConfig:
    if value is None:
        return KubernetesConfig()
    spec = mapping(
        value,
        where,
        ("enabled", "kubeconfig", "context", "namespaces", "watchIdleTimeout",
         "inferenceExtension"),
    )  # fmt: skip
    kubeconfig = optional_string(spec.get("kubeconfig"), where.at("kubeconfig"))
    if kubeconfig is not None:
        kubeconfig = str(base / Path(kubeconfig).expanduser())
    namespaces = []
    n_where = where.at("namespaces")
    for i, item in enumerate(sequence(spec.get("namespaces"), n_where)):
        name = string(item, n_where.at(i))
        if name != EVERY_NAMESPACE and not (set(name) <= _DNS_LABEL_CHARS and len(name) <= 63):
            n_where.at(i).fail(f"must be a namespace name or {EVERY_NAMESPACE!r}, not {name!r}")
        namespaces.append(name)
    if EVERY_NAMESPACE in namespaces and len(namespaces) > 1:
        n_where.fail(f"{EVERY_NAMESPACE!r} (every namespace) stands alone")
    return KubernetesConfig(
        enabled=boolean(spec.get("enabled", True), where.at("enabled")),
        kubeconfig=kubeconfig,
        context=optional_string(spec.get("context"), where.at("context")),
        namespaces=tuple(dict.fromkeys(namespaces)),
        watch_idle_timeout=positive_duration(
            spec.get("watchIdleTimeout", 90.0), where.at("watchIdleTimeout")
        ),
        inference_extension=boolean(
            spec.get("inferenceExtension", False), where.at("inferenceExtension")
        ),
    )
