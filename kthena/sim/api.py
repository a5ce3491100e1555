"""
The simulator's HTTP API: the OpenAI endpoints, LoRA management, C{/tokenize},
C{/health} and C{/metrics} as vLLM and SGLang serve them, plus the simulator's own admin
endpoints under C{/sim/} (fault injection, SGLang bootstrap rooms, the last requests
received).
"""

from __future__ import annotations

import json
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from kthena.sim import metrics
from kthena.sim.engine import SimEngine, SimSequence
from kthena.sim.faults import FaultDice, Faults
from kthena.sim.pd import SGLANG_DEFAULT_BOOTSTRAP_PORT, BootstrapRooms, Role
from kthena.sim.tokenizer import echo_pieces, message_text, render_chat, token_ids, tokenize
from kthena.webutil import json_bytes, respond_json

log = Logger()

RECEIVED_KEPT = 64
"""Generation requests kept for C{GET /sim/requests} (what a router sent this pod)."""

RoomFetcher = Callable[[str, int, int, float], Deferred[int]]
"""Asks a prefill simulator for a bootstrap room: (host, port, room, timeout) -> tokens."""

_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class ApiError(Exception):
    """A request the engine refuses, with the status and message it would send."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


@dataclass(frozen=True, slots=True)
class SimIdentity:
    """Who this simulator says it is, in responses, errors and transfer parameters."""

    model: str
    dialect: metrics.Dialect
    role: Role = Role.BOTH
    engine_id: str = "kthena-sim"
    host: str = "127.0.0.1"
    port: int = 8000
    output_tokens: int = 16
    bootstrap_timeout: float = 30.0
    created: int = 0

    def error_body(self, status: int, message: str, param: str | None = None) -> object:
        info = {
            "message": message,
            "type": _ERROR_TYPES.get(status, "Error"),
            "param": param,
            "code": status,
        }
        if self.dialect is metrics.SGLANG:
            return {"object": "error", **info}
        return {"error": info}


@dataclass(slots=True)
class GenerationRequest:
    """A parsed completion request, ready for the engine."""

    chat: bool
    model: str
    lora: str | None
    prompt_ids: list[int]
    echo: list[str]
    tokens: int
    finish_reason: str
    stream: bool
    include_usage: bool
    kv_transfer_params: dict[str, Any] | None
    bootstrap: tuple[str, int, int] | None


def _whole(body: dict[str, Any], key: str, minimum: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ApiError(400, f"{key} must be an integer >= {minimum}, got {value!r}", key)
    return value


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(400, f"{key} must be a boolean", key)
    return value


def _completions_prompt(body: dict[str, Any]) -> tuple[list[int], str]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return token_ids(tokenize(prompt)), prompt
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)
    ):
        return list(prompt), ""
    raise ApiError(400, "prompt must be a string, one string in a list, or token ids", "prompt")


def _chat_prompt(body: dict[str, Any]) -> tuple[list[int], str]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    if not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "every message must be an object", "messages")
    try:
        rendered = render_chat(messages)
        last = message_text(messages[-1], len(messages) - 1)
    except ValueError as e:
        raise ApiError(400, str(e), "messages") from e
    return token_ids(tokenize(rendered)), last


def parse_generation(
    body: object, chat: bool, engine: SimEngine, identity: SimIdentity
) -> GenerationRequest:
    """
    Validate a completion request as the engine would.

    @raise ApiError: 400 for a malformed request, 404 for a model not served here.
    """
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "model must be a string", "model")
    if model == identity.model:
        lora = None
    elif model in engine.loras:
        lora = model
    else:
        raise ApiError(404, f"The model `{model}` does not exist.", "model")
    if _whole(body, "n", 1) not in (None, 1):
        raise ApiError(400, "kthena-sim supports n=1 only", "n")
    prompt_ids, source = _chat_prompt(body) if chat else _completions_prompt(body)
    limit = _whole(body, "max_completion_tokens", 1) if chat else None
    if limit is None:
        limit = _whole(body, "max_tokens", 1)
    max_len = engine.config.max_model_len
    room = max_len - len(prompt_ids)
    if room < 1 or (limit is not None and limit > room):
        raise ApiError(
            400,
            f"This model's maximum context length is {max_len} tokens. However, you "
            f"requested {len(prompt_ids) + (limit or 0)} tokens ({len(prompt_ids)} in the "
            f"messages, {limit or 0} in the completion). Please reduce the length of the "
            "messages or completion.",
        )
    natural = min(identity.output_tokens, room)
    if limit is not None and (limit < natural or _flag(body, "ignore_eos")):
        tokens, finish = limit, "length"
    else:
        tokens, finish = natural, "stop"
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    include_usage = bool(stream and options and _flag(options, "include_usage"))
    kv = body.get("kv_transfer_params")
    if kv is not None and not isinstance(kv, dict):
        raise ApiError(400, "kv_transfer_params must be an object", "kv_transfer_params")
    return GenerationRequest(
        chat=chat,
        model=model,
        lora=lora,
        prompt_ids=prompt_ids,
        echo=echo_pieces(source),
        tokens=tokens,
        finish_reason=finish,
        stream=stream,
        include_usage=include_usage,
        kv_transfer_params=kv,
        bootstrap=_bootstrap(body),
    )


def _bootstrap(body: dict[str, Any]) -> tuple[str, int, int] | None:
    room = body.get("bootstrap_room")
    if room is None:
        return None
    host = body.get("bootstrap_host")
    port = body.get("bootstrap_port")
    if port is None:
        port = SGLANG_DEFAULT_BOOTSTRAP_PORT
    if not isinstance(room, int) or isinstance(room, bool) or room < 0:
        raise ApiError(400, "bootstrap_room must be an integer >= 0", "bootstrap_room")
    if not isinstance(host, str) or not host:
        raise ApiError(400, "bootstrap_host must be a non-empty string", "bootstrap_host")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ApiError(400, "bootstrap_port must be a TCP port", "bootstrap_port")
    return host, port, room


class SimAPI(Resource):
    """One leaf resource that dispatches on path and method (a model server has few)."""

    isLeaf = True

    def __init__(
        self,
        engine: SimEngine,
        identity: SimIdentity,
        registry: CollectorRegistry,
        faults: Faults,
        dice: FaultDice,
        rooms: BootstrapRooms,
        fetch_room: RoomFetcher,
    ) -> None:
        super().__init__()
        self.engine = engine
        self.identity = identity
        self.registry = registry
        self.faults = faults
        self.dice = dice
        self.rooms = rooms
        self.fetch_room = fetch_room
        self._block_ids = 0
        self.received: deque[dict[str, object]] = deque(maxlen=RECEIVED_KEPT)
        """The last generation requests' paths and JSON bodies, oldest first."""
        self._routes: dict[bytes, dict[bytes, Callable[[Request], bytes | int]]] = {
            b"/v1/chat/completions": {b"POST": self._chat},
            b"/v1/completions": {b"POST": self._completions},
            b"/v1/models": {b"GET": self._models},
            b"/v1/load_lora_adapter": {b"POST": self._load_lora},
            b"/v1/unload_lora_adapter": {b"POST": self._unload_lora},
            b"/health": {b"GET": self._health},
            b"/tokenize": {b"POST": self._tokenize},
            b"/metrics": {b"GET": self._metrics},
            b"/sim/requests": {b"GET": self._get_received, b"DELETE": self._clear_received},
            b"/sim/faults": {
                b"GET": self._get_faults,
                b"PUT": self._set_faults,
                b"POST": self._set_faults,
                b"DELETE": self._reset_faults,
            },
        }

    def render(self, request: Request) -> bytes | int:
        path = request.path
        methods = self._routes.get(path)
        if methods is None and path.startswith(b"/sim/bootstrap/"):
            methods = {b"GET": self._bootstrap_room}
        if methods is None:
            return self._error(request, 404, f"Not Found: {path.decode(errors='replace')}")
        handler = methods.get(request.method)
        if handler is None:
            request.setHeader(b"allow", b", ".join(methods))
            return self._error(request, 405, "Method Not Allowed")
        try:
            return handler(request)
        except ApiError as e:
            return self._error(request, e.status, e.message, e.param)

    def _error(
        self, request: Request, status: int, message: str, param: str | None = None
    ) -> bytes:
        return respond_json(request, status, self.identity.error_body(status, message, param))

    @staticmethod
    def _body(request: Request) -> object:
        assert request.content is not None
        raw = request.content.read()
        try:
            return json.loads(raw)
        except ValueError as e:
            raise ApiError(400, f"Invalid JSON in request body: {e}") from e

    # -- generation

    def _chat(self, request: Request) -> bytes | int:
        return self._generate(request, chat=True)

    def _completions(self, request: Request) -> bytes | int:
        return self._generate(request, chat=False)

    def _generate(self, request: Request, chat: bool) -> bytes | int:
        body = self._body(request)
        self.received.append({"path": request.path.decode(), "body": body})
        params = parse_generation(body, chat, self.engine, self.identity)
        if self.dice.abort():
            assert request.channel is not None
            request.channel.transport.abortConnection()  # type: ignore[union-attr]
            return NOT_DONE_YET
        if self.dice.error():
            status = self.faults.error_status
            return self._error(request, status, f"kthena-sim injected fault ({status})")
        remote = self._remote_tokens(params)
        header_id = request.getHeader(b"x-request-id")
        request_id = header_id.decode() if header_id else secrets.token_hex(8)
        generation = Generation(self, request, params, request_id)
        if params.bootstrap is not None and self.identity.role is Role.DECODE:
            generation.await_bootstrap(*params.bootstrap)
        else:
            generation.start(remote)
        return NOT_DONE_YET

    def _remote_tokens(self, params: GenerationRequest) -> int:
        """Prompt tokens a remote prefill delivers (vLLM NIXL decode leg)."""
        kv = params.kv_transfer_params
        if not kv:
            return 0
        role = self.identity.role
        if kv.get("do_remote_decode"):
            if not role.prefills:
                raise ApiError(400, "this instance is not a KV producer (role=decode)")
            return 0
        if kv.get("do_remote_prefill"):
            if not role.decodes:
                raise ApiError(400, "this instance is not a KV consumer (role=prefill)")
            blocks = kv.get("remote_block_ids")
            if not isinstance(blocks, list):
                raise ApiError(400, "kv_transfer_params.remote_block_ids must be a list")
            return len(blocks) * self.engine.config.block_size
        return 0

    def transfer_params(self, seq: SimSequence) -> dict[str, Any]:
        """What a prefill leg returns for its decode leg to pull the KV blocks."""
        count = -(-seq.prompt_tokens // self.engine.config.block_size)
        first = self._block_ids
        self._block_ids += count
        return {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "remote_block_ids": list(range(first, first + count)),
            "remote_engine_id": self.identity.engine_id,
            "remote_host": self.identity.host,
            "remote_port": self.identity.port,
            "tp_size": 1,
        }

    # -- models and adapters

    def _models(self, request: Request) -> bytes:
        identity = self.identity
        owner = identity.dialect.name
        data = [
            {
                "id": identity.model,
                "object": "model",
                "created": identity.created,
                "owned_by": owner,
                "root": identity.model,
                "parent": None,
                "max_model_len": self.engine.config.max_model_len,
            }
        ]
        data.extend(
            {
                "id": name,
                "object": "model",
                "created": identity.created,
                "owned_by": owner,
                "root": path,
                "parent": identity.model,
                "max_model_len": None,
            }
            for name, path in self.engine.loras.items()
        )
        return respond_json(request, 200, {"object": "list", "data": data})

    def _lora_name(self, request: Request) -> tuple[str, dict[str, Any]]:
        body = self._body(request)
        if not isinstance(body, dict) or not isinstance(body.get("lora_name"), str):
            raise ApiError(400, "lora_name must be a string", "lora_name")
        return body["lora_name"], body

    def _load_lora(self, request: Request) -> bytes:
        name, body = self._lora_name(request)
        path = body.get("lora_path")
        if not isinstance(path, str) or not path:
            raise ApiError(400, "lora_path must be a non-empty string", "lora_path")
        try:
            self.engine.load_lora(name, path)
        except ValueError as e:
            raise ApiError(400, str(e), "lora_name") from e
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return f"Success: LoRA adapter '{name}' added successfully.".encode()

    def _unload_lora(self, request: Request) -> bytes:
        name, _ = self._lora_name(request)
        try:
            self.engine.unload_lora(name)
        except KeyError as e:
            raise ApiError(404, f"The lora adapter '{name}' cannot be found.", "lora_name") from e
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return f"Success: LoRA adapter '{name}' removed successfully.".encode()

    # -- the rest of the engine API

    def _health(self, request: Request) -> bytes:
        return b""

    def _tokenize(self, request: Request) -> bytes:
        body = self._body(request)
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        if "messages" in body:
            messages = body["messages"]
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise ApiError(400, "messages must be a list of objects", "messages")
            try:
                # vLLM's TokenizeChatRequest defaults add_generation_prompt to true.
                defaults = {"add_generation_prompt": True}
                text = render_chat(messages, _flag(defaults | body, "add_generation_prompt"))
            except ValueError as e:
                raise ApiError(400, str(e), "messages") from e
        elif isinstance(body.get("prompt"), str):
            text = body["prompt"]
        else:
            raise ApiError(400, "give prompt (a string) or messages", "prompt")
        ids = token_ids(tokenize(text))
        return respond_json(
            request,
            200,
            {
                "count": len(ids),
                "max_model_len": self.engine.config.max_model_len,
                "tokens": ids,
                "token_strs": None,
            },
        )

    def _metrics(self, request: Request) -> bytes:
        if self.faults.metrics_down:
            return self._error(request, 503, "kthena-sim injected fault: /metrics is down")
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return metrics.render(self.registry)

    # -- simulator admin

    def _get_received(self, request: Request) -> bytes:
        return respond_json(request, 200, {"requests": list(self.received)})

    def _clear_received(self, request: Request) -> bytes:
        self.received.clear()
        return respond_json(request, 200, {"requests": []})

    def _get_faults(self, request: Request) -> bytes:
        return respond_json(request, 200, self.faults.as_dict())

    def _set_faults(self, request: Request) -> bytes:
        try:
            self.faults.update(self._body(request))
        except ValueError as e:
            raise ApiError(400, str(e)) from e
        self.engine.config.slowdown = self.faults.slowdown
        log.info("faults now {faults}", faults=self.faults.as_dict())
        return self._get_faults(request)

    def _reset_faults(self, request: Request) -> bytes:
        self.faults.reset()
        self.engine.config.slowdown = self.faults.slowdown
        return self._get_faults(request)

    def _bootstrap_room(self, request: Request) -> bytes | int:
        try:
            room = int(request.path.rsplit(b"/", 1)[1])
            timeout = float((request.args or {}).get(b"timeout", [b"30"])[0])
        except ValueError as e:
            raise ApiError(400, "room and timeout must be numbers") from e
        waiting = self.rooms.wait(room, timeout)
        request.notifyFinish().addErrback(lambda _: waiting.cancel())

        def found(tokens: int) -> None:
            request.write(respond_json(request, 200, {"room": room, "prompt_tokens": tokens}))
            request.finish()

        def missing(failure: Failure) -> None:
            if failure.check(CancelledError):
                return
            failure.trap(TimeoutError)
            request.write(self._error(request, 404, f"bootstrap room {room} not prefilled"))
            request.finish()

        waiting.addCallbacks(found, missing)
        return NOT_DONE_YET


class Generation:
    """
    One completion on its way out: receives tokens from the engine and writes them as the
    engine's HTTP server would (SSE events or one JSON body), ending the request exactly
    once whatever happens first: the end of generation, a fault, or the client leaving.
    """

    def __init__(
        self, api: SimAPI, request: Request, params: GenerationRequest, request_id: str
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
            request.write(self.api._error(request, status, message))
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
