"""
Prometheus' own checker on the monitoring assets: both configs load (with their rule
file), the rules parse, and the rules' unit tests (monitoring/alerts.test.yml) pass.

promtool is a system requirement of these tests (.ci/run installs Debian's `prometheus`):
a missing promtool fails them, it does not skip them.

Debian's Prometheus (2.42) is built without Kubernetes service discovery: it rejects
`kubernetes_sd_configs` as an unknown field even with `--syntax-only`. Where promtool
knows it, prometheus.yml is checked as it is; where it does not, that refusal is asserted
to be the only complaint, and the same config with the Kubernetes discovery swapped for a
file discovery (every relabelling, job and rule file kept) must pass.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.unit.test_monitoring_assets import ALERT_TESTS, ALERTS, MONITORING

NO_KUBERNETES_SD = "field kubernetes_sd_configs not found"


def promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    assert path, "promtool is not installed (Debian: apt-get install prometheus)"
    return subprocess.run(
        [path, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def output(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


def test_baremetal_config_is_valid_with_its_rules() -> None:
    result = promtool("check", "config", "prometheus-baremetal.yml")
    assert result.returncode == 0, output(result)
    assert "SUCCESS: 1 rule files found" in output(result)


def test_kubernetes_config_is_valid_with_its_rules(tmp_path: Path) -> None:
    result = promtool("check", "config", "prometheus.yml")
    if result.returncode == 0:
        assert "SUCCESS: 1 rule files found" in output(result)
        return
    # This promtool has no Kubernetes discovery (Debian's build): that must be all it
    # objects to.
    assert NO_KUBERNETES_SD in output(result), output(result)
    config: dict[str, Any] = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    swapped = 0
    for job in config["scrape_configs"]:
        if "kubernetes_sd_configs" in job:
            del job["kubernetes_sd_configs"]
            job["file_sd_configs"] = [{"files": ["targets/*.yml"]}]
            swapped += 1
    assert swapped == 1
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    result = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert result.returncode == 0, output(result)
    assert "SUCCESS: 1 rule files found" in output(result)


def test_rules_parse() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, output(result)
    assert "SUCCESS: 11 rules found" in output(result)


def test_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, output(result)
    assert "SUCCESS" in output(result)


def test_rule_unit_tests_can_fail(tmp_path: Path) -> None:
    """The promtool cases really compare: the same tests against rules whose thresholds
    are moved (every `>` made `<`) fail, firing cases and silent cases alike."""
    rules = ALERTS.read_text().replace(" > ", " < ").replace(" >= ", " < ")
    assert rules != ALERTS.read_text()
    (tmp_path / "alerts.yml").write_text(rules)
    shutil.copy(ALERT_TESTS, tmp_path / "alerts.test.yml")
    result = promtool("test", "rules", "alerts.test.yml", cwd=tmp_path)
    assert result.returncode != 0
    failed = output(result).count("alertname:")
    assert failed >= 10, output(result)
