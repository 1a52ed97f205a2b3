"""The package's import graph has no cycle, and the registry and contract stay torch-free."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("acestep_triton", "export", "gateway")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imported(tree: ast.AST, modules: set[str]) -> set[str]:
    """Our modules `tree` imports anywhere (function bodies included: a lazy import still runs),
    except under `if TYPE_CHECKING:`, which never runs."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found.update(name for name in names if name in modules)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """{module: the package modules it imports} for every module of PACKAGES."""
    files = {_module_name(p): p for package in PACKAGES for p in (REPO_ROOT / package).rglob("*.py")}
    return {name: _imported(ast.parse(path.read_text()), set(files)) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when the graph has none (depth-first search)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return []

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph()
    assert "acestep_triton.registry" in graph["acestep_triton.engines"]  # the walk sees real edges
    assert find_cycle(graph) == [], " -> ".join(find_cycle(graph))


def test_a_cycle_is_found() -> None:
    graph = import_graph()
    graph["acestep_triton.contract"] = graph["acestep_triton.contract"] | {"acestep_triton.registry"}
    cycle = find_cycle(graph)
    assert cycle[0] == cycle[-1] and "acestep_triton.registry" in cycle and "acestep_triton.contract" in cycle


@pytest.mark.parametrize("module", ["acestep_triton.registry", "acestep_triton.contract",
                                    "acestep_triton.ensemble_client", "export.build_repository"])
def test_torch_free_at_import(module: str) -> None:
    """The gateway and the config generator read these without loading torch."""
    code = f"import sys, {module}; sys.exit('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr or f"{module} imports torch"


@pytest.mark.parametrize("module", ["benchmarks.bench_pipeline", "benchmarks.bench_triton",
                                    "benchmarks.fullsize_export", "benchmarks.perf_triton"])
def test_benchmarks_import(module: str) -> None:
    """The GPU benchmarks run only on the device machine: an import they lost (a renamed function)
    must fail here, not in a device call."""
    importlib.import_module(module)
