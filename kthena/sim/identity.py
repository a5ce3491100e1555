"""
Who a simulator says it is (model, engine dialect, role, address) and how it refuses a
request: the error bodies vLLM and SGLang send, by status.
"""

from __future__ import annotations

from dataclasses import dataclass

from kthena.sim import metrics
from kthena.sim.pd import Role

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
