"""
The C{scheduler} section of the router config, in Kthena's format:

    scheduler:
      pluginConfig:
        - name: least-request
          args: {maxWaitingRequests: 10}
      plugins:
        Filter:
          enabled: [least-request]
        Score:
          enabled:
            - {name: least-request, weight: 1}

Plugin names and arguments are checked when the config loads (a typo is a config error
with its field, not a silently ignored plugin). Without the section, Kthena's shipped
defaults apply.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kthena.config.validate import Where, boolean, integer, mapping, number, sequence, string


@dataclass(frozen=True, slots=True)
class PluginUse:
    """Where a plugin is named in the section, and as what (for errors about it)."""

    name: str
    kind: str
    where: Where


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """
    The section's structure: plugin names, weights and arguments as written. Whether the
    names are plugins, of the kind asked, with arguments they take, is the scheduler's
    to check (L{kthena.scheduler.build.check_scheduler}): the config knows no plugin.

    @ivar args: each plugin's arguments by name (from C{pluginConfig}).
    @ivar uses: every place a plugin is named, to check (not compared: two configs that
        name the same plugins the same way are the same section).
    @ivar skip_scores_for_one_pod: when the filters leave one pod, ask no score plugin
        (ours, C{skipScoresForOnePod}; off by default: Kthena always runs them, and
        their timings are what operators watch).
    """

    filters: tuple[str, ...] = ("least-request",)
    scores: tuple[tuple[str, float], ...] = (
        ("least-request", 1.0),
        ("gpu-usage", 1.0),
        ("least-latency", 1.0),
        ("prefix-cache", 1.0),
    )
    args: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    skip_scores_for_one_pod: bool = False
    uses: tuple[PluginUse, ...] = field(default=(), compare=False)


def _disabled(spec: Mapping[str, Any], where: Where) -> set[str]:
    """The names a C{Filter} or C{Score} section lists under C{disabled}."""
    d_where = where.at("disabled")
    return {string(n, d_where.at(i)) for i, n in enumerate(sequence(spec.get("disabled"), d_where))}


def parse_scheduler(value: object, where: Where) -> SchedulerConfig:
    if value is None:
        return SchedulerConfig()
    spec = mapping(value, where, ("pluginConfig", "plugins", "skipScoresForOnePod"))
    args: dict[str, Mapping[str, Any]] = {}
    uses: list[PluginUse] = []
    c_where = where.at("pluginConfig")
    for i, item in enumerate(sequence(spec.get("pluginConfig"), c_where)):
        i_where = c_where.at(i)
        entry = mapping(item, i_where, ("name", "args"), required=("name",))
        name = string(entry["name"], i_where.at("name"))
        args[name] = mapping(entry.get("args"), i_where.at("args"))
        uses.append(PluginUse(name, "args", i_where))
    p_where = where.at("plugins")
    plugins = mapping(spec.get("plugins"), p_where, ("Filter", "Score"))
    defaults = SchedulerConfig()
    filters = defaults.filters
    if "Filter" in plugins:
        f_where = p_where.at("Filter")
        f_spec = mapping(plugins["Filter"], f_where, ("enabled", "disabled"))
        disabled = _disabled(f_spec, f_where)
        chosen_filters = []
        for i, n in enumerate(sequence(f_spec.get("enabled"), f_where.at("enabled"))):
            name = string(n, f_where.at("enabled").at(i))
            uses.append(PluginUse(name, "filter", f_where.at("enabled").at(i)))
            if name not in disabled:
                chosen_filters.append(name)
        filters = tuple(chosen_filters)
    scores = defaults.scores
    if "Score" in plugins:
        s_where = p_where.at("Score")
        s_spec = mapping(plugins["Score"], s_where, ("enabled", "disabled"))
        disabled = _disabled(s_spec, s_where)
        chosen: list[tuple[str, float]] = []
        for i, item in enumerate(sequence(s_spec.get("enabled"), s_where.at("enabled"))):
            e_where = s_where.at("enabled").at(i)
            entry = mapping(item, e_where, ("name", "weight"), required=("name",))
            name = string(entry["name"], e_where.at("name"))
            uses.append(PluginUse(name, "score", e_where.at("name")))
            weight = entry.get("weight", 1)
            if isinstance(weight, int) and not isinstance(weight, bool):
                weight = integer(weight, e_where.at("weight"), minimum=0)
            if name not in disabled:
                chosen.append((name, number(weight, e_where.at("weight"), minimum=0)))
        scores = tuple(chosen)
    return SchedulerConfig(
        filters=filters,
        scores=scores,
        args=args,
        skip_scores_for_one_pod=boolean(
            spec.get("skipScoresForOnePod", False), where.at("skipScoresForOnePod")
        ),
        uses=tuple(uses),
    )
