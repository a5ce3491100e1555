"""
One completion on its way out of the simulator (L{Generation}), written as the engine's
HTTP server would.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from kthena.sim.engine import SimEngine, SimSequence
from kthena.sim.faults import Faults
from kthena.sim.identity import SimIdentity
from kthena.sim.pd import BootstrapRooms, Role, RoomFetcher
from kthena.sim.request import GenerationRequest
from kthena.webutil import json_bytes, respond_json

log = Logger()


class Server(Protocol):
    """What a generation needs of the simulator's API (L{kthena.sim.api.SimAPI})."""

    engine: SimEngine
    identity: SimIdentity
    faults: Faults
    rooms: BootstrapRooms
    fetch_room: RoomFetcher

    def transfer_params(self, seq: SimSequence) -> dict[str, Any]: ...

    def error(
        self, request: Request, status: int, message: str, param: str | None = None
    ) -> bytes: ...


class Generation:
    """
    One completion on its way out: receives tokens from the engine and writes them as the
    engine's HTTP server would (SSE events or one JSON body), ending the request exactly
    once whatever happens first: the end of generation, a fault, or the client leaving.
    """

    def __init__(
        self, api: Server, request: Request, params: GenerationRequest, request_id: str
    ) -> None:
        self.api = api
        self.request = request
        self.params = params
        self.seq: SimSequence | None = None
        self.pending: Deferred[int] | None = None
        self.gone = False
        self.drop_after = api.faults.drop_after_tokens
        self.id = ("chatcmpl-" if params.chat else "cmpl-") + request_id
        request.notifyFinish().addErrback(self._client_gone)
        if params.stream:
            self._prepare_stream()

    # -- starting

    def start(self, remote_tokens: int) -> None:
        params = self.params
        self.seq = self.api.engine.submit(
            params.prompt_ids,
            params.tokens,
            self,
            lora=params.lora,
            remote_tokens=remote_tokens,
            finish_reason_at_limit=params.finish_reason,
        )
        if params.stream and self.drop_after == 0:
            self._drop()

    def await_bootstrap(self, host: str, port: int, room: int) -> None:
        """SGLang decode leg: wait for the prefill server to finish the room first."""
        self.pending = self.api.fetch_room(host, port, room, self.api.identity.bootstrap_timeout)

        def ready(tokens: int) -> None:
            self.pending = None
            if not self.gone:
                self.start(min(tokens, len(self.params.prompt_ids)))

        def failed(failure: Failure) -> None:
            self.pending = None
            if self.gone or failure.check(CancelledError):
                return
            log.warn(
                "bootstrap room {room} failed: {why}", room=room, why=failure.getErrorMessage()
            )
            self._fail(
                500,
                f"KV transfer from {host}:{port} room {room} failed: {failure.getErrorMessage()}",
            )

        self.pending.addCallbacks(ready, failed)

    # -- SequenceListener

    def token(self, seq: SimSequence, index: int) -> None:
        if index == 0:
            self._prefilled(seq)
        if self.params.stream:
            last = index + 1 == self.params.tokens
            if index == 0 and self.params.chat:
                self.request.write(self._role_event)
            self.request.write(self._token_event(index, last))
            if self.drop_after is not None and index + 1 >= self.drop_after:
                self._drop()
        elif self.drop_after is not None and index + 1 >= self.drop_after:
            self._drop()

    def finished(self, seq: SimSequence) -> None:
        request = self.request
        if self.params.stream:
            if self.params.include_usage:
                usage = self._usage(seq)
                request.write(
                    b"data: "
                    + json_bytes(
                        {
                            "id": self.id,
                            "object": self._object,
                            "created": self._created,
                            "model": self.params.model,
                            "choices": [],
                            "usage": usage,
                        }
                    )
                    + b"\n\n"
                )
            request.write(b"data: [DONE]\n\n")
        else:
            request.write(respond_json(request, 200, self._body(seq)))
        request.finish()

    # -- internals

    def _prefilled(self, seq: SimSequence) -> None:
        bootstrap = self.params.bootstrap
        if bootstrap is not None and self.api.identity.role is Role.PREFILL:
            self.api.rooms.ready(bootstrap[2], seq.prompt_tokens)

    @property
    def _object(self) -> str:
        return "chat.completion.chunk" if self.params.chat else "text_completion"

    def _prepare_stream(self) -> None:
        request = self.request
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-cache")
        request.write(b"")  # the headers go out now, as the engines' servers do
        self._created = int(self.api.engine.clock.seconds())
        usage = ',"usage":null' if self.params.include_usage else ""
        head = json_bytes(
            {
                "id": self.id,
                "object": self._object,
                "created": self._created,
                "model": self.params.model,
            }
        )[:-1]
        if self.params.chat:
            self._role_event = (
                b"data: " + head + b',"choices":[{"index":0,"delta":{"role":"assistant",'
                b'"content":""},"logprobs":null,"finish_reason":null}]' + usage.encode() + b"}\n\n"
            )
            self._event_head = b"data: " + head + b',"choices":[{"index":0,"delta":{"content":'
            self._event_mid = b'},"logprobs":null,"finish_reason":'
        else:
            self._event_head = b"data: " + head + b',"choices":[{"index":0,"text":'
            self._event_mid = b',"logprobs":null,"finish_reason":'
        self._event_tail = b',"stop_reason":null}]' + usage.encode() + b"}\n\n"

    def _piece(self, index: int) -> str:
        echo = self.params.echo
        return echo[index % len(echo)]

    def _token_event(self, index: int, last: bool) -> bytes:
        finish = json.dumps(self.params.finish_reason) if last else "null"
        return (
            self._event_head
            + json_bytes(self._piece(index))
            + self._event_mid
            + finish.encode()
            + self._event_tail
        )

    def _usage(self, seq: SimSequence) -> dict[str, Any]:
        return {
            "prompt_tokens": seq.prompt_tokens,
            "total_tokens": seq.prompt_tokens + seq.generated,
            "completion_tokens": seq.generated,
            "prompt_tokens_details": None,
        }

    def _body(self, seq: SimSequence) -> dict[str, Any]:
        text = "".join(self._piece(i) for i in range(seq.generated))
        choice: dict[str, Any]
        if self.params.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "tool_calls": []},
                "logprobs": None,
                "finish_reason": seq.finish_reason,
                "stop_reason": None,
            }
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": seq.finish_reason,
                "stop_reason": None,
            }
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion" if self.params.chat else "text_completion",
            "created": int(self.api.engine.clock.seconds()),
            "model": self.params.model,
            "choices": [choice],
            "usage": self._usage(seq),
        }
        kv = self.params.kv_transfer_params
        if kv and kv.get("do_remote_decode"):
            body["kv_transfer_params"] = self.api.transfer_params(seq)
        return body

    def _fail(self, status: int, message: str) -> None:
        request = self.request
        if self.params.stream:
            # Headers are out: an error event then the end, as vLLM does mid-stream.
            error = self.api.identity.error_body(status, message)
            request.write(b"data: " + json_bytes(error) + b"\n\ndata: [DONE]\n\n")
        else:
            request.write(self.api.error(request, status, message))
        request.finish()

    def _drop(self) -> None:
        """Fault: cut the connection without ending the response."""
        self._abort()
        self.gone = True
        assert self.request.channel is not None
        # loseConnection, not abortConnection: the token events written so far are still in
        # the transport's buffer and must reach the client before the cut.
        self.request.channel.transport.loseConnection()  # type: ignore[union-attr]

    def _abort(self) -> None:
        if self.seq is not None:
            self.api.engine.abort(self.seq)
        if self.pending is not None:
            self.pending.cancel()

    def _client_gone(self, failure: Failure) -> None:
        if not self.gone:
            self.gone = True
            self._abort()
