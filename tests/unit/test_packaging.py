"""
Packaging facts that break silently: the twistd dropins, the wheel's contents, and the
README's commands staying the ones CI runs.
"""

from __future__ import annotations

import ast
import configparser
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    return re.findall(r"```sh\n(.+?)\n```", readme)


def test_readme_starts_with_run_and_test_commands() -> None:
    """The first two code blocks: install and run the main job; install and run tests."""
    run, test = _readme_commands()[:2]
    assert run.startswith("python3 -m pip install . && twistd -n --pidfile= kthena-")
    assert test.startswith("python3 -m pip install '.[test]' && ")
    assert "pytest" in test


def test_ci_runs_the_readme_test_command() -> None:
    test = _readme_commands()[1]
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci_lines


@pytest.mark.parametrize("dropin", sorted((ROOT / "twisted" / "plugins").glob("*.py")))
def test_dropin_is_one_servicemaker(dropin: Path) -> None:
    """A dropin that imports more than ServiceMaker slows every twistd and can install a
    reactor before --reactor is applied."""
    tree = ast.parse(dropin.read_text())
    imports = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    assert [ast.unparse(n) for n in imports] == [
        "from twisted.application.service import ServiceMaker"
    ]
    assigns = [n for n in tree.body if not isinstance(n, ast.Import | ast.ImportFrom)]
    assert len(assigns) == 1
    assert isinstance(assigns[0], ast.Assign)
    call = assigns[0].value
    assert isinstance(call, ast.Call) and ast.unparse(call.func) == "ServiceMaker"


def test_no_init_under_twisted() -> None:
    assert not (ROOT / "twisted" / "__init__.py").exists()
    assert not (ROOT / "twisted" / "plugins" / "__init__.py").exists()


def test_every_package_is_listed_in_setup_cfg() -> None:
    """setup.cfg lists packages by hand (for twisted.plugins); a new one must be added."""
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    found = {
        ".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "kthena").rglob("__init__.py")
    }
    assert found <= listed
    assert "twisted.plugins" in listed
