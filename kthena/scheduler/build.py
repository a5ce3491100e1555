"""
Builds the scheduler a config's C{scheduler} section describes, after checking that it
names plugins of the right kinds with arguments they take (the config itself knows no
plugin: the scheduler does).
"""

from __future__ import annotations

from kthena.config.scheduler import SchedulerConfig
from kthena.interfaces import IFilterPlugin, IPostScheduleHook, IScorePlugin
from kthena.scheduler.framework import Scheduler, Timer
from kthena.scheduler.plugins import PLUGINS

_KINDS = {"filter": IFilterPlugin, "score": IScorePlugin}


def check_scheduler(config: SchedulerConfig) -> None:
    """
    @raise kthena.config.validate.ConfigError: naming the field of the first plugin that
        is unknown, of the wrong kind, or given arguments it does not take.
    """
    for use in config.uses:
        plugin = PLUGINS.get(use.name)
        if plugin is None:
            where = use.where.at("name") if use.kind == "args" else use.where
            where.fail(f"unknown plugin {use.name!r}; known: {', '.join(sorted(PLUGINS))}")
        if use.kind == "args":
            try:
                plugin.from_args(config.args[use.name])
            except ValueError as e:
                use.where.at("args").fail(str(e))
        elif not _KINDS[use.kind].implementedBy(plugin):
            use.where.fail(f"{use.name} is not a {use.kind} plugin")


def build_scheduler(config: SchedulerConfig, timer: Timer | None = None) -> Scheduler:
    """One instance per plugin name, shared when a plugin both filters and scores."""
    check_scheduler(config)
    instances: dict[str, object] = {}

    def plugin(name: str) -> object:
        if name not in instances:
            instances[name] = PLUGINS[name].from_args(config.args.get(name, {}))
        return instances[name]

    filters = [IFilterPlugin(plugin(name)) for name in config.filters]
    scores = [(IScorePlugin(plugin(name)), weight) for name, weight in config.scores]
    hooks = [IPostScheduleHook(p) for p in instances.values() if IPostScheduleHook.providedBy(p)]
    return Scheduler(
        filters, scores, hooks, timer, skip_scores_for_one_pod=config.skip_scores_for_one_pod
    )
