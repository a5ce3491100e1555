"""
Lists and watches against the Kubernetes API, on the reactor (treq over an L{Agent}
with the API's TLS: its CA, or the system's; a client certificate when the user has one),
never in a thread.

A watch is one long response of JSON objects, one a line (C{{"type": ..., "object":
...}}); L{KubeClient.watch} hands each to a callback as it arrives and ends when the
server ends the response (its C{timeoutSeconds}), when nothing at all arrived for
C{idle_timeout} (a half-open connection: a NAT or a load balancer dropped it without a
word), or when the watch is stopped.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    PrivateCertificate,
    optionsForClientTLS,
    platformTrust,
)
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IPolicyForHTTPS, IResponse
from zope.interface import implementer

from kthena.deferreds import stopping
from kthena.interfaces import IServerReactor
from kthena.podclient import BodyCollector
from kthena.sources.kubeaccess import KubeAccess, TokenFile
from kthena.webutil import json_loads

MAX_LINE = 16 * 1024 * 1024
"""A watch event larger than this (a pod's object is a few kB) ends the watch."""
MAX_LIST = 256 * 1024 * 1024
"""A list response larger than this is refused (page it with C{limit} instead)."""
MAX_STATUS = 64 * 1024
"""An error's Status object is read up to this size."""


class KubeError(Exception):
    """
    The API answered with an error status (its C{Status} object's reason and message),
    or a watch broke.

    @ivar code: the HTTP status (410: the resourceVersion is too old: list again).
    """

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(f"{code} {reason}: {message}" if message else f"{code} {reason}")
        self.code = code
        self.reason = reason


class WatchIdleError(Exception):
    """Nothing arrived on a watch for its idle timeout: the connection is presumed dead."""


@implementer(IPolicyForHTTPS)
class _APIPolicy:
    """
    The API's TLS: its CA (or the system's), a client certificate if the user has one;
    the certificates are read once, not for every connection.
    """

    def __init__(self, access: KubeAccess) -> None:
        self.insecure = access.insecure
        self.client: PrivateCertificate | None = None
        if access.client_certificate is not None:
            certificate, key = access.client_certificate
            self.client = PrivateCertificate.loadPEM(certificate + b"\n" + key)
        self.trust = platformTrust() if access.ca is None else Certificate.loadPEM(access.ca)

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        client = self.client
        if self.insecure:
            options = CertificateOptions(
                verify=False,
                privateKey=None if client is None else client.privateKey.original,
                certificate=None if client is None else client.original,
            )
            return _Unverified(options)
        creator: IOpenSSLClientConnectionCreator = optionsForClientTLS(
            hostname.decode("ascii"), trustRoot=self.trust, clientCertificate=client
        )
        return creator


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """C{insecure-skip-tls-verify}: TLS without checking whose certificate it is."""

    def __init__(self, options: CertificateOptions) -> None:
        self.options = options

    def clientConnectionForTLS(self, tlsProtocol: Any) -> Any:
        from OpenSSL.SSL import Connection

        connection = Connection(self.options.getContext(), None)
        connection.set_app_data(tlsProtocol)
        return connection


class KubeClient:
    """One API server, its credentials, a pool of keep-alive connections."""

    def __init__(self, reactor: IServerReactor, access: KubeAccess) -> None:
        self.reactor = reactor
        self.access = access
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        agent = Agent(reactor, contextFactory=_APIPolicy(access), pool=self.pool)
        self.http = HTTPClient(agent)
        self._token_file = None if access.token_file is None else TokenFile(access.token_file)

    def _headers(self) -> dict[bytes | str, list[bytes | str]]:
        headers: dict[bytes | str, list[bytes | str]] = {
            b"accept": [b"application/json"],
            b"user-agent": [b"kthena-router"],
        }
        token = self.access.token
        if self._token_file is not None:
            token = self._token_file.current()
        if token:
            headers[b"authorization"] = [b"Bearer " + token.encode("ascii")]
        return headers

    def _url(self, path: str) -> str:
        return self.access.server + path

    async def get(self, path: str, params: Mapping[str, str], timeout: float) -> dict[str, Any]:
        """The JSON object at C{path}; L{KubeError} for an error status."""
        response: IResponse = await self.http.get(
            self._url(path), params=dict(params), headers=self._headers(), timeout=timeout
        )
        body = await _read(response, MAX_LIST)
        if response.code != 200:
            raise _status_error(response.code, body)
        value = json_loads(body)
        if not isinstance(value, dict):
            raise KubeError(response.code, "Malformed", "the answer is not a JSON object")
        return value

    async def watch(
        self,
        path: str,
        params: Mapping[str, str],
        on_event: Callable[[dict[str, Any]], None],
        idle_timeout: float,
        on_open: Callable[[], None] = lambda: None,
    ) -> None:
        """
        Watch C{path}: C{on_open} is told when the server accepted the watch, C{on_event}
        gets each event object as it arrives. Returns when the server ends the watch;
        raises L{KubeError} for an error status, L{WatchIdleError} when it fell silent.
        Cancelling it closes the connection.
        """
        response: IResponse = await self.http.get(
            self._url(path),
            params={**params, "watch": "1"},
            headers=self._headers(),
            timeout=idle_timeout,
            unbuffered=True,
        )
        if response.code != 200:
            raise _status_error(response.code, await _read(response, MAX_STATUS))
        on_open()
        lines = _Lines(self.reactor, on_event, idle_timeout)
        response.deliverBody(lines)
        await lines.done

    async def close(self) -> None:
        await self.pool.closeCachedConnections()


async def _read(response: IResponse, limit: int) -> bytes:
    """The body, read up to C{limit} bytes and never more (the connection is cut past it)."""
    collector = BodyCollector(limit)
    response.deliverBody(collector)
    try:
        body: bytes = await collector.done
    except ValueError as error:
        raise KubeError(response.code, "TooLarge", str(error)) from error
    return body


def _status_error(code: int, body: bytes) -> KubeError:
    """The API's C{Status} object as an error (a bare status when the body is not one)."""
    try:
        status = json_loads(body)
    except ValueError:
        status = None
    if isinstance(status, dict):
        return KubeError(code, str(status.get("reason") or ""), str(status.get("message") or ""))
    return KubeError(code, "", "")


class _Lines(Protocol):
    """A watch's body, cut into lines, each parsed and handed on; idle for too long, cut."""

    def __init__(
        self,
        clock: IServerReactor,
        on_event: Callable[[dict[str, Any]], None],
        idle_timeout: float,
    ) -> None:
        self.clock = clock
        self.on_event = on_event
        self.idle_timeout = idle_timeout
        self.done: Deferred[None] = stopping(self._abort)
        self._pending = b""
        self._idle: IDelayedCall | None = None
        self._cut: IDelayedCall | None = None
        self._failure: Failure | None = None

    def connectionMade(self) -> None:
        self._idle = self.clock.callLater(self.idle_timeout, self._fell_silent)

    def dataReceived(self, data: bytes) -> None:
        if self._failure is not None:
            return
        if self._idle is not None:
            self._idle.reset(self.idle_timeout)
        data = self._pending + data
        *lines, self._pending = data.split(b"\n")
        if len(self._pending) > MAX_LINE:
            self._fail(KubeError(200, "TooLarge", "a watch event over the size limit"))
            return
        for line in lines:
            if not line.strip():
                continue
            try:
                event = json_loads(line)
            except ValueError:
                self._fail(KubeError(200, "Malformed", "a watch line is not JSON"))
                return
            if not isinstance(event, dict):
                self._fail(KubeError(200, "Malformed", "a watch event is not an object"))
                return
            try:
                self.on_event(event)
            except Exception as error:  # the watcher's verdict on the event (a 410, say)
                self._fail(error)
                return
            if self._failure is not None or self.done.called:
                return

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        for timer in (self._idle, self._cut):
            if timer is not None and timer.active():
                timer.cancel()
        self._idle = self._cut = None
        if self.done.called:
            return
        if self._failure is not None:
            self.done.errback(self._failure)
        elif isinstance(reason.value, ResponseDone | PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)

    def _fell_silent(self) -> None:
        self._idle = None
        self._fail(WatchIdleError(f"nothing arrived for {self.idle_timeout}s"))

    def _fail(self, error: Exception) -> None:
        """
        End the watch with C{error}. The connection is cut on the next turn unless the
        body ends first: a server ending the watch after the event that failed it (an
        C{ERROR} event) leaves a connection the pool keeps, which an abort would break
        under the next request that takes it.
        """
        self._failure = Failure(error)
        self._cut = self.clock.callLater(0, self._abort)

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]
