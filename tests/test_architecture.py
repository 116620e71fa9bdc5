"""The package's layout rules (ARCHITECTURE.md, "Layers and import directions"), checked on the
source: imports only point down the layers, techniques never import each other, no import
cycle, no long function without a stated reason."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "onnxcomp"

# Lowest first. A module may import modules of its own layer and of any lower layer; in the
# techniques layer a component (one technique) imports no other technique.
INDEPENDENT = "techniques"
LAYERS: list[tuple[str, list[str]]] = [
    ("errors", ["onnxcomp.errors", "onnxcomp"]),
    ("core", ["onnxcomp.core"]),
    ("backends", ["onnxcomp.backends"]),
    ("data", ["onnxcomp.data"]),
    ("storage", ["onnxcomp.storage"]),
    ("stats", ["onnxcomp.stats"]),
    ("framework", ["onnxcomp.converter.base", "onnxcomp.converter.verify", "onnxcomp.report"]),
    (
        "techniques",
        [
            "onnxcomp.converter.cleanup",
            "onnxcomp.converter.prune",
            "onnxcomp.converter.lowrank",
            "onnxcomp.converter.equalize",
            "onnxcomp.converter.quantize",
            "onnxcomp.converter.binarize",
            "onnxcomp.converter.sparsify",
            "onnxcomp.converter.share",
            "onnxcomp.training",
            "onnxcomp.export",
        ],
    ),
    ("pipeline", ["onnxcomp.converter.pipeline", "onnxcomp.converter"]),
    ("tools", ["onnxcomp.converter.convert", "onnxcomp.converter.debug", "onnxcomp.deploy"]),
    ("cli", ["onnxcomp.cli", "onnxcomp.__main__"]),
]
MAX_FUNCTION_LINES = 80
LONG_REASON = "Long because"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """onnxcomp modules imported anywhere in the file (function-level imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("onnxcomp") and target != name:
                found.add(target)
    return found


def component(name: str) -> tuple[int, str]:
    """(layer index, component prefix) of a module: the longest matching prefix wins."""
    best: tuple[int, str] | None = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            matches = name == prefix or name.startswith(prefix + ".")
            if matches and (best is None or len(prefix) > len(best[1])):
                best = (index, prefix)
    if best is None:
        raise AssertionError(f"{name} is in no layer: add it to LAYERS and ARCHITECTURE.md")
    return best


def import_graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported_modules(path, name, set(found)) for name, path in found.items()}


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for name, imports in sorted(graph.items()):
        layer, prefix = component(name)
        for target in sorted(imports):
            target_layer, target_prefix = component(target)
            if target_layer > layer:
                problems.append(
                    f"{name} ({LAYERS[layer][0]}) imports {target} ({LAYERS[target_layer][0]}), "
                    "which is above it"
                )
            elif (
                target_layer == layer
                and LAYERS[layer][0] == INDEPENDENT
                and target_prefix != prefix
            ):
                problems.append(f"{name} imports {target}: techniques import no other technique")
    return problems


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_every_module_has_a_layer():
    for name in modules():
        component(name)


def test_imports_point_down_the_layers():
    assert layer_violations(import_graph()) == []


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_checks_catch_what_they_are_for():
    """The checks fail on a hand-built graph that breaks each rule (they can fail)."""
    graph = {
        "onnxcomp.core.io": {"onnxcomp.converter.prune.prune_pass"},
        "onnxcomp.converter.prune.prune_pass": {"onnxcomp.converter.lowrank.lowrank_pass"},
        "onnxcomp.converter.lowrank.lowrank_pass": {"onnxcomp.converter.prune.prune_pass"},
    }
    problems = layer_violations(graph)
    assert any("above it" in p for p in problems)
    assert any("no other technique" in p for p in problems)
    assert find_cycle(graph) is not None
    with pytest.raises(AssertionError, match="no layer"):
        component("elsewhere.module")


def long_functions() -> list[str]:
    found = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                doc = ast.get_docstring(node) or ""
                if length > MAX_FUNCTION_LINES and LONG_REASON not in doc:
                    found.append(f"{name}.{node.name}: {length} lines")
    return found


def test_long_functions_say_why():
    assert long_functions() == []
