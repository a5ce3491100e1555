"""
Every metric family of the observability specification, owned by one object on one
L{CollectorRegistry} per router (two routers in a process never collide).

Label values come from closed sets: C{model} is a model known from routes or C{unknown};
C{path} a known API path or C{other}; C{error_type} an L{ErrorType} value; C{status_code}
the status sent. Children are cached by label values (cheaper than C{.labels()} on the hot
path) and series of routes, servers and models that leave the config are removed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from zope.interface import implementer

from kthena.config.router import RouterConfig
from kthena.interfaces import IReconfigurable, IRequestObserver
from kthena.observability.families import FastFamily, FastHistogram
from kthena.observability.pd_metrics import PDMetrics
from kthena.observability.pod_gauges import PodGauges
from kthena.observability.watch_metrics import WatchFamilies
from kthena.pipeline.plane import DataPlane
from kthena.record import RequestRecord
from kthena.sources.source import WatchStatus
from kthena.store import UNKNOWN_MODEL

if TYPE_CHECKING:
    from kthena.pods import PodEndpoint


REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
PLUGIN_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5)
FAIRNESS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
UNKNOWN = UNKNOWN_MODEL

DESTINATION_LABELS = ("model_route", "backend_type", "backend_name", "upstream_model")
"""Current Kthena's labels naming where a request went (C{destinationLabels: true})."""
_UNRESOLVED = ("none", "unresolved", "none", "none")
"""Kthena's destination values for a request that was never routed."""

ROUTER_PATHS = frozenset({"/v1/models", "/healthz", "/readyz"})
MODEL_PATH = "/v1/models/{model}"
"""The C{path} label of C{GET /v1/models/<id>} (one label, not one per model)."""


def _names(config: RouterConfig) -> tuple[set[str], set[tuple[str, str]]]:
    """The model names and (route, server) pairs a config routes to, for metric labels."""
    models: set[str] = set()
    destinations: set[tuple[str, str]] = set()
    for route in config.resources.routes:
        models.update((route.model_name, *route.lora_adapters))
        for rule in route.rules:
            for target in rule.targets:
                server = f"{route.meta.namespace}/{target.model_server_name}"
                destinations.add((route.meta.key, server))
    models.discard("")
    return models, destinations


@implementer(IRequestObserver, IReconfigurable)
class RouterMetrics:
    """
    The spec's families. Request families are fed by L{request_started},
    L{upstream_started} / L{upstream_ended} and L{request_done}; the rest are filled
    by the scheduler, rate limits, fairness, PD and the pod scrapers as they arrive.
    """

    def __init__(
        self, registry: CollectorRegistry, clock: Any, config: RouterConfig | None = None
    ) -> None:
        """
        @param config: the first config generation: the paths labelled as themselves,
            and whether current Kthena's four destination labels (C{model_route},
            C{backend_type}, C{backend_name}, C{upstream_model}) go on the request,
            duration, token and active-upstream families
            (C{observability.metrics.destinationLabels}, fixed until a restart).
        """
        config = config or RouterConfig()
        self.registry = registry
        self.clock = clock
        destination_labels = config.observability.metrics.destination_labels
        self.destination_labels = destination_labels
        extra = DESTINATION_LABELS if destination_labels else ()
        self._request_families(extra)
        self._limit_families()
        self._pod_families()
        self._router_families()
        self.pods = PodGauges(registry)
        self.scrape_hooks: list[Callable[[], None]] = []
        self._paths = ROUTER_PATHS | frozenset(config.inference_paths)
        self._names = _names(config)

    def _request_families(self, extra: tuple[str, ...]) -> None:
        """The request, token and plugin families (the destination labels: C{extra})."""
        r = self.registry
        self.requests = self._fast(
            "counter", "kthena_router_requests",
            "Total number of HTTP requests processed by the router",
            ("model", "path", "status_code", "error_type", *extra),
        )  # fmt: skip
        self.request_duration = FastHistogram(
            "kthena_router_request_duration_seconds",
            "End-to-end request processing latency distribution",
            ("model", "path", "status_code", *extra), REQUEST_BUCKETS,
        )  # fmt: skip
        r.register(self.request_duration)
        self.pd = PDMetrics(r, self.clock, REQUEST_BUCKETS)
        self.active_downstream = self._fast(
            "gauge", "kthena_router_active_downstream_requests",
            "Current active downstream requests (from clients to router)", ("model",),
        )  # fmt: skip
        self.active_upstream = self._fast(
            "gauge", "kthena_router_active_upstream_requests",
            "Current active upstream requests (from router to backend pods)",
            ("model_route", "model_server", *extra[1:]),
        )  # fmt: skip
        self.tokens = self._fast(
            "counter", "kthena_router_tokens", "Total tokens processed/generated",
            ("model", "path", "token_type", *extra),
        )  # fmt: skip
        self.plugin_duration = FastHistogram(
            "kthena_router_scheduler_plugin_duration_seconds",
            "Processing time per scheduler plugin", ("model", "plugin", "type"), PLUGIN_BUCKETS,
        )  # fmt: skip
        r.register(self.plugin_duration)

    def _limit_families(self) -> None:
        """Rate limits and the fairness queue."""
        r = self.registry
        self.rate_limit_exceeded = Counter(
            "kthena_router_rate_limit_exceeded",
            "Number of requests rejected due to rate limiting", ("model", "limit_type", "path"),
            registry=r,
        )  # fmt: skip
        self.rate_limit_backend_errors = Counter(
            "kthena_router_rate_limit_backend_errors",
            "Calls to a rate-limit backend (Redis) that failed or timed out",
            ("backend", "operation"), registry=r,
        )  # fmt: skip
        self.fairness_queue_size = Gauge(
            "kthena_router_fairness_queue_size",
            "Current fairness queue size for pending requests", ("model", "user_id"), registry=r,
        )  # fmt: skip
        self.fairness_queue_duration = Histogram(
            "kthena_router_fairness_queue_duration_seconds",
            "Time requests spend in fairness queue before processing", ("model", "user_id"),
            buckets=FAIRNESS_BUCKETS, registry=r,
        )  # fmt: skip

    def _pod_families(self) -> None:
        """Load-balancing decisions (the pod gauges are L{PodGauges}'s)."""
        self.lb_decisions = self._fast(
            "counter", "kthena_lb_decisions", "Load-balancing decisions",
            ("algorithm", "model", "target"),
        )  # fmt: skip

    def _router_families(self) -> None:
        """Ours and Kthena's beyond the spec."""
        r = self.registry
        self.upstream_requests = self._fast(
            "counter", "kthena_router_upstream_requests",
            "Requests sent to the model server's (or InferencePool's) pods (each attempt, each "
            "PD leg)", ("model_server",),
        )  # fmt: skip
        self.upstream_failures = self._fast(
            "counter", "kthena_router_upstream_failures",
            "Requests to the model server's pods that failed (unreachable, timed out, 5xx, "
            "cut, or not serving the model)", ("model_server",),
        )  # fmt: skip
        self.unhealthy_fallbacks = self._fast(
            "counter", "kthena_router_unhealthy_fallbacks",
            "Requests scheduled among unhealthy pods because no pod of the server was healthy",
            ("model_server",),
        )  # fmt: skip
        self.outlier_ejections = self._fast(
            "counter", "kthena_router_outlier_ejections",
            "Pods ejected by passive outlier detection (failed attempts in a row)", ("target",),
        )  # fmt: skip
        # Kthena's two gauges beyond the spec, read when scraped (from the worker thread).
        self.active_requests = Gauge(
            "kthena_router_active_requests",
            "Current number of active requests being handled by the router", registry=r,
        )  # fmt: skip
        self.prefix_cache_entries = Gauge(
            "kthena_router_prefix_cache_entries",
            "Total prefix-cache occupancy: (prefix block, pod) entries stored across all pods; "
            "a block cached on N pods counts N times", registry=r,
        )  # fmt: skip

    def reconfigure(self, config: RouterConfig) -> None:
        """A new generation: its paths; the series of models and routes that left go."""
        self._paths = ROUTER_PATHS | frozenset(config.inference_paths)
        resources = config.resources
        servers = {s.meta.key for s in resources.servers} | {p.meta.key for p in resources.pools}
        for family in (self.upstream_requests, self.upstream_failures):
            family.prune(lambda labels: labels["model_server"] not in servers)
        old_models, old_destinations = self._names
        self._names = new_models, new_destinations = _names(config)
        self.forget(old_models - new_models, old_destinations - new_destinations)

    def read_gauges(self, active: Callable[[], int], prefix_entries: Callable[[], int]) -> None:
        """Where the gauges read at scrape time come from (the router's calls, scheduler)."""
        self.active_requests.set_function(active)
        self.prefix_cache_entries.set_function(prefix_entries)

    def read_watches(self, watches: Callable[[], Sequence[WatchStatus]]) -> None:
        """Where the Kubernetes source's watch families are read from, when scraped."""
        self.registry.register(WatchFamilies(watches))

    def before_scrape(self) -> None:
        """Each scrape, on the reactor thread before rendering: the hooks set their gauges."""
        for hook in self.scrape_hooks:
            hook()

    def path_label(self, path: str) -> str:
        if path in self._paths:
            return path
        return MODEL_PATH if path.startswith("/v1/models/") else "other"

    def ejected(self, pod: PodEndpoint) -> None:
        self.outlier_ejections.add((pod.key,))

    def _fast(self, kind: str, name: str, doc: str, labels: tuple[str, ...]) -> FastFamily:
        family = FastFamily(kind, name, doc, labels)
        self.registry.register(family)
        return family

    # -- the request lifecycle

    @staticmethod
    def model_label(ctx: RequestRecord) -> str:
        """The model, when the resources name it; C{unknown} otherwise (bounded: a pool
        takes any name)."""
        match = ctx.match
        return match.model_label(ctx.model or "") if match is not None else UNKNOWN

    def started(self, record: RequestRecord) -> None:
        """The request goes to pods: in flight, and one load-balancing decision."""
        model = self.model_label(record)
        self.active_downstream.add((model,))
        decision = record.decision
        if decision is not None and decision.candidates:
            algorithm = getattr(decision, "algorithm", "custom")
            self.lb_decisions.add((algorithm, model, decision.candidates[0].key))

    def _destination(self, ctx: RequestRecord) -> tuple[str, ...]:
        """C{(model_route, backend_type, backend_name, upstream_model)}, or C{()} when
        the destination labels are off."""
        if not self.destination_labels:
            return ()
        match = ctx.match
        if match is None:
            return _UNRESOLVED
        named = match.declared or match.rewritten is not None
        return (
            match.model_route or "",
            match.server.backend_type,
            match.server.meta.key,
            match.upstream_model(ctx.model or "") if named else UNKNOWN,
        )

    def _upstream(self, ctx: RequestRecord) -> tuple[str, ...]:
        match = ctx.match
        assert match is not None
        route, server = match.model_route or "", match.model_server or ""
        return (route, server, *self._destination(ctx)[1:])

    def attempt_started(self, record: RequestRecord) -> None:
        self.active_upstream.add(self._upstream(record))

    def attempt_ended(self, record: RequestRecord) -> None:
        self.active_upstream.add(self._upstream(record), -1)

    def observe_pods(self, plane: DataPlane) -> None:
        """After a scrape round: the pod gauges; ejection counts of pods that left go."""
        self.pods.observe(plane)
        pods = plane.store.pods
        self.outlier_ejections.prune(lambda labels: labels["target"] not in pods)
        self.pd.observe_groups(plane)

    def backend_error(self, backend: str, operation: str, count: int = 1) -> None:
        """A rate-limit backend call failed (the limiter's outage tracker)."""
        self.rate_limit_backend_errors.labels(backend, operation).inc(count)

    def plugin_timer(self, model: str, plugin: str, kind: str, seconds: float) -> None:
        """Time one scheduler plugin call (the scheduler's timer)."""
        self.plugin_duration.observe((model, plugin, kind), seconds)

    def ended(self, ctx: RequestRecord) -> None:
        """Count a request that ended, whatever the outcome (once per request)."""
        model = self.model_label(ctx)
        if ctx.dispatched:
            self.active_downstream.add((model,), -1)
        if ctx.unhealthy_fallback and ctx.match is not None:
            self.unhealthy_fallbacks.add((ctx.match.server.meta.key,))
        path = self.path_label(ctx.path)
        status = str(ctx.status)
        destination = self._destination(ctx)
        self.requests.add((model, path, status, ctx.error_type.value, *destination))
        if ctx.limit_type is not None:
            self.rate_limit_exceeded.labels(model, ctx.limit_type, path).inc()
        if ctx.finished is not None:
            self.request_duration.observe(
                (model, path, status, *destination), max(0.0, ctx.finished - ctx.started)
            )
        if ctx.match is None:
            return
        server = (ctx.match.server.meta.key,)
        sent = len(ctx.legs) if ctx.legs else ctx.attempts
        if sent:
            self.upstream_requests.add(server, sent)
        if ctx.failed_attempts:
            self.upstream_failures.add(server, len(ctx.failed_attempts))
        if ctx.legs:
            self.pd.ended(ctx, model, path)
        # The pod's own count when it gave one; the estimate only when the pod took the
        # prompt (it began to answer): a request that never reached one processed nothing.
        inputs = ctx.input_tokens if ctx.prompt_tokens is not None or ctx.first_byte else 0
        if inputs:
            self.tokens.add((model, path, "input", *destination), inputs)
        outputs = ctx.output_tokens
        if outputs:
            self.tokens.add((model, path, "output", *destination), outputs)

    # -- keeping series bounded

    def forget(self, models: Iterable[str], destinations: Iterable[tuple[str, str]]) -> None:
        """
        Remove the series of models and (route, server) pairs that left the config, so
        label sets do not grow with every rename. A gauge still counting requests in
        flight stays until a later reload.
        """
        gone_models = set(models)
        gone_destinations = set(destinations)

        def model_gone(labels: dict[str, str]) -> bool:
            if labels["model"] in gone_models:
                return True
            route = labels.get("model_route")  # the destination labels, when on
            return route is not None and (route, labels["backend_name"]) in gone_destinations

        for family in (self.requests, self.tokens):
            family.prune(model_gone)
        for histogram in (self.request_duration, self.plugin_duration):
            histogram.prune(model_gone)
        self.pd.forget(model_gone)
        self.active_downstream.prune(model_gone, keep_nonzero=True)
        self.active_upstream.prune(
            lambda labels: (labels["model_route"], labels["model_server"]) in gone_destinations,
            keep_nonzero=True,
        )
