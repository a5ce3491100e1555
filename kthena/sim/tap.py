"""
C{twistd kthena-sim}: run one simulated vLLM or SGLang model server.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from kthena.sim.engine import EngineConfig
from kthena.sim.faults import Faults
from kthena.sim.pd import Role
from kthena.sim.service import DEFAULT_PORTS, SimConfig, SimService


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError(f"{value} is not a whole number >= 1")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"{value} is not a whole number >= 0")
    return number


def _non_negative_float(value: str) -> float:
    number = float(value)
    if number < 0:
        raise ValueError(f"{value} is not a number >= 0")
    return number


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Serve one simulated model server: the OpenAI API, /metrics, LoRA management and "
        "prefill/decode roles as vLLM or SGLang show them to a router, on a simulated clock "
        "of queueing, prefill and decode."
    )
    _defaults = EngineConfig()
    optParameters: list[list[Any]] = [
        ["engine", None, "vllm", "Engine to imitate: vllm or sglang."],
        ["model", None, "sim-model", "Served model name."],
        [
            "listen",
            None,
            None,
            "Endpoint to listen on (default tcp:8000 for vLLM, tcp:30000 for SGLang).",
        ],
        [
            "max-num-seqs",
            None,
            _defaults.max_num_seqs,
            "Most sequences running at once.",
            _positive_int,
        ],
        [
            "prefill-per-token",
            None,
            _defaults.prefill_per_token,
            "Seconds of prefill per uncached prompt token.",
            _non_negative_float,
        ],
        ["itl", None, _defaults.itl, "Seconds between output tokens.", _non_negative_float],
        ["kv-blocks", None, _defaults.kv_blocks, "KV-cache blocks.", _positive_int],
        ["block-size", None, _defaults.block_size, "Tokens per KV-cache block.", _positive_int],
        [
            "prefix-cache-blocks",
            None,
            None,
            "Prompt blocks kept in the prefix cache (default: --kv-blocks; 0 disables).",
            _non_negative_int,
        ],
        ["max-model-len", None, _defaults.max_model_len, "Context length.", _positive_int],
        ["max-loras", None, _defaults.max_loras, "LoRA adapter slots.", _non_negative_int],
        [
            "output-tokens",
            None,
            16,
            "Tokens generated before the model stops by itself (max_tokens caps it).",
            _positive_int,
        ],
        ["role", None, "both", "PD role: prefill, decode or both."],
        ["engine-id", None, None, "Engine id given to decode legs (default: random)."],
        ["advertise-host", None, None, "Host given to decode legs (default: from --listen)."],
        [
            "advertise-port",
            None,
            None,
            "Port given to decode legs (default: from --listen).",
            _positive_int,
        ],
        [
            "bootstrap-listen",
            None,
            None,
            "Extra endpoint serving SGLang bootstrap rooms (e.g. tcp:8998).",
        ],
        [
            "bootstrap-timeout",
            None,
            30.0,
            "Seconds a decode leg waits for its prefill.",
            _non_negative_float,
        ],
        ["gpus", None, 0, "Simulated GPUs whose DCGM gauges /metrics shows.", _non_negative_int],
        ["gpu-memory-mib", None, 81_920, "Memory of each simulated GPU.", _positive_int],
        ["seed", None, None, "Seed of the fault dice.", int],
        ["error-rate", None, 0.0, "Share of requests failing with --error-status.", float],
        ["error-status", None, 500, "Status of injected errors.", int],
        ["abort-rate", None, 0.0, "Share of requests dropped before headers.", float],
        [
            "drop-after-tokens",
            None,
            None,
            "Drop connections after this many tokens.",
            _non_negative_int,
        ],
        ["slowdown", None, 1.0, "Multiply prefill and decode time.", float],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["loras"] = {}

    def opt_lora(self, value: str) -> None:
        """Preload a LoRA adapter, NAME or NAME=PATH (repeatable)."""
        name, _, path = value.partition("=")
        if not name:
            raise usage.UsageError("--lora needs NAME or NAME=PATH")
        self["loras"][name] = path or f"/models/{name}"

    def postOptions(self) -> None:
        if self["engine"] not in DEFAULT_PORTS:
            raise usage.UsageError(f"--engine must be one of {', '.join(DEFAULT_PORTS)}")
        try:
            self["role"] = Role(self["role"])
        except ValueError as e:
            raise usage.UsageError("--role must be prefill, decode or both") from e
        faults = Faults()
        try:
            faults.update(
                {
                    "error_rate": self["error-rate"],
                    "error_status": self["error-status"],
                    "abort_rate": self["abort-rate"],
                    "drop_after_tokens": self["drop-after-tokens"],
                    "slowdown": self["slowdown"],
                }
            )
        except ValueError as e:
            raise usage.UsageError(str(e)) from e
        if len(self["loras"]) > self["max-loras"]:
            raise usage.UsageError("more --lora adapters than --max-loras slots")
        self["faults"] = faults

    def config(self) -> SimConfig:
        prefix_blocks = self["prefix-cache-blocks"]
        engine = EngineConfig(
            max_num_seqs=self["max-num-seqs"],
            prefill_per_token=self["prefill-per-token"],
            itl=self["itl"],
            kv_blocks=self["kv-blocks"],
            block_size=self["block-size"],
            prefix_cache_blocks=self["kv-blocks"] if prefix_blocks is None else prefix_blocks,
            max_model_len=self["max-model-len"],
            max_loras=self["max-loras"],
        )
        config = SimConfig(
            engine=self["engine"],
            model=self["model"],
            listen=self["listen"],
            engine_config=engine,
            role=self["role"],
            advertise_host=self["advertise-host"],
            advertise_port=self["advertise-port"],
            output_tokens=self["output-tokens"],
            loras=dict(self["loras"]),
            gpus=self["gpus"],
            gpu_memory_mib=self["gpu-memory-mib"],
            bootstrap_timeout=self["bootstrap-timeout"],
            bootstrap_listen=self["bootstrap-listen"],
            seed=self["seed"],
            faults=self["faults"],
        )
        if self["engine-id"]:
            config.engine_id = self["engine-id"]
        return config


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    return SimService(options.config(), reactor)  # type: ignore[arg-type]
