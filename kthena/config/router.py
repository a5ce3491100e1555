"""
The router's configuration file: settings, the C{observability} section exactly as the
specification writes it, the resource documents (files, globs or inline) and, for the
demo, simulated model servers to run in the same process.

A config is loaded whole or not at all: L{load_config} returns a complete L{RouterConfig}
or raises L{ConfigError}, so a reload never leaves the router half-configured.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kthena.config.documents import build_resource_set, parse_document
from kthena.config.fairness import FairnessConfig, parse_fairness
from kthena.config.files import yaml_documents
from kthena.config.gateway import GatewayAPIConfig, parse_gateway, parse_gateway_api
from kthena.config.identity import IdentityConfig, parse_identity
from kthena.config.kubernetes import KubernetesConfig, parse_kubernetes
from kthena.config.limits import RateLimitSettings, parse_rate_limits, parse_tokenizers
from kthena.config.observability import ObservabilityConfig, parse_observability
from kthena.config.resources import GatewayListener
from kthena.config.resourceset import Resource, ResourceSet
from kthena.config.scheduler import SchedulerConfig, parse_scheduler
from kthena.config.traffic import (
    DEFAULT_INFERENCE_PATHS,
    DownstreamConfig,
    UpstreamConfig,
    parse_downstream,
    parse_inference_paths,
    parse_upstream,
)
from kthena.config.validate import (
    ConfigError,
    Where,
    boolean,
    choice,
    duration,
    endpoint,
    integer,
    mapping,
    number,
    positive_duration,
    sequence,
    string,
)


@dataclass(frozen=True, slots=True)
class PodMetricsConfig:
    """
    Scraping the pods' own metrics, and the health that follows from it.

    @ivar unhealthy_after: failed scrapes in a row that take a pod out of scheduling.
    @ivar stale_after: a pod whose last good scrape is older than this is out too.
    @ivar models_interval: how often each pod's C{/v1/models} is read (LoRA adapters).
    """

    enabled: bool = True
    interval: float = 1.0
    timeout: float = 0.8
    concurrency: int = 32
    unhealthy_after: int = 3
    stale_after: float = 5.0
    models_interval: float = 5.0


@dataclass(frozen=True, slots=True)
class SimulatorSpec:
    """A kthena-sim model server run inside the router process (demo mode)."""

    engine: str
    model: str
    listen: str
    loras: tuple[str, ...] = ()
    itl: float = 0.02
    prefill_per_token: float = 0.0001
    max_num_seqs: int = 64
    output_tokens: int = 16
    role: str = "both"


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """
    One generation of the router's configuration.

    @ivar files: what is watched for changes: every file this generation was read from,
        and the resource globs (a file appearing in or leaving a glob is a change too).
    """

    listen: str = "tcp:8080"
    admin_listen: str | None = None
    debug_listen: str | None = None
    max_body_bytes: int = 10 * 1024 * 1024
    drain_timeout: float = 30.0
    reload_interval: float = 2.0
    inference_paths: frozenset[str] = frozenset(DEFAULT_INFERENCE_PATHS)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    readiness: str = "allModels"
    pod_metrics: PodMetricsConfig = field(default_factory=PodMetricsConfig)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)
    resources: ResourceSet = field(default_factory=ResourceSet)
    simulators: tuple[SimulatorSpec, ...] = ()
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    rate_limits: RateLimitSettings = field(default_factory=RateLimitSettings)
    tokenizers: tuple[tuple[str, str], ...] = ()
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    fairness: FairnessConfig = field(default_factory=FairnessConfig)
    kubernetes: KubernetesConfig = field(default_factory=KubernetesConfig)
    gateway: GatewayListener | None = None
    gateway_api: GatewayAPIConfig = field(default_factory=GatewayAPIConfig)
    source: str = "<defaults>"
    files: tuple[str, ...] = ()


_TOP = (
    "listen",
    "adminListen",
    "debugListen",
    "maxBodyBytes",
    "drainTimeout",
    "reloadInterval",
    "inferencePaths",
    "downstream",
    "upstream",
    "readiness",
    "podMetrics",
    "observability",
    "resources",
    "simulators",
    "scheduler",
    "rateLimits",
    "tokenizers",
    "identity",
    "fairness",
    "kubernetes",
    "gateway",
    "gatewayAPI",
)


READINESS_RULES = ("allModels", "anyModel")
"""C{readiness}: C{/readyz} answers ready when every model routes to a healthy pod, or
when any does."""


def _listen(value: object, where: Where) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"tcp:{integer(value, where, minimum=0, maximum=65535)}"
    return endpoint(value, where)


def _pod_metrics(value: object, where: Where) -> PodMetricsConfig:
    spec = mapping(
        value,
        where,
        ("enabled", "interval", "timeout", "concurrency", "unhealthyAfter", "staleAfter",
         "modelsInterval"),
    )  # fmt: skip
    d = PodMetricsConfig()
    interval = positive_duration(spec.get("interval", d.interval), where.at("interval"))
    config = PodMetricsConfig(
        enabled=boolean(spec.get("enabled", d.enabled), where.at("enabled")),
        interval=interval,
        timeout=positive_duration(
            spec.get("timeout", min(d.timeout, interval)), where.at("timeout")
        ),
        concurrency=integer(
            spec.get("concurrency", d.concurrency), where.at("concurrency"), minimum=1
        ),
        unhealthy_after=integer(
            spec.get("unhealthyAfter", d.unhealthy_after), where.at("unhealthyAfter"), minimum=1
        ),
        stale_after=duration(
            spec.get("staleAfter", max(d.stale_after, 3 * interval)), where.at("staleAfter")
        ),
        models_interval=duration(
            spec.get("modelsInterval", max(d.models_interval, interval)),
            where.at("modelsInterval"),
        ),
    )
    if config.stale_after < config.interval:
        where.at("staleAfter").fail("must be at least the interval")
    return config


def _simulator(value: object, where: Where) -> SimulatorSpec:
    spec = mapping(
        value,
        where,
        (
            "engine",
            "model",
            "listen",
            "loras",
            "itl",
            "prefillPerToken",
            "maxNumSeqs",
            "outputTokens",
            "role",
        ),
        required=("engine", "model", "listen"),
    )
    d = SimulatorSpec("vllm", "", "")
    return SimulatorSpec(
        engine=choice(spec["engine"], where.at("engine"), ("vllm", "sglang")),
        model=string(spec["model"], where.at("model")),
        listen=_listen(spec["listen"], where.at("listen")),
        loras=tuple(
            string(x, where.at("loras").at(i))
            for i, x in enumerate(sequence(spec.get("loras"), where.at("loras")))
        ),
        itl=number(spec.get("itl", d.itl), where.at("itl"), minimum=0),
        prefill_per_token=number(
            spec.get("prefillPerToken", d.prefill_per_token), where.at("prefillPerToken"), minimum=0
        ),
        max_num_seqs=integer(
            spec.get("maxNumSeqs", d.max_num_seqs), where.at("maxNumSeqs"), minimum=1
        ),
        output_tokens=integer(
            spec.get("outputTokens", d.output_tokens), where.at("outputTokens"), minimum=1
        ),
        role=choice(spec.get("role", d.role), where.at("role"), ("both", "prefill", "decode")),
    )


def _resource_entries(
    entries: list[Any], where: Where, base: Path, files: list[str]
) -> Iterator[tuple[Resource, Where]]:
    order = 0
    for i, entry in enumerate(entries):
        e_where = where.at(i)
        if isinstance(entry, str):
            pattern = str(base / entry)
            paths = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            if not paths:
                e_where.fail(f"no file matches {entry!r}")
            if glob.has_magic(pattern):
                files.append(pattern)
            for path in paths:
                files.append(path)
                for doc_number, doc in yaml_documents(path):
                    d_where = Where(path, f"document {doc_number}")
                    order += 1
                    yield parse_document(doc, d_where, order), d_where
        else:
            d_where = Where(where.source, e_where.field)
            order += 1
            yield parse_document(entry, d_where, order), d_where


def _check_prefix_policies(
    resources: ResourceSet, scheduler: SchedulerConfig, where: Where
) -> None:
    """A route's C{pdPolicy.decodeOnlyPrefixHit} is judged on the C{prefix-cache} score."""
    if any(name == "prefix-cache" for name, _ in scheduler.scores):
        return
    routes = [r.meta.key for r in resources.routes if r.pd_policy and r.pd_policy.prefix_hit]
    if routes:
        where.fail(
            f"{', '.join(routes)} use pdPolicy.decodeOnlyPrefixHit, judged on the "
            "prefix-cache score: score with prefix-cache"
        )


def parse_config(raw: object, source: str, base: Path, files: list[str]) -> RouterConfig:
    """A router config from its parsed YAML; resource paths are relative to C{base}."""
    where = Where(source)
    spec = mapping(raw, where, _TOP)
    d = RouterConfig()
    resources = build_resource_set(
        _resource_entries(
            sequence(spec.get("resources"), where.at("resources")),
            where.at("resources"),
            base,
            files,
        )
    )
    sims = tuple(
        _simulator(s, where.at("simulators").at(i))
        for i, s in enumerate(sequence(spec.get("simulators"), where.at("simulators")))
    )
    identity = parse_identity(spec.get("identity"), where.at("identity"), base)
    fairness = parse_fairness(
        spec.get("fairness"), where.at("fairness"), identity.priorities, identity.default_priority
    )
    scheduler = parse_scheduler(spec.get("scheduler"), where.at("scheduler"))
    _check_prefix_policies(resources, scheduler, where.at("scheduler"))
    downstream = parse_downstream(spec.get("downstream"), where.at("downstream"))
    gateway_api = parse_gateway_api(spec.get("gatewayAPI"), where.at("gatewayAPI"))
    if gateway_api.enabled and downstream.server != "lean":
        where.at("gatewayAPI").fail(
            "Gateway ports are served by the lean HTTP server: remove downstream.server"
        )
    return RouterConfig(
        listen=_listen(spec.get("listen", d.listen), where.at("listen")),
        admin_listen=None
        if spec.get("adminListen") is None
        else _listen(spec["adminListen"], where.at("adminListen")),
        debug_listen=None
        if spec.get("debugListen") is None
        else _listen(spec["debugListen"], where.at("debugListen")),
        max_body_bytes=integer(
            spec.get("maxBodyBytes", d.max_body_bytes), where.at("maxBodyBytes"), minimum=1
        ),
        drain_timeout=duration(spec.get("drainTimeout", d.drain_timeout), where.at("drainTimeout")),
        reload_interval=duration(
            spec.get("reloadInterval", d.reload_interval), where.at("reloadInterval")
        ),
        inference_paths=parse_inference_paths(
            spec.get("inferencePaths"), where.at("inferencePaths")
        ),
        downstream=downstream,
        upstream=parse_upstream(spec.get("upstream"), where.at("upstream")),
        readiness=choice(
            spec.get("readiness", d.readiness), where.at("readiness"), READINESS_RULES
        ),
        pod_metrics=_pod_metrics(spec.get("podMetrics"), where.at("podMetrics")),
        observability=parse_observability(spec.get("observability"), where.at("observability")),
        resources=resources,
        simulators=sims,
        scheduler=scheduler,
        rate_limits=parse_rate_limits(spec.get("rateLimits"), where.at("rateLimits")),
        tokenizers=parse_tokenizers(spec.get("tokenizers"), where.at("tokenizers"), base),
        identity=identity,
        fairness=fairness,
        kubernetes=parse_kubernetes(spec.get("kubernetes"), where.at("kubernetes"), base),
        gateway=parse_gateway(spec.get("gateway"), where.at("gateway")),
        gateway_api=gateway_api,
        source=source,
        files=(source, *files),
    )


def load_config(path: str) -> RouterConfig:
    """
    Read the router config file and every resource file it names.

    @raise ConfigError: with the file, document and field of the first problem.
    """
    documents = list(yaml_documents(path))
    if len(documents) != 1:
        raise ConfigError(f"{path}: must hold exactly one YAML document, found {len(documents)}")
    files: list[str] = []
    return parse_config(documents[0][1], path, Path(os.path.dirname(os.path.abspath(path))), files)
