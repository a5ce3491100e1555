"""
The monitoring assets (monitoring/): Prometheus configs, ServiceMonitor and PodMonitor,
alert rules and their promtool tests, the Grafana dashboard. No process and no socket here:
what can be checked by reading the files, against the spec and against the families one
router really registers, so that a metric or label typo, a missing runbook link or a
dashboard panel of a retired type fails before any Prometheus or Grafana sees it.
(tests/integration/test_monitoring_promtool.py runs promtool on them;
tests/integration/test_prometheus_live.py runs every expression on a live Prometheus.)

The helpers at the top are shared with those two tests.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock

from kthena.config.observability import AccessLogConfig
from kthena.config.router import parse_config
from kthena.errors import ErrorType
from kthena.observability.accesslog import access_log_for
from kthena.observability.metrics import RouterMetrics

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "monitoring"
ALERTS = MONITORING / "alerts.yml"
ALERT_TESTS = MONITORING / "alerts.test.yml"
DASHBOARD = MONITORING / "grafana" / "kthena-router.json"
SPEC = ROOT / "docs" / "spec" / "router-observability.md"

SPEC_ALERTS = (
    "HighRouterErrorRate",
    "HighRequestLatency",
    "HighTokenProcessingRate",
    "RateLimitExceeded",
)
OUR_ALERTS = (
    "ModelServerNoReadyPods",
    "HighUpstreamErrorRatio",
    "PodScrapeFailing",
    "FairnessQueueTimeouts",
    "HighPDFailureRatio",
    "AccessLogLinesDropped",
    "RateLimitBackendErrors",
)
PANEL_TYPES = {"timeseries", "stat", "heatmap", "table", "bargauge"}
GRAFANA_VARIABLES = {"__rate_interval", "__range", "__interval"}
TARGET_LABELS = {"instance", "job"}
"""Labels Prometheus adds to every scraped series."""

_THRESHOLD = re.compile(r"^(?P<lhs>.*\S)\s*(?P<op>>=|<=|==|!=|>|<)\s*(?P<value>[0-9.]+)\s*$", re.S)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_METRIC = re.compile(r"\b(kthena_[a-z0-9_]+)\b")
_SELECTOR = re.compile(r"\b(kthena_[a-z0-9_]+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)")
_BY = re.compile(r"\bby\s*\(([^)]*)\)")
_VARIABLE = re.compile(r"\$\{?([a-zA-Z_][a-zA-Z0-9_]*)\}?")
_LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>[a-zA-Z_]+)\)$")
_DESCRIPTION_LABEL = re.compile(r"\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)")


# -- the assets, read


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def alert_rules() -> list[dict[str, Any]]:
    """Every rule of alerts.yml, in order."""
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def split_threshold(expr: str) -> tuple[str, str, float]:
    """An alert expression's measured side, comparison and threshold: C{lhs op number}."""
    match = _THRESHOLD.match(expr.strip())
    assert match, f"not of the form <expression> <comparison> <number>: {expr}"
    return match["lhs"].strip(), match["op"], float(match["value"])


def dashboard() -> dict[str, Any]:
    value: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return value


@dataclass(frozen=True)
class PanelTarget:
    row: str
    panel: str
    kind: str
    expr: str
    legend: str
    instant: bool


def panel_targets(board: dict[str, Any]) -> Iterator[PanelTarget]:
    """Every query of every panel, with the title of the row above it."""
    row = ""
    for panel in board["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
            continue
        for target in panel.get("targets", []):
            yield PanelTarget(
                row,
                panel["title"],
                panel["type"],
                target["expr"],
                target.get("legendFormat", ""),
                bool(target.get("instant")),
            )


def variables(board: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in board["templating"]["list"]}


def variable_query(variable: dict[str, Any]) -> str:
    query = variable["query"]
    return str(query["query"] if isinstance(query, dict) else query)


def label_values(query: str) -> tuple[str, str]:
    """C{label_values(selector, label)} (Grafana's variable query) split."""
    match = _LABEL_VALUES.match(query.strip())
    assert match, query
    return match["selector"].strip(), match["label"]


def spec_yaml_block(after: str) -> str:
    """The first ```yaml block of the spec after the line containing C{after}."""
    text = SPEC.read_text()
    start = text.index(after)
    match = re.compile(r"```yaml\n(.*?)```", re.S).search(text, start)
    assert match, after
    return match.group(1)


# -- what a router exposes


@dataclass(frozen=True)
class Exposed:
    """Series names a router exposes, and the label names of each (without le/quantile)."""

    labels: dict[str, frozenset[str]]

    def has(self, series: str) -> bool:
        return series in self.labels


def exposed_series() -> Exposed:
    """
    Every series name of the families one router registers: L{RouterMetrics} (built
    twice: with the default labels and with C{destinationLabels}, whose extra labels the
    dashboard's route variable reads) and the access log's dropped-lines counter, which
    the access log registers on the same registry.
    """
    labels: dict[str, set[str]] = {}
    for destination in (False, True):
        raw = {"observability": {"metrics": {"destinationLabels": destination}}}
        config = parse_config(raw, "<test>", ROOT, [])
        registry = CollectorRegistry()
        RouterMetrics(registry, Clock(), config)
        access_log_for(AccessLogConfig(), registry, Clock())
        names = _label_names(registry)
        for family in registry.collect():
            for series, extra in _series_of(family.name, family.type):
                labels.setdefault(series, set()).update(names[family.name] | extra)
    return Exposed({name: frozenset(values) for name, values in labels.items()})


def _series_of(name: str, kind: str) -> list[tuple[str, set[str]]]:
    """The sample names of a family (and the labels only those samples carry)."""
    if kind == "counter":
        return [(name + "_total", set())]
    if kind == "histogram":
        return [(name + "_bucket", {"le"}), (name + "_sum", set()), (name + "_count", set())]
    if kind == "summary":
        return [(name, {"quantile"}), (name + "_sum", set()), (name + "_count", set())]
    return [(name, set())]


def _label_names(registry: CollectorRegistry) -> dict[str, set[str]]:
    """
    The label names of every family, from its collector: prometheus_client's collectors
    keep them in C{_labelnames}, ours in C{_labelnames} or C{labelnames}. An empty family
    shows no labels in its samples, so there is no public way; a collector that has
    neither attribute fails the test rather than passing it unchecked.
    """
    found: dict[str, set[str]] = {}
    for collector in set(registry._names_to_collectors.values()):
        names = getattr(collector, "_labelnames", None)
        if names is None:
            names = getattr(collector, "labelnames", None)
        assert names is not None, f"no label names on {collector!r}"
        for family in collector.collect():
            found[family.name] = set(names)
    return found


EXPOSED = exposed_series()


def check_expression(expr: str, exposed: Exposed = EXPOSED) -> list[str]:
    """
    What is wrong with a PromQL expression of ours: metric names the router does not
    expose, matchers and groupings on labels none of the expression's metrics has,
    C{error_type} values that are not L{ErrorType} values.
    """
    problems: list[str] = []
    bare = _STRING.sub('""', expr)
    metrics = set(_METRIC.findall(bare))
    if not metrics:
        problems.append("names no kthena metric")
    problems += [f"{m} is not exposed by the router" for m in sorted(metrics) if not exposed.has(m)]
    for metric, matchers in _SELECTOR.findall(expr):
        problems += _matcher_problems(metric, matchers, exposed)
    known = set(TARGET_LABELS).union(*(exposed.labels.get(m, frozenset()) for m in metrics))
    for group in _GROUPING.findall(bare):
        for label in filter(None, (part.strip() for part in group.split(","))):
            if label not in known:
                problems.append(f"grouping by {label}: no metric of the expression has it")
    return problems


def _matcher_problems(metric: str, matchers: str, exposed: Exposed) -> list[str]:
    """Label matchers of one selector: labels of the metric, error types that exist."""
    problems: list[str] = []
    error_types = {e.value for e in ErrorType}
    for label, _, value in _MATCHER.findall(matchers):
        if label not in exposed.labels.get(metric, frozenset()) | TARGET_LABELS:
            problems.append(f"{metric} has no label {label}")
        if label == "error_type":
            problems += [
                f"error_type {item!r} is no ErrorType value"
                for item in value.split("|")
                if item not in error_types
            ]
    return problems


# -- Prometheus configs, ServiceMonitor, PodMonitor


def test_prometheus_yml_is_the_spec_config_with_the_rules() -> None:
    config = load_yaml(MONITORING / "prometheus.yml")
    assert config.pop("rule_files") == ["alerts.yml"]
    assert config == yaml.safe_load(spec_yaml_block("### Prometheus Configuration"))


def test_baremetal_config_has_the_same_jobs_with_static_targets() -> None:
    """The same job names (the alerts and the dashboard do not care where Prometheus runs)
    and every model-server target labelled as the Kubernetes job's relabelling would."""
    kubernetes = load_yaml(MONITORING / "prometheus.yml")
    baremetal = load_yaml(MONITORING / "prometheus-baremetal.yml")
    assert baremetal["rule_files"] == ["alerts.yml"]
    assert [j["job_name"] for j in baremetal["scrape_configs"]] == [
        j["job_name"] for j in kubernetes["scrape_configs"]
    ]
    router, servers = baremetal["scrape_configs"]
    assert router["static_configs"][0]["targets"] == ["127.0.0.1:9090"]
    assert (
        router["static_configs"][0]["labels"]
        == kubernetes["scrape_configs"][0]["static_configs"][0]["labels"]
    )
    assert servers["static_configs"]
    for static in servers["static_configs"]:
        assert set(static["labels"]) == {"pod", "namespace"}, static
        assert static["targets"], static


def test_servicemonitor_is_the_spec_block_exactly() -> None:
    block = spec_yaml_block("**Prometheus ServiceMonitor**")
    text = (MONITORING / "servicemonitor.yaml").read_text()
    assert text == block
    assert yaml.safe_load(text)["kind"] == "ServiceMonitor"


def test_podmonitor_selects_the_model_servers_of_the_spec_job() -> None:
    """The PodMonitor keeps the pods the spec's kubernetes_sd job keeps: the same
    namespaces, the same `app` regex, the same pod and namespace labels."""
    monitor = load_yaml(MONITORING / "podmonitor.yaml")
    job = load_yaml(MONITORING / "prometheus.yml")["scrape_configs"][1]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "PodMonitor"
    spec = monitor["spec"]
    assert (
        spec["namespaceSelector"]["matchNames"]
        == (job["kubernetes_sd_configs"][0]["namespaces"]["names"])
    )
    (endpoint,) = spec["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    ours = [
        (r["sourceLabels"], r.get("action", "replace"), r.get("regex"), r.get("targetLabel"))
        for r in endpoint["relabelings"]
    ]
    theirs = [
        (r["source_labels"], r.get("action", "replace"), r.get("regex"), r.get("target_label"))
        for r in job["relabel_configs"]
    ]
    assert ours == theirs


# -- alert rules


def test_alerts_are_the_spec_ones_and_ours() -> None:
    assert [rule["alert"] for rule in alert_rules()] == [*SPEC_ALERTS, *OUR_ALERTS]


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: str(r["alert"]))
def test_alert_is_complete(rule: dict[str, Any]) -> None:
    """Every alert waits (`for`), says how bad (severity), what and why (summary,
    description) and links its runbook: GitHub's anchor of the `### <AlertName>` heading
    of docs/troubleshooting.md is the lowercased name."""
    assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}
    assert re.fullmatch(r"[0-9]+[smh]", rule["for"]), rule["for"]
    assert rule["labels"]["severity"] in {"critical", "warning", "info"}
    annotations = rule["annotations"]
    assert set(annotations) == {"summary", "description", "runbook_url"}
    assert annotations["summary"].strip()
    assert annotations["description"].strip()
    assert annotations["runbook_url"] == f"docs/troubleshooting.md#{rule['alert'].lower()}"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: str(r["alert"]))
def test_alert_expression_names_real_metrics_and_labels(rule: dict[str, Any]) -> None:
    assert check_expression(rule["expr"]) == []


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: str(r["alert"]))
def test_alert_keeps_the_labels_its_description_names(rule: dict[str, Any]) -> None:
    """Aggregated `by` the labels the description prints (an aggregation without them
    prints empty strings), and compared with a threshold at the end (the live test
    measures the left side)."""
    lhs, _, _ = split_threshold(rule["expr"])
    groupings = [
        {label.strip() for label in group.split(",") if label.strip()}
        for group in _BY.findall(_STRING.sub('""', lhs))
    ]
    assert groupings, "aggregate with `sum by (...)` / `max by (...)`"
    kept = set.intersection(*groupings) - {"le"}
    used = set(_DESCRIPTION_LABEL.findall(rule["annotations"]["description"]))
    assert used, "the description names what it is about"
    assert used <= kept, (used, kept)


def test_histogram_quantiles_read_rates_of_buckets() -> None:
    """The spec's `histogram_quantile(0.95, <histogram name>)` returns nothing: the
    quantile needs the rate of the `_bucket` series summed by `le`."""
    exprs = [rule["expr"] for rule in alert_rules()]
    exprs += [t.expr for t in panel_targets(dashboard())]
    found = 0
    for expr in exprs:
        for match in re.finditer(r"histogram_quantile\(\s*[0-9.]+,", expr):
            found += 1
            rest = expr[match.end() :]
            assert re.match(r"\s*sum by \(le[,)]", rest), expr
            assert re.search(r"rate\(kthena_[a-z_]+_bucket\b", rest), expr
    assert found >= 5


def test_ratio_alerts_divide_rates() -> None:
    """The descriptions printing humanizePercentage are ratios (0..1), not rates."""
    for rule in alert_rules():
        if "humanizePercentage" in rule["annotations"]["description"]:
            lhs, op, threshold = split_threshold(rule["expr"])
            assert " / " in lhs, rule["alert"]
            assert op == ">"
            assert 0 < threshold < 1


def test_every_alert_has_a_firing_and_a_silent_promtool_case() -> None:
    tests = load_yaml(ALERT_TESTS)
    assert tests["rule_files"] == ["alerts.yml"]
    firing: set[str] = set()
    silent: set[str] = set()
    for case in tests["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else silent).add(check["alertname"])
            for alert in check["exp_alerts"]:
                assert "exp_annotations" in alert, check["alertname"]
    names = {rule["alert"] for rule in alert_rules()}
    assert firing == names
    assert silent == names


def test_promtool_cases_use_real_series() -> None:
    """The input series of the promtool cases are series the router exposes (with its
    labels), so a rule tested against invented names fails here."""
    for case in load_yaml(ALERT_TESTS)["tests"]:
        for series in case["input_series"]:
            assert check_expression(series["series"]) == [], (case["name"], series["series"])


# -- the dashboard


def test_dashboard_identity_and_schema() -> None:
    board = dashboard()
    assert board["title"] == "Kthena Router Observability"
    assert board["uid"] == "kthena-router-observability"
    assert board["tags"] == ["kthena", "router", "ai-inference"]
    assert board["schemaVersion"] >= 39
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_has_no_graph_panel() -> None:
    """`graph` was removed from Grafana (11); every panel is one of the current types."""
    for panel in dashboard()["panels"]:
        assert panel["type"] == "row" or panel["type"] in PANEL_TYPES, panel["title"]
        assert panel.get("panels", []) == [], "rows are expanded, their panels top level"
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_dashboard_rows_cover_every_section_of_the_spec() -> None:
    rows = [p["title"] for p in dashboard()["panels"] if p["type"] == "row"]
    assert rows == [
        "HTTP Request Overview",
        "AI-Specific Metrics",
        "Advanced Features",
        "Core System: Model Servers",
        "Core System: Load Balancing",
        "Core System: Prefill/Decode and KV Cache",
        "Router Internals",
    ]
    used = {name for t in panel_targets(dashboard()) for name in _METRIC.findall(t.expr)}
    families = {
        name.removesuffix(suffix)
        for name in used
        for suffix in ("_bucket", "_sum", "_count", "")
        if name.endswith(suffix)
    }
    spec = set(re.findall(r"^(kthena_[a-z_]+)\{", SPEC.read_text(), re.M))
    missing = {name for name in spec if name not in families}
    assert missing == set(), "every family of the spec on some panel"


def test_dashboard_variables() -> None:
    board = dashboard()
    found = variables(board)
    assert list(found) == ["datasource", "model", "route", "cost_per_1k_tokens"]
    assert found["datasource"]["type"] == "datasource"
    assert found["datasource"]["query"] == "prometheus"
    model, route = found["model"], found["route"]
    assert label_values(variable_query(model)) == ("kthena_router_requests_total", "model")
    assert label_values(variable_query(route))[1] == "model_route"
    for variable in (model, route):
        assert variable["type"] == "query"
        assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        # model_route exists only with destinationLabels: All must then still match
        # (a series without the label matches .*).
        assert variable["includeAll"] is True
        assert variable["allValue"] == ".*"
    cost = found["cost_per_1k_tokens"]
    assert cost["type"] in {"constant", "textbox"}
    assert float(cost["query"]) > 0
    cost_panels = {t.panel for t in panel_targets(board) if "$cost_per_1k_tokens" in t.expr}
    assert any("Cost" in title for title in cost_panels)


def test_dashboard_queries_use_the_datasource_variable() -> None:
    for panel in dashboard()["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]


def test_dashboard_queries_filter_by_the_variables_and_name_real_metrics() -> None:
    board = dashboard()
    names = set(variables(board)) | GRAFANA_VARIABLES
    targets = list(panel_targets(board))
    for target in targets:
        assert check_expression(target.expr) == [], (target.panel, target.expr)
        assert set(_VARIABLE.findall(target.expr)) <= names, target.expr
    for name in ("model", "route"):
        assert any(f"${name}" in t.expr for t in targets), name
    for variable in ("model", "route"):
        selector, label = label_values(variable_query(variables(board)[variable]))
        assert check_expression(selector) == []
        metric = _METRIC.findall(selector)[0]
        assert label in EXPOSED.labels[metric]


def test_the_checks_catch_typos() -> None:
    """The expression check itself: each kind of mistake it exists for is reported."""
    assert check_expression("rate(kthena_router_request_total[5m])")
    assert check_expression("sum by (modle) (rate(kthena_router_requests_total[5m]))")
    assert check_expression('kthena_router_requests_total{error_type="queue_timout"}')
    assert check_expression('kthena_lb_target_health{model_server="x"}')
    assert check_expression("histogram_quantile(0.9, kthena_router_request_duration_seconds)")
    assert check_expression("up") == ["names no kthena metric"]
    assert (
        check_expression(
            'sum by (le, model_route) (rate(kthena_router_request_duration_seconds_bucket{path="/"}'
            "[5m]))"
        )
        == []
    )
