"""
A twisted.web request as the pipeline sees it (L{IExchange}): the one place that knows
twisted.web's C{Request}, so that the HTTP layer under the pipeline can be replaced.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.server import Request
from zope.interface import implementer

from kthena.interfaces import IExchange
from kthena.webutil import JSON_TYPE


@implementer(IExchange)
class WebExchange:
    """
    @ivar gone: the client disconnected before the response ended.
    """

    def __init__(self, request: Request) -> None:
        self.request = request
        self.method: bytes = request.method
        self.path: bytes = request.path
        self.uri: bytes = request.uri
        self.protocol = request.clientproto.decode("latin-1")
        self.headers: Headers = request.requestHeaders
        self.too_large: bool = getattr(request, "too_large", False)
        self.gone = False
        self._gone_callbacks: list[Callable[[], None]] = []
        request.notifyFinish().addCallbacks(self._finished, self._lost)

    @property
    def client_host(self) -> str | None:
        host: str | None = getattr(self.request.getClientAddress(), "host", None)
        return host

    @property
    def started(self) -> bool:
        return bool(self.request.startedWriting)

    def header(self, name: bytes) -> bytes | None:
        value: bytes | None = self.request.getHeader(name)
        return value

    def body(self) -> bytes:
        content = self.request.content
        return content.getvalue() if content is not None else b""

    def release_body(self) -> None:
        if self.request.content is not None:
            self.request.content = io.BytesIO()

    def answer(self, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]]) -> None:
        if self.gone:
            return
        request = self.request
        # A head staged by begin() (the pod's, whose body then broke) is not this answer's.
        request.responseHeaders = Headers()
        request.setResponseCode(status)
        request.setHeader(b"content-type", JSON_TYPE)
        request.setHeader(b"content-length", b"%d" % len(body))
        for name, value in headers:
            request.setHeader(name, value)
        request.write(body)
        request.finish()

    def begin(
        self, status: int, phrase: bytes, headers: Sequence[tuple[bytes, Sequence[bytes]]]
    ) -> None:
        request = self.request
        request.setResponseCode(status, phrase)
        out = request.responseHeaders
        for name, values in headers:
            out.setRawHeaders(name, values)

    def write(self, data: bytes) -> None:
        if not self.gone:
            self.request.write(data)

    def finish(self) -> None:
        if not self.gone:
            self.request.finish()

    def abort(self) -> None:
        channel = self.request.channel
        if channel is not None and channel.transport is not None:
            channel.transport.abortConnection()  # type: ignore[attr-defined]

    def register_producer(self, producer: Any) -> None:
        self.request.registerProducer(producer, True)

    def unregister_producer(self) -> None:
        if not self.gone:  # after a disconnect twisted.web's channel is gone: it would raise
            self.request.unregisterProducer()

    def when_gone(self, callback: Callable[[], None]) -> None:
        self._gone_callbacks.append(callback)

    def _finished(self, result: None) -> None:
        # The callbacks hold the request's run, which holds this exchange: let go now,
        # so that a request's objects are freed by reference counting, not by the
        # cyclic garbage collector (twice the collections under load otherwise).
        self._gone_callbacks.clear()

    def _lost(self, reason: Failure) -> None:
        self.gone = True
        callbacks, self._gone_callbacks = self._gone_callbacks, []
        for callback in callbacks:
            callback()
