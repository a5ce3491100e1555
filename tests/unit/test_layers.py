"""
The import graph runs one way (ARCHITECTURE.md): config <- pods and the store <- engines
<- scheduler <- pipeline stages <- proxy <- observability <- service <- workers <- tap, with leaf
modules for what everyone shares. A module imports only its own layer and those below,
and no import cycle exists anywhere (type-checking imports included).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "kthena"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "leaves",
        (
            "kthena",
            "kthena.redact",
            "kthena.failures",
            "kthena.deferreds",
            "kthena.prompt",
            "kthena.errors",
            "kthena.lifecycle",
            "kthena.listening",
            "kthena.webutil",
            "kthena.engines.exposition",
            "kthena.engines.snapshot",
        ),
    ),
    ("config", ("kthena.config",)),
    (
        "pods and the store",
        (
            "kthena.engines.state",
            "kthena.pods",
            "kthena.store",
            "kthena.inference_routing",
            "kthena.interfaces",
            "kthena.podclient",
        ),
    ),
    ("sources", ("kthena.sources",)),
    ("simulator", ("kthena.sim",)),
    ("engines", ("kthena.engines",)),
    ("scheduler", ("kthena.scheduler",)),
    (
        "pipeline stages",
        (
            "kthena.record",
            "kthena.ratelimit",
            "kthena.identity",
            "kthena.fairness",
            "kthena.pd",
            "kthena.pipeline",
        ),
    ),
    ("proxy", ("kthena.proxy", "kthena.http")),
    ("observability", ("kthena.observability",)),
    ("service", ("kthena.service", "kthena.reload", "kthena.heap")),
    ("workers", ("kthena.workers",)),
    ("tap", ("kthena.tap",)),
]


def _modules() -> dict[str, Path]:
    modules = {}
    for path in ROOT.rglob("*.py"):
        parts = ["kthena", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            found.update(t for t in targets if t in modules and t != name)
        graph[name] = found
    return graph


def layer(module: str) -> int:
    """The layer of C{module}: the last one whose prefixes claim it (the most specific)."""
    best = -1
    best_length = -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or module.startswith(prefix + ".")
            if matches and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    if best < 0:
        pytest.fail(f"{module} belongs to no layer: add it to LAYERS")
    return best


GRAPH = _imports(_modules())


def test_every_module_has_a_layer() -> None:
    for module in GRAPH:
        layer(module)


def test_no_import_goes_up() -> None:
    upward = [
        f"{module} ({LAYERS[layer(module)][0]}) imports {target} ({LAYERS[layer(target)][0]})"
        for module, targets in GRAPH.items()
        for target in targets
        if layer(target) > layer(module)
    ]
    assert upward == []


def test_no_import_cycle() -> None:
    done: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        for target in sorted(GRAPH[module]):
            if target in path:
                cycles.append([*path[path.index(target) :], target])
            elif target not in done:
                visit(target, [*path, target])
        done.add(module)

    for module in sorted(GRAPH):
        if module not in done:
            visit(module, [module])
    assert cycles == []


def test_layers_are_told_apart() -> None:
    """The most specific prefix wins, so the checks above cannot pass blind."""
    assert layer("kthena.observability.metrics") > layer("kthena.pipeline.pipeline")
    assert layer("kthena.proxy.site") > layer("kthena.pipeline.pipeline")
    assert layer("kthena.engines.state") < layer("kthena.engines.scraper")
    assert layer("kthena.engines.snapshot") == 0
