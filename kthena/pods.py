"""
A pod as the data plane sees it: where to send requests, and what the router knows of it
right now (its scrapes, its attempts). A leaf type, shared by the store, the scheduler,
the pipeline and the views.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from kthena.config.resources import Pod
from kthena.engines.state import PodState


@dataclass(slots=True)
class OutlierState:
    """
    What the router's own attempts on a pod say of it (passive outlier detection, see
    L{kthena.pipeline.outlier}).

    @ivar consecutive_failures: attempts in a row that failed (5xx, unreachable, cut).
    @ivar ejected_until: while set, the pod takes no traffic until this reactor time.
    @ivar ejections: times the pod was ejected, ever.
    @ivar multiplier: how many base ejection times the next ejection lasts, less one;
        it decays while the pod behaves.
    @ivar back_at: when the last ejection ended.
    @cvar epoch: bumped by every write of any pod's C{ejected_until}: who keeps health
        verdicts (L{kthena.pipeline.health}) sees an ejection at once.
    """

    epoch: ClassVar[int] = 0

    def __setattr__(self, name: str, value: object) -> None:
        if name == "ejected_until":
            OutlierState.epoch += 1
        object.__setattr__(self, name, value)

    consecutive_failures: int = 0
    ejected_until: float | None = None
    ejections: int = 0
    multiplier: int = 0
    back_at: float | None = None
    reason: str | None = None


@dataclass(eq=False, slots=True)
class PodEndpoint:
    """
    A pod as the data plane sees it: where to send requests, and what the router knows
    of it right now. Kept across config generations while the pod exists.

    @ivar failures: attempts on this pod that failed before or instead of an answer, or
        were answered with a 5xx.
    @ivar engine: the inference engine of the ModelServer that selected it (its dialect).
    @ivar state: what the pod's own metrics said at the last scrape.
    @ivar outlier: what the router's own attempts on it said.
    """

    key: str
    pod: Pod
    host: str
    port: int
    servers: tuple[str, ...] = ()
    failures: int = 0
    last_error: str | None = None
    engine: str = "vLLM"
    state: PodState = field(default_factory=PodState)
    outlier: OutlierState = field(default_factory=OutlierState)

    @property
    def in_flight(self) -> int:
        """Requests the router has sent to this pod that have not ended (its state's)."""
        return self.state.in_flight

    @in_flight.setter
    def in_flight(self, value: int) -> None:
        self.state.in_flight = value

    @property
    def name(self) -> str:
        return self.pod.meta.name

    def serves_adapter(self, adapter: str) -> bool:
        """The pod has the LoRA adapter loaded (its C{/v1/models}) or running (its metrics)."""
        return adapter in self.state.loras

    def failed(self, why: str) -> None:
        """An attempt on this pod failed (kept for the debug views)."""
        self.failures += 1
        self.last_error = why

    @property
    def authority(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
