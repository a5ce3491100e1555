"""
Passive outlier detection, as Envoy's: pods that fail the router's own attempts are
ejected (take no traffic) for a while.

A pod that answers 503 at once, aborts before its headers or cuts its streams looks least
loaded to every load-aware plugin (its requests end fastest), so it would attract more
traffic than its healthy peers, and retries would hide it. Counting its failures in a row
and ejecting it after C{consecutiveFailures} keeps it out: for C{baseEjectionTime} the
first time, one more base time for each ejection that follows (at most
C{maxEjectionTime}); the multiplier decays by one for every base time the pod behaves.
At most C{maxEjectionPercent} of a model server's pods are out at once (at least one may
always be), so a bad deploy cannot eject a whole server. An answered attempt (below 500,
relayed whole) resets the count.

Ejection ends lazily: the first time the pod is looked at after its time is up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from kthena.config.traffic import OutlierConfig
from kthena.pods import PodEndpoint

log = Logger()

Ejected = Callable[[PodEndpoint], None]
"""Told of each ejection (the ejection counter)."""


class OutlierDetector:
    def __init__(self, config: OutlierConfig, clock: IReactorTime, on_eject: Ejected) -> None:
        self.config = config
        self.clock = clock
        self.on_eject = on_eject

    def ejected(self, pod: PodEndpoint) -> bool:
        """Whether C{pod} is out now (an ejection whose time is up ends here)."""
        state = pod.outlier
        until = state.ejected_until
        if until is None:
            return False
        now = self.clock.seconds()
        if now < until and self.config.enabled:
            return True
        state.ejected_until = None
        state.back_at = now
        state.consecutive_failures = 0
        log.info("pod {pod} takes traffic again after its ejection", pod=pod.key)
        return False

    def succeeded(self, pod: PodEndpoint) -> None:
        state = pod.outlier
        if state.consecutive_failures:  # every answer comes here: a write costs a call
            state.consecutive_failures = 0

    def failed(self, pod: PodEndpoint, why: str, peers: Sequence[PodEndpoint]) -> None:
        """
        An attempt on C{pod} failed.

        @param peers: the pods of the model server the attempt was for (C{pod} among
            them), for the share that may be ejected at once.
        """
        config = self.config
        state = pod.outlier
        state.consecutive_failures += 1
        state.reason = why
        if (
            not config.enabled
            or state.consecutive_failures < config.consecutive_failures
            or self.ejected(pod)
        ):
            return
        out = sum(1 for p in peers if p is not pod and self.ejected(p))
        allowed = max(1, len(peers) * config.max_ejection_percent // 100)
        if config.max_ejection_percent == 0 or out >= allowed:
            return
        now = self.clock.seconds()
        base = config.base_ejection_time
        if state.back_at is not None:  # behaved since: the multiplier decays
            state.multiplier = max(0, state.multiplier - int((now - state.back_at) // base))
        seconds = min(base * (state.multiplier + 1), config.max_ejection_time)
        state.multiplier += 1
        state.ejections += 1
        state.ejected_until = now + seconds
        log.warn(
            "pod {pod} ejected for {seconds:.0f}s after {count} failed attempts in a row "
            "(the last: {why})",
            pod=pod.key,
            seconds=seconds,
            count=state.consecutive_failures,
            why=why,
        )
        self.on_eject(pod)
