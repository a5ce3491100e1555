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
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet.defer import CancelledError, TimeoutError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from kthena.sim import metrics
from kthena.sim.engine import SimEngine, SimSequence
from kthena.sim.faults import FaultDice, Faults
from kthena.sim.generation import Generation
from kthena.sim.identity import ApiError, SimIdentity
from kthena.sim.pd import BootstrapRooms, Role, RoomFetcher
from kthena.sim.request import GenerationRequest, flag, parse_generation
from kthena.sim.tokenizer import render_chat, token_ids, tokenize
from kthena.webutil import respond_json

log = Logger()

RECEIVED_KEPT = 64
"""Generation requests kept for C{GET /sim/requests} (what a router sent this pod)."""


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
            return self.error(request, 404, f"Not Found: {path.decode(errors='replace')}")
        handler = methods.get(request.method)
        if handler is None:
            request.setHeader(b"allow", b", ".join(methods))
            return self.error(request, 405, "Method Not Allowed")
        try:
            return handler(request)
        except ApiError as e:
            return self.error(request, e.status, e.message, e.param)

    def error(self, request: Request, status: int, message: str, param: str | None = None) -> bytes:
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
            return self.error(request, status, f"kthena-sim injected fault ({status})")
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
                text = render_chat(messages, flag(defaults | body, "add_generation_prompt"))
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
            return self.error(request, 503, "kthena-sim injected fault: /metrics is down")
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
            request.write(self.error(request, 404, f"bootstrap room {room} not prefilled"))
            request.finish()

        waiting.addCallbacks(found, missing)
        return NOT_DONE_YET
