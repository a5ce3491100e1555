"""
Every zope Interface of the project, documented.

The interfaces for the router's plugins (scheduler, estimators, limiters, sources, engine
dialects, KV connectors, log sinks) arrive with the issues that build them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorTime,
)
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from kthena.pods import PodEndpoint


class IServerReactor(IReactorCore, IReactorTCP, IReactorTime, IReactorPluggableNameResolver):
    """
    The reactor a server of ours needs: to listen, to keep time, to connect out by host
    name (treq, Agent) and to stop itself when it cannot listen. For type checking; any
    real reactor provides it.
    """


class IScheduler(Interface):
    """
    Chooses the pods a request may go to, best first. The data plane tries them in that
    order, moving on when a pod fails before answering (the retry policy).
    """

    def schedule(request: Any) -> Any:
        """
        @param request: a L{kthena.scheduler.framework.SchedulingRequest}: the matched
            route and server, its pods that may take traffic (never empty), the body.
        @return: a L{kthena.scheduler.framework.Decision} whose C{candidates} are best
            first (empty when none may take the request).
        """

    def scheduled(decision: Any, pod: PodEndpoint) -> None:
        """C{pod}, a candidate of C{decision}, served the request."""

    def forget_pods(keys: set[str]) -> None:
        """Pods (by key) left the config: drop whatever is kept about them."""

    def prefix_entries() -> int:
        """(prefix block, pod) entries its prefix indexes hold (0 without one), for
        C{kthena_router_prefix_cache_entries}; read from the metrics' worker thread."""


class IPrefixIndex(Interface):
    """A plugin remembering which pods served which prompt prefixes."""

    entries = Attribute(
        "(prefix block, pod) entries held: a block cached on N pods counts N times."
    )


class ITokenEstimator(Interface):
    """Estimates a request's input tokens from its body, before it is sent."""

    def estimate(body: dict[str, Any]) -> int:
        """
        @param body: the parsed request body (chat messages or a completions prompt).
        @return: the estimated number of input tokens (0 when there is no prompt).
        """


class IBucketBackend(Interface):
    """
    Where token buckets live: in the router (L{kthena.ratelimit.buckets.LocalBuckets}) or
    in Redis, shared by every router process (L{kthena.ratelimit.redis}). The rules are
    in L{kthena.ratelimit.buckets}.
    """

    name = Attribute("C{local} or C{redis}: for the debug view and the logs.")

    def check(demands: Sequence[Any]) -> Any:
        """
        All of C{demands} (L{kthena.ratelimit.buckets.Demand}) met, each taking its
        C{take}, or none touched.

        @return: a Deferred of C{None} (passed) or a L{kthena.ratelimit.buckets.Refusal};
            it fails when the backend cannot answer (Redis down, the check's timeout).
        """

    def settle(charges: Sequence[Any]) -> Any:
        """
        Change each bucket's level by what a response really used: C{(BucketSpec,
        amount)} pairs, a charge when positive (the level may go below zero), a refund
        when negative (never above capacity).

        @return: a Deferred of C{None}; it fails when the backend cannot answer.
        """

    def levels(buckets: Sequence[Any]) -> Any:
        """
        @return: a Deferred of each bucket's level now, C{None} for one never used
            (full), for the debug view.
        """


class IIdentifier(Interface):
    """
    Who is calling (for per-user limits, fairness and the access log): a verified JWT
    subject, a trusted header set by an authenticating gateway, or anonymous.
    """

    def identify(exchange: IExchange) -> Any:
        """
        @return: the caller's L{kthena.identity.Identity}, or a Deferred of it (while
            the keys for an unknown C{kid} are fetched).
        @raise kthena.errors.ProxyError: 401 when authentication is required and the
            token is missing, expired or invalid (a Deferred fails the same way).
        """


class IKVTransfer(Interface):
    """
    One prefill/decode request's KV hand-over, as its connector shapes it: the body of
    each leg, and whether the legs run one after the other or at once.
    """

    concurrent = Attribute(
        "True when both legs are sent at once (SGLang: the decode leg waits for the "
        "prefill's KV itself); False when the decode leg needs the prefill's answer."
    )

    def prefill_body() -> Any:
        """The prefill leg's JSON body (a new dict; the client's is left alone)."""

    def decode_body(prefill_reply: Any) -> Any:
        """
        The decode leg's JSON body.

        @param prefill_reply: the prefill leg's answer, parsed JSON (C{None} when it
            was not JSON, or the legs are concurrent).
        @raise ValueError: the prefill answer lacks what the decode leg needs.
        """


class IKVConnector(Interface):
    """How a ModelServer's prefill and decode pods hand the KV cache over
    (C{kvConnector.type})."""

    name = Attribute("The C{kvConnector.type} it implements.")

    def transfer(body: Any, prefill_host: str) -> IKVTransfer:
        """A new hand-over for one request's (client) JSON body and its prefill pod."""


class IEngineDialect(Interface):
    """How one inference engine family names what the router reads from C{/metrics}."""

    name = Attribute("The engine, as ModelServer.spec.inferenceEngine names it.")

    def parse(text: str) -> Any:
        """
        Read one scrape of a pod's C{/metrics} (Prometheus text or OpenMetrics).

        @return: an L{kthena.engines.snapshot.EngineSnapshot}.
        @raise ValueError: when the text cannot be read.
        """


class IAccessLogSink(Interface):
    """
    Where access-log lines go: a stream, a file, an external collector.

    The access log calls a sink only from its own writer thread, never from the reactor,
    one call at a time: a sink may block (a slow disk, a full pipe, the network) without
    slowing the proxy; lines wait in the access log's bounded buffer meanwhile, and are
    dropped and counted when it is full.
    """

    def write(lines: Sequence[str]) -> None:
        """
        Write a batch of lines, in order.

        @param lines: formatted records, each without its trailing newline.
        @raise Exception: the batch is lost; the access log counts and reports it and goes
            on with the next one.
        """

    def reopen() -> None:
        """
        Release the destination and acquire it again: a file is closed and opened again
        by its path (after log rotation renamed it). Nothing to do for a stream.
        """

    def close() -> None:
        """Flush and release the destination; no call follows."""


class IFilterPlugin(Interface):
    """A scheduler plugin that removes pods unfit for a request."""

    name = Attribute("The plugin's configuration name.")

    def filter(request: Any, pods: Sequence[PodEndpoint]) -> list[PodEndpoint]:
        """
        @param request: the L{kthena.scheduler.framework.SchedulingRequest}.
        @return: the pods that pass, in their given order.
        """


class IScorePlugin(Interface):
    """A scheduler plugin that rates pods for a request, 0 (worst) to 100 (best)."""

    name = Attribute("The plugin's configuration name.")

    def score(request: Any, pods: Sequence[PodEndpoint]) -> Sequence[float]:
        """
        @param request: the L{kthena.scheduler.framework.SchedulingRequest}.
        @return: a score for each pod, in the order of C{pods}.
        """


class IPostScheduleHook(Interface):
    """Told which pod served a request, to learn from it (e.g. the prefix index)."""

    name = Attribute("The plugin's configuration name.")

    def scheduled(request: Any, pod: PodEndpoint) -> None:
        """C{pod} served C{request} (its response began with a status below 500)."""


class IReconfigurable(Interface):
    """
    A part of the router that follows config reloads. The reloader validates a new config
    whole before any part sees it; each part then takes it in the service tree's order,
    applies what can change while running and logs what needs a restart.
    """

    def reconfigure(config: Any) -> None:
        """@param config: the new L{kthena.config.router.RouterConfig}."""


class IRequestObserver(Interface):
    """
    Told of each request's life, from its record (L{kthena.record.RequestRecord}): the
    metrics, the access log, the decision ring, and later the limiters and the fairness
    history, all registered in one place. Called on the reactor thread; an observer must
    not block and must not raise (a failure is logged and the others are still told).
    """

    def started(record: Any) -> None:
        """The request was scheduled and goes to pods (not called for refused ones)."""

    def attempt_started(record: Any) -> None:
        """An attempt on C{record.pod} was sent."""

    def attempt_ended(record: Any) -> None:
        """That attempt ended (answered, failed, or its body relayed or cut)."""

    def ended(record: Any) -> None:
        """The request ended, whatever its outcome; exactly once per request."""


class IExchange(Interface):
    """
    One client request and its response as the pipeline sees them: what came in, and how
    to answer, whole or as a stream. The HTTP server under it (twisted.web today) can be
    replaced without touching a stage.
    """

    method = Attribute("The request method, bytes.")
    path = Attribute("The request path without the query, bytes.")
    uri = Attribute("The request target as received (path and query), bytes.")
    protocol = Attribute("The HTTP version, as text (C{HTTP/1.1}).")
    headers = Attribute("The request headers (a L{twisted.web.http_headers.Headers}).")
    client_host = Attribute("The client's address, text, or C{None}.")
    too_large = Attribute("The body went over the size cap and was dropped.")
    started = Attribute("The response head went out: no other status can be sent now.")

    def header(name: bytes) -> bytes | None:
        """A request header's first value."""

    def body() -> bytes:
        """The request body (kept in memory, capped)."""

    def release_body() -> None:
        """The body was read (once, to be parsed): let go of it, as the request may last
        minutes (a stream); L{body} is empty from now on."""

    def answer(status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]]) -> None:
        """Send a whole JSON answer (its head replaces any staged by begin) and end the response
        (nothing when the client left)."""

    def begin(status: int, phrase: bytes, headers: Sequence[tuple[bytes, Sequence[bytes]]]) -> None:
        """Set the response head; it goes out with the first C{write}."""

    def write(data: bytes) -> None:
        """Send part of the body (C{b""} sends the head alone)."""

    def finish() -> None:
        """End the response."""

    def abort() -> None:
        """Drop the client connection (a body that cannot say it is incomplete)."""

    def register_producer(producer: Any) -> None:
        """Let a push producer be paused and resumed by the client's reading."""

    def unregister_producer() -> None:
        """Undo L{register_producer} (nothing when the client left)."""

    def when_gone(callback: Any) -> None:
        """Call C{callback()} if the client disconnects before the response ended."""


class IUpstream(Interface):
    """The router's client towards pods, as the dispatcher uses it."""

    def request(
        pod: PodEndpoint, scheme: str, method: bytes, uri: bytes, headers: Any, body: bytes | None
    ) -> Any:
        """
        Send C{method uri} to C{pod}.

        @return: a Deferred firing with the pod's L{twisted.web.iweb.IResponse}; cancelling
            it before the answer aborts the request.
        """

    def idle_connections(pod: PodEndpoint) -> int:
        """Idle keep-alive connections pooled for C{pod}."""

    def configure(config: Any) -> None:
        """Take new pool sizes and timeouts (an L{UpstreamConfig<kthena.config.traffic>})."""

    def close() -> Any:
        """Close the pooled connections; a Deferred that fires when they are."""
