"""The kubernetes config section, and how the cluster's objects join the config's own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kthena.config.router import parse_config
from kthena.config.validate import ConfigError
from kthena.sources.merge import with_cluster
from tests.unit.routerfixtures import pod, server, simple_route


def config(**raw: Any) -> Any:
    return parse_config(raw, "router.yaml", Path("/etc/kthena"), [])


def test_the_section_turns_it_on_with_paths_relative_to_the_config() -> None:
    assert not config().kubernetes.enabled
    k = config(kubernetes={"kubeconfig": "kube/config", "namespaces": ["a", "b", "a"]}).kubernetes
    assert k.enabled and k.kubeconfig == "/etc/kthena/kube/config"
    assert k.namespaces == ("a", "b")
    assert not config(kubernetes={"enabled": False}).kubernetes.enabled
    assert config(kubernetes={}).kubernetes.kubeconfig is None  # in the cluster


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"namespaces": ["*", "a"]}, "stands alone"),
        ({"namespaces": ["Not_A_Namespace"]}, "namespace name"),
        ({"watchIdleTimeout": "0s"}, "watchIdleTimeout"),
        ({"namespace": "a"}, "unknown field"),
    ],
)
def test_bad_sections_are_config_errors(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(kubernetes=section)


def test_cluster_objects_join_the_files_and_bad_ones_are_left_out() -> None:
    files = config(
        resources=[server("file-srv", {"app": "f"}), simple_route("file-r", "f", "file-srv")]
    ).resources
    broken = server("broken", {"app": "x"})
    broken["spec"]["inferenceEngine"] = "NotAnEngine"
    cluster = [
        server("srv", {"app": "c"}),
        simple_route("r", "c", "srv"),
        simple_route("orphan", "o", "missing"),
        server("file-srv", {"app": "other"}),  # a file defines it
        broken,
        pod("p", "10.0.0.1", {"app": "c"}),
    ]
    merged, problems = with_cluster(files, cluster)
    assert [r.meta.key for r in merged.routes] == ["default/file-r", "default/r"]
    assert [s.meta.key for s in merged.servers] == ["default/file-srv", "default/srv"]
    assert [p.meta.key for p in merged.pods] == ["default/p"]
    assert merged.servers[0] is files.servers[0]  # the file's stands
    assert len(problems) == 3
    assert any("orphan" in p and "missing" in p for p in problems)
    assert any("file-srv" in p and "files define it" in p for p in problems)
    assert any("broken" in p and "NotAnEngine" in p for p in problems)
