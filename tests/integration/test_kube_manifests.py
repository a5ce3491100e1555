"""
conf/kubernetes/ as a cluster would take it: the ConfigMap's router config loads, the
Deployment's probes, ports, drain and service account fit the router, the Services and
the ServiceMonitor agree on the metrics port, RBAC grants exactly what the Kubernetes
source reads (get, list, watch), and kubectl (Debian's kubernetes-client, installed by
.ci/run) takes every manifest (C{apply --dry-run=client}) and lists from the fake API
server as from a real one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from twisted.internet.threads import deferToThread

from kthena.config.router import parse_config
from kthena.sources.reflector import Kind
from kthena.sources.source import GATEWAY_KINDS, INFERENCE_KINDS, KINDS
from tests.integration.fake_kube import kubeconfig, serve
from tests.integration.router_helpers import inline

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "conf" / "kubernetes").glob("*.yaml"))


def documents() -> dict[tuple[str, str], dict[str, Any]]:
    found = {}
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def test_the_configmap_holds_a_router_config_reading_the_cluster() -> None:
    config_map = documents()[("ConfigMap", "kthena-router")]
    raw = yaml.safe_load(config_map["data"]["router.yaml"])
    config = parse_config(raw, "configmap", Path("."), [])
    assert config.kubernetes.enabled and config.kubernetes.kubeconfig is None  # in-cluster
    assert config.kubernetes.namespaces == ("*",)


def test_the_deployment_fits_the_router() -> None:
    docs = documents()
    deployment = docs[("Deployment", "kthena-router")]
    config = yaml.safe_load(docs[("ConfigMap", "kthena-router")]["data"]["router.yaml"])
    pod = deployment["spec"]["template"]
    assert (
        deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    )
    spec = pod["spec"]
    assert ("ServiceAccount", spec["serviceAccountName"]) in docs
    (container,) = spec["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert f"tcp:{ports['http']}" == config["listen"]
    assert f"tcp:{ports['metrics']}" == config["adminListen"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    drain = float(config["drainTimeout"].rstrip("s"))
    assert spec["terminationGracePeriodSeconds"] > pre_stop + drain


def test_the_metrics_port_is_the_one_the_service_monitor_selects() -> None:
    docs = documents()
    monitor = yaml.safe_load((ROOT / "monitoring" / "servicemonitor.yaml").read_text())
    services = [d for (kind, _), d in docs.items() if kind == "Service"]
    matching = [
        s for s in services
        if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
        and s["metadata"]["namespace"] == monitor["metadata"]["namespace"]
        and any(p["name"] == monitor["spec"]["endpoints"][0]["port"] for p in s["spec"]["ports"])
    ]  # fmt: skip
    assert [s["metadata"]["name"] for s in matching] == ["kthena-router-metrics"]


def _granted(role: dict[str, Any]) -> set[tuple[str, str, tuple[str, ...]]]:
    return {
        (group, resource, tuple(sorted(rule["verbs"])))
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }


def _read(kinds: tuple[Kind, ...]) -> set[tuple[str, str, tuple[str, ...]]]:
    return {
        ("" if kind.api == "v1" else kind.api.split("/")[0], kind.plural, ("get", "list", "watch"))
        for kind in kinds
    }


def test_rbac_grants_exactly_what_the_source_reads() -> None:
    docs = documents()
    assert _granted(docs[("ClusterRole", "kthena-router")]) == _read(KINDS)
    extension = docs[("ClusterRole", "kthena-router-inference-extension")]
    assert _granted(extension) == _read(INFERENCE_KINDS)
    assert _granted(docs[("ClusterRole", "kthena-router-gateways")]) == _read(GATEWAY_KINDS)
    for name in ("kthena-router-inference-extension", "kthena-router-gateways"):
        binding = docs[("ClusterRoleBinding", name)]
        assert binding["roleRef"]["name"] == name
        assert binding["subjects"] == docs[("ClusterRoleBinding", "kthena-router")]["subjects"]


@pytest.fixture
def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl is not installed (.ci/run installs kubernetes-client)")
    return found


@inline
async def test_kubectl_takes_the_manifests_and_reads_the_fake(kubectl: str, tmp_path: Path) -> None:
    from twisted.internet import reactor

    fake, port = serve(reactor)
    fake.apply("v1", "pods", {"metadata": {"name": "vllm-0"}, "status": {"podIP": "10.0.0.1"}})
    for kind in (*KINDS[:2], *INFERENCE_KINDS, *GATEWAY_KINDS):  # what kubectl finds by name
        fake.apply(kind.api, kind.plural, {"metadata": {"name": f"a-{kind.plural}"}, "spec": {}})
    env = {**os.environ, "KUBECONFIG": kubeconfig(tmp_path / "config", port.getHost().port)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [kubectl, "--cache-dir", str(tmp_path / "cache"), *args],
            capture_output=True, text=True, env=env, timeout=60, check=False,
        )  # fmt: skip

    try:
        files = [arg for path in MANIFESTS for arg in ("-f", str(path))]
        applied = await deferToThread(run, "apply", "--dry-run=client", "--validate=false", *files)
        listed = await deferToThread(run, "get", "pods", "-n", "default", "-o", "name")
        kinds = ",".join(k.plural for k in (*KINDS[:2], *INFERENCE_KINDS, *GATEWAY_KINDS))
        custom = await deferToThread(run, "get", kinds, "-n", "default", "-o", "name")
    finally:
        await port.stopListening()
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.count("created (dry run)") == len(documents())
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == ["pod/vllm-0"]
    # Kthena's kinds and the Gateway API's, found through discovery as a real server's.
    assert custom.returncode == 0, custom.stderr
    assert sorted(name.split("/")[1] for name in custom.stdout.split()) == sorted(
        f"a-{k.plural}" for k in (*KINDS[:2], *INFERENCE_KINDS, *GATEWAY_KINDS)
    )
