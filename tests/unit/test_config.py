"""Config and resource validation: every error names file, document and field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kthena.config.files import file_stamps
from kthena.config.resources import KTHENA_API
from kthena.config.router import RouterConfig, load_config, parse_config
from kthena.config.validate import ConfigError, Where, duration
from kthena.store import Datastore
from tests.unit.routerfixtures import Doc, pod, route, server, simple_route


def parse(raw: Any) -> RouterConfig:
    return parse_config(raw, "router.yaml", Path("."), [])


def with_resources(*docs: Doc, **top: Any) -> RouterConfig:
    return parse({"resources": list(docs), **top})


GOOD_SERVER = server("srv", {"app": "a"}, model="org/model")


def test_defaults() -> None:
    config = parse({})
    assert config.listen == "tcp:8080"
    assert config.observability.metrics.port == 9090
    assert config.observability.metrics.path == "/metrics"
    assert config.observability.access_log.format == "json"
    assert config.observability.access_log.output == "stdout"
    assert config.observability.debug.enabled is True
    assert config.upstream.pool_idle_timeout < 5  # below uvicorn's keep-alive
    assert config.upstream.forward_authorization is True  # as Kthena
    assert config.inference_paths == {
        "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
        "/v1/rerank", "/v1/score",
    }  # fmt: skip
    assert (config.downstream.header_timeout, config.downstream.body_timeout) == (10.0, 60.0)
    outlier = config.upstream.outlier
    assert (outlier.enabled, outlier.consecutive_failures, outlier.base_ejection_time) == (
        True, 5, 30.0,
    )  # fmt: skip
    assert config.readiness == "allModels"


def test_traffic_settings() -> None:
    config = parse(
        {
            "listen": "tcp:8080:interface=127.0.0.1",
            "inferencePaths": ["/v1/chat/completions", "/tokenize"],
            "downstream": {"headerTimeout": "5s", "bodyTimeout": "2m", "idleTimeout": 30},
            "upstream": {
                "forwardAuthorization": False,
                "outlierDetection": {"consecutiveFailures": 2, "maxEjectionPercent": 100},
            },
            "readiness": "anyModel",
        }
    )
    assert config.inference_paths == {"/v1/chat/completions", "/tokenize"}
    assert (config.downstream.header_timeout, config.downstream.body_timeout) == (5.0, 120.0)
    assert config.downstream.idle_timeout == 30.0
    assert config.upstream.forward_authorization is False
    assert config.upstream.outlier.consecutive_failures == 2
    assert config.upstream.outlier.max_ejection_percent == 100
    assert config.readiness == "anyModel"


def test_observability_section_as_the_spec_writes_it() -> None:
    config = parse(
        {
            "observability": {
                "metrics": {"enabled": True, "port": 9191, "path": "/m"},
                "accessLog": {"enabled": False, "format": "text", "output": "/tmp/a.log"},
                "debug": {"enabled": False, "port": 9292},
            }
        }
    )
    obs = config.observability
    assert (obs.metrics.port, obs.metrics.path) == (9191, "/m")
    assert (obs.access_log.enabled, obs.access_log.format) == (False, "text")
    assert obs.access_log.output == "/tmp/a.log"
    assert (obs.debug.enabled, obs.debug.port) == (False, 9292)


def test_full_resources_parse() -> None:
    config = with_resources(
        route(
            "r",
            {
                "modelName": "m",
                "loraAdapters": ["l1"],
                "rules": [
                    {
                        "name": "premium",
                        "modelMatch": {
                            "headers": {"X-Tier": {"exact": "premium"}},
                            "uri": {"prefix": "/v1/"},
                            "body": {"model": "m"},
                        },
                        "targetModels": [
                            {"modelServerName": "srv", "weight": 70},
                            {"modelServerName": "srv", "weight": 30},
                        ],
                    }
                ],
                "rateLimit": {"inputTokensPerUnit": 10, "unit": "minute"},
            },
        ),
        server(
            "srv",
            {"app": "a"},
            model="org/model",
            trafficPolicy={"timeout": "1m30s", "retry": {"attempts": 3, "retryInterval": "250ms"}},
            kvConnector={"type": "nixl"},
        ),
        pod("p", "10.0.0.1", {"app": "a"}, port=9000),
    )
    (r,) = config.resources.routes
    rule = r.rules[0]
    assert rule.match is not None
    assert rule.match.headers[0][0] == "x-tier"
    assert rule.weights == (70, 30)
    assert r.rate_limit is not None and r.rate_limit.unit_seconds == 60
    (s,) = config.resources.servers
    assert s.timeout == 90.0
    assert s.retry is not None and (s.retry.attempts, s.retry.interval) == (3, 0.25)
    assert s.kv_connector == "nixl"
    (p,) = config.resources.pods
    assert p.serving and p.port == 9000


def test_engine_default_ports() -> None:
    config = with_resources(
        {
            "apiVersion": KTHENA_API,
            "kind": "ModelServer",
            "metadata": {"name": "s"},
            "spec": {
                "inferenceEngine": "SGLang",
                "workloadSelector": {"matchLabels": {"app": "s"}},
            },
        }
    )
    assert config.resources.servers[0].port == 30000


BAD_CASES: list[tuple[str, Any, str]] = [
    (
        "unknown top-level field",
        {"listne": "tcp:1"},
        "router.yaml: listne: unknown field; known fields:",
    ),
    (
        "wrong type",
        {"maxBodyBytes": "big"},
        "router.yaml: maxBodyBytes: must be a whole number, not a string",
    ),
    (
        "bad access log format",
        {"observability": {"accessLog": {"format": "xml"}}},
        "router.yaml: observability.accessLog.format: must be one of json, text, not 'xml'",
    ),
    (
        "bad duration",
        {"drainTimeout": "soon"},
        "router.yaml: drainTimeout: is not a duration like 30s, 1m30s or 100ms: 'soon'",
    ),
    (
        "unknown spec field in a route",
        {"resources": [route("r", {"modelName": "m", "rules": [], "rulez": []})]},
        "router.yaml: resources[0] (ModelRoute default/r): spec.rulez: unknown field",
    ),
    (
        "bad regex",
        {
            "resources": [
                route(
                    "r",
                    {
                        "modelName": "m",
                        "rules": [
                            {
                                "modelMatch": {"headers": {"x": {"regex": "(unclosed"}}},
                                "targetModels": [{"modelServerName": "srv"}],
                            }
                        ],
                    },
                ),
                GOOD_SERVER,
            ]
        },
        "router.yaml: resources[0] (ModelRoute default/r): "
        "spec.rules[0].modelMatch.headers.x.regex: is not a valid regular expression",
    ),
    (
        "two match kinds",
        {
            "resources": [
                route(
                    "r",
                    {
                        "modelName": "m",
                        "rules": [
                            {
                                "modelMatch": {"uri": {"exact": "/a", "prefix": "/"}},
                                "targetModels": [{"modelServerName": "srv"}],
                            }
                        ],
                    },
                )
            ]
        },
        "spec.rules[0].modelMatch.uri: must set one of exact, prefix, regex (or none, to match "
        "anything)",
    ),
    (
        "weight out of range",
        {
            "resources": [
                route(
                    "r",
                    {
                        "modelName": "m",
                        "rules": [{"targetModels": [{"modelServerName": "srv", "weight": 101}]}],
                    },
                )
            ]
        },
        "spec.rules[0].targetModels[0].weight: must be at most 100, not 101",
    ),
    (
        "half weighted",
        {
            "resources": [
                route(
                    "r",
                    {
                        "modelName": "m",
                        "rules": [
                            {
                                "targetModels": [
                                    {"modelServerName": "srv", "weight": 50},
                                    {"modelServerName": "srv"},
                                ]
                            }
                        ],
                    },
                )
            ]
        },
        "spec.rules[0].targetModels: weight must be set on every target or on none",
    ),
    (
        "weights add to zero",
        {
            "resources": [
                route(
                    "r",
                    {
                        "modelName": "m",
                        "rules": [{"targetModels": [{"modelServerName": "srv", "weight": 0}]}],
                    },
                )
            ]
        },
        "spec.rules[0].targetModels: weights add up to 0",
    ),
    (
        "missing reference",
        {"resources": [simple_route("r", "m", "nowhere")]},
        "router.yaml: resources[0] (ModelRoute default/r): "
        "spec.rules[0].targetModels[0].modelServerName: no ModelServer 'nowhere' in "
        "namespace 'default'",
    ),
    (
        "no model name nor adapters",
        {"resources": [route("r", {"rules": [{"targetModels": [{"modelServerName": "s"}]}]})]},
        "spec: modelName and loraAdapters cannot both be empty",
    ),
    (
        "too many adapters",
        {"resources": [route("r", {"loraAdapters": [f"l{i}" for i in range(11)], "rules": []})]},
        "spec.loraAdapters: has 11 items; at most 10 are allowed",
    ),
    (
        "bad engine",
        {"resources": [server("s", {"app": "s"}, engine="TensorRT")]},
        "router.yaml: resources[0] (ModelServer default/s): spec.inferenceEngine: must be one "
        "of vLLM, SGLang, not 'TensorRT'",
    ),
    (
        "bad port",
        {"resources": [server("s", {"app": "s"}, port=70000)]},
        "spec.workloadPort.port: must be at most 65535, not 70000",
    ),
    (
        "label values must be strings",
        {"resources": [server("s", {"version": 2})]},  # type: ignore[dict-item]
        "spec.workloadSelector.matchLabels.version: must be a string, not int",
    ),
    (
        "unsupported kind",
        {"resources": [{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}}]},
        "router.yaml: resources[0]: unsupported apiVersion/kind v1/Service",
    ),
    (
        "duplicate names",
        {"resources": [GOOD_SERVER, GOOD_SERVER]},
        "router.yaml: resources[1] (ModelServer default/srv): ModelServer default/srv is "
        "defined twice (first in router.yaml: resources[0] (ModelServer default/srv))",
    ),
    (
        "bad pod port annotation",
        {
            "resources": [
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": "p", "annotations": {"kthena.io/workload-port": "x"}},
                }
            ]
        },
        "metadata.annotations.kthena.io/workload-port: must be a port number, not 'x'",
    ),
    (
        "bad name",
        {"resources": [server("Bad_Name", {"app": "s"})]},
        "metadata.name: must be a lower-case DNS name, not 'Bad_Name'",
    ),
    (
        "listen port not a number",
        {"listen": "tcp:80a81"},
        "router.yaml: listen: is not a valid endpoint like tcp:8080 (invalid literal for int() "
        "with base 10: '80a81'): 'tcp:80a81'",
    ),
    ("listen port too big", {"adminListen": "tcp:99999"}, "adminListen: port 99999 is not"),
    (
        "listen interface not an IP",
        {"listen": "tcp:8080:interface=localhost"},
        "listen: interface must be an IP address, not 'localhost'",
    ),
    ("unknown endpoint type", {"listen": "htp:8080"}, "Unknown endpoint type: 'htp'"),
    (
        "pod IP not an IP",
        {"resources": [pod("p", "10.0.0.300", {"app": "a"})]},
        "router.yaml: resources[0] (Pod default/p): status.podIP: must be an IP address, "
        "not '10.0.0.300'",
    ),
    (
        "inference path with dot segments",
        {"inferencePaths": ["/v1/../admin"]},
        "inferencePaths[0]: must be an absolute path of plain segments",
    ),
    (
        "inference path with an escape",
        {"inferencePaths": ["/v1/chat%2Fcompletions"]},
        "inferencePaths[0]: must be an absolute path of plain segments",
    ),
    (
        "inference path of the router's own",
        {"inferencePaths": ["/v1/chat/completions", "/v1/models"]},
        "inferencePaths[1]: /v1/models is answered by the router itself",
    ),
    ("no inference path", {"inferencePaths": []}, "inferencePaths: must list at least one"),
    ("zero header timeout", {"downstream": {"headerTimeout": 0}}, "headerTimeout: must be more"),
    (
        "ejection times out of order",
        {"upstream": {"outlierDetection": {"baseEjectionTime": "60s", "maxEjectionTime": "10s"}}},
        "upstream.outlierDetection.maxEjectionTime: must be at least baseEjectionTime",
    ),
    (
        "ejection share over 100",
        {"upstream": {"outlierDetection": {"maxEjectionPercent": 101}}},
        "maxEjectionPercent: must be at most 100, not 101",
    ),
    ("unknown readiness rule", {"readiness": "some"}, "readiness: must be one of allModels"),
    # Kthena's webhook (validator.go validateModelServer) refuses these too.
    (
        "selector without labels",
        {"resources": [server("s", {})]},
        "router.yaml: resources[0] (ModelServer default/s): spec.workloadSelector.matchLabels: "
        "must hold at least one label (an empty selector selects every pod)",
    ),
    (
        "selector without matchLabels",
        {
            "resources": [
                {
                    "apiVersion": KTHENA_API,
                    "kind": "ModelServer",
                    "metadata": {"name": "s"},
                    "spec": {"inferenceEngine": "vLLM", "workloadSelector": {}},
                }
            ]
        },
        "spec.workloadSelector.matchLabels: must hold at least one label",
    ),
    (
        "label key with @",
        {"resources": [server("s", {"app@name": "x"})]},
        "spec.workloadSelector.matchLabels.app@name: 'app@name' is not a valid label key: its "
        "name must be 1-63 characters",
    ),
    (
        "label key with a bad prefix",
        {"resources": [server("s", {"Example.COM/app": "x"})]},
        "'Example.COM/app' is not a valid label key: its prefix must be a lower-case DNS",
    ),
    (
        "label value too long",
        {"resources": [server("s", {"app": "x" * 64})]},
        "is not a valid label value: at most 63 characters",
    ),
    (
        "PD labels empty",
        {
            "resources": [
                server(
                    "s",
                    {},
                    workloadSelector={
                        "matchLabels": {"app": "s"},
                        "pdGroup": {
                            "groupKey": "g",
                            "prefillLabels": {},
                            "decodeLabels": {"r": "d"},
                        },
                    },
                )
            ]
        },
        "spec.workloadSelector.pdGroup.prefillLabels: must hold at least one label",
    ),
]


def test_qualified_label_keys_and_empty_values_are_valid() -> None:
    labels = {"app.kubernetes.io/name": "vllm", "example.com/tier": "", "a_b.c-d": "v1.2_x"}
    config = with_resources(server("s", labels))
    assert config.resources.servers[0].match_labels == labels


def test_an_empty_string_match_matches_anything() -> None:
    """Kthena's store_test.go TestMatchString: no matcher set matches everything."""
    config = with_resources(
        route(
            "r",
            {
                "modelName": "m",
                "rules": [
                    {
                        "modelMatch": {"headers": {"x-any": {}}, "uri": {}},
                        "targetModels": [{"modelServerName": "srv"}],
                    }
                ],
            },
        ),
        GOOD_SERVER,
    )
    store = Datastore()
    store.replace(config.resources)
    for value in ("anything", ""):

        def header(name: str, value: str = value) -> str:
            return value

        match = store.match("m", header, "/v1/completions")
        assert match is not None and match.route.meta.name == "r"


@pytest.mark.parametrize(("case", "raw", "message"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_invalid_config_names_where(case: str, raw: Any, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse(raw)
    assert message in str(e.value)


def test_resource_files_and_globs(tmp_path: Path) -> None:
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / "a.yaml").write_text(
        yaml.safe_dump_all([simple_route("r", "m", "srv"), GOOD_SERVER])
    )
    (tmp_path / "res" / "b.yaml").write_text(yaml.safe_dump(pod("p", "10.0.0.1", {"app": "a"})))
    config_file = tmp_path / "router.yaml"
    config_file.write_text(yaml.safe_dump({"listen": 8081, "resources": ["res/*.yaml"]}))
    config = load_config(str(config_file))
    assert config.listen == "tcp:8081"
    assert len(config.resources.routes) == 1
    assert len(config.resources.pods) == 1
    assert str(tmp_path / "res" / "a.yaml") in config.files
    assert config.files[0] == str(config_file)
    # A file appearing in a watched glob is a change, as is an edit.
    before = file_stamps(config.files)
    assert file_stamps(config.files) == before
    (tmp_path / "res" / "c.yaml").write_text("")
    assert file_stamps(config.files) != before


def test_errors_in_resource_files_name_file_and_document(tmp_path: Path) -> None:
    bad = server("s", {"app": "s"}, port=0)
    (tmp_path / "servers.yaml").write_text(yaml.safe_dump_all([GOOD_SERVER, bad]))
    config_file = tmp_path / "router.yaml"
    config_file.write_text(yaml.safe_dump({"resources": ["servers.yaml"]}))
    with pytest.raises(ConfigError) as e:
        load_config(str(config_file))
    assert str(e.value) == (
        f"{tmp_path / 'servers.yaml'}: document 2 (ModelServer default/s): "
        "spec.workloadPort.port: must be at least 1, not 0"
    )


def test_missing_files_and_bad_yaml(tmp_path: Path) -> None:
    config_file = tmp_path / "router.yaml"
    config_file.write_text(yaml.safe_dump({"resources": ["none/*.yaml"]}))
    with pytest.raises(ConfigError, match=r"resources\[0\]: no file matches 'none/\*.yaml'"):
        load_config(str(config_file))
    config_file.write_text("listen: [unclosed")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(config_file))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "absent.yaml"))


def test_example_configs_load() -> None:
    root = Path(__file__).resolve().parents[2]
    for path in [root / "conf" / "router.yaml", root / "kthena" / "demo.yaml"]:
        config = load_config(str(path))
        assert config.resources.routes


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("1m30s", 90.0), ("100ms", 0.1), ("1h", 3600.0), (5, 5.0), ("1.5s", 1.5)],
)
def test_durations(text: object, seconds: float) -> None:
    assert duration(text, Where("f")) == pytest.approx(seconds)
