"""Builds the scheduler a config's C{scheduler} section describes."""

from __future__ import annotations

from kthena.config.scheduler import SchedulerConfig
from kthena.interfaces import IFilterPlugin, IPostScheduleHook, IScorePlugin
from kthena.scheduler.framework import Scheduler, Timer
from kthena.scheduler.plugins import PLUGINS


def build_scheduler(config: SchedulerConfig, timer: Timer | None = None) -> Scheduler:
    """One instance per plugin name, shared when a plugin both filters and scores."""
    instances: dict[str, object] = {}

    def plugin(name: str) -> object:
        if name not in instances:
            instances[name] = PLUGINS[name](config.args.get(name, {}))
        return instances[name]

    filters = [IFilterPlugin(plugin(name)) for name in config.filters]
    scores = [(IScorePlugin(plugin(name)), weight) for name, weight in config.scores]
    hooks = [IPostScheduleHook(p) for p in instances.values() if IPostScheduleHook.providedBy(p)]
    return Scheduler(
        filters, scores, hooks, timer, skip_scores_for_one_pod=config.skip_scores_for_one_pod
    )
