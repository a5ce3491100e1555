"""
The demo's simulated pods inside the router process (the config's C{simulators}): one
kthena-sim service each, started before the router's other parts and stopped after them.
"""

from __future__ import annotations

from twisted.application.service import MultiService, Service
from zope.interface import implementer

from kthena.config.router import RouterConfig, SimulatorSpec
from kthena.interfaces import IReconfigurable, IServerReactor
from kthena.lifecycle import restart_needed
from kthena.sim.engine import EngineConfig
from kthena.sim.pd import Role
from kthena.sim.service import SimConfig, SimService


@implementer(IReconfigurable)
class Simulators(MultiService):
    """The demo's in-process pods; changing them needs a restart."""

    name = "simulators"

    def __init__(self, specs: tuple[SimulatorSpec, ...], reactor: IServerReactor) -> None:
        super().__init__()
        self.specs = specs
        for spec in specs:
            _simulator(spec, reactor).setServiceParent(self)

    def reconfigure(self, config: RouterConfig) -> None:
        restart_needed("simulators", self.specs, config.simulators)


def _simulator(spec: SimulatorSpec, reactor: IServerReactor) -> Service:
    config = SimConfig(
        engine=spec.engine,
        model=spec.model,
        listen=spec.listen,
        engine_config=EngineConfig(
            max_num_seqs=spec.max_num_seqs,
            prefill_per_token=spec.prefill_per_token,
            itl=spec.itl,
        ),
        output_tokens=spec.output_tokens,
        loras={name: f"/models/{name}" for name in spec.loras},
        role=Role(spec.role),
    )
    return SimService(config, reactor)
