"""
What a worker is told by its parent, and the config it runs with.

The parent passes one environment variable, C{KTHENA_WORKER}, to each worker it starts
(C{index=0,fd=3,family=2,admin=/run/...}): its index, the inherited listening socket and
its address family, and where its private admin listener goes. The worker reads the
same config file as the parent, then L{worker_config} changes what must differ in a
worker, on every load (so that a reload does not see those changes as a new config):

  - its admin listener (C{/metrics} and C{/debug} together) moves to the private Unix
    socket the parent reads, and its debug endpoints answer local clients (the parent
    applies the config's debug rules to whoever asks it);
  - the demo's simulated pods run once, in the parent, not in every worker.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass

from kthena.config.observability import LOOPBACK_NETWORKS
from kthena.config.router import RouterConfig

ENVIRONMENT = "KTHENA_WORKER"

INHERITED_FD = 3
"""The listening socket's descriptor number in a worker (after stdin, stdout, stderr)."""


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    index: int
    fd: int
    family: int
    admin: str

    def encode(self) -> str:
        return f"index={self.index},fd={self.fd},family={self.family},admin={self.admin}"

    @classmethod
    def decode(cls, value: str) -> WorkerSpec:
        """@raise ValueError: C{value} is not what L{encode} makes."""
        fields = dict(part.split("=", 1) for part in value.split(",", 3))
        return cls(int(fields["index"]), int(fields["fd"]), int(fields["family"]), fields["admin"])

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> WorkerSpec | None:
        """This process's spec when a parent started it as a worker; C{None} otherwise."""
        value = environ.get(ENVIRONMENT)
        return None if value is None else cls.decode(value)


def worker_config(config: RouterConfig, spec: WorkerSpec) -> RouterConfig:
    """C{config} as worker C{spec} runs it (see the module docstring)."""
    observability = config.observability
    metrics = observability.metrics
    debug = dataclasses.replace(
        observability.debug, port=metrics.port, allow=LOOPBACK_NETWORKS, token=None
    )
    return dataclasses.replace(
        config,
        admin_listen=f"unix:{spec.admin}",
        debug_listen=None,
        observability=dataclasses.replace(observability, debug=debug),
        simulators=(),
    )
