"""The built wheel installs the twistd dropins without shadowing Twisted's own package."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_carries_dropins_and_no_twisted_init(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True,
        timeout=120,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("kthena_router-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/kthena_sim.py" in names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert "kthena/py.typed" in names
    assert "kthena/sim/engine.py" in names
