"""The package's edges: the runtime never imports the benchmark harness, and its parts import each other
without cycles (imports under ``if TYPE_CHECKING:`` are annotations only and do not count)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = ROOT / "kvtier"
HARNESS = ROOT / "benchmarks" / "kvtier_bench"


def imports_of(path: Path, package: str) -> set[str]:
    """Absolute names of the modules ``path`` imports anywhere (functions too), TYPE_CHECKING blocks excluded."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative: resolve against this module's package
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + [node.module])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def module_name(path: Path, top: Path) -> str:
    rel = path.relative_to(top.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str:
    """The node of the layer graph: a sub-package (kvtier.tiers) or a top-level module (kvtier.config)."""
    parts = module.split(".")
    return ".".join(parts[:2])


def graph(top: Path, prefix: str) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in sorted(top.rglob("*.py")):
        name = module_name(path, top)
        unit = unit_of(name)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for target in imports_of(path, package):
            if target.split(".")[0] == prefix:
                other = unit_of(target)
                if other != unit and other != prefix:
                    edges.setdefault(unit, set()).add(other)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_runtime_never_imports_the_harness() -> None:
    offenders = [str(p.relative_to(ROOT)) for p in RUNTIME.rglob("*.py")
                 if any(n.split(".")[0] in ("kvtier_bench", "benchmarks") for n in imports_of(p, "kvtier"))]
    assert offenders == []


def test_importing_every_runtime_module_loads_nothing_of_the_harness() -> None:
    modules = [module_name(p, RUNTIME) for p in RUNTIME.rglob("*.py") if p.name != "__main__.py"]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in sys.modules if m.startswith('kvtier_bench')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_runtime_parts_import_each_other_without_cycles() -> None:
    edges = graph(RUNTIME, "kvtier")
    assert "kvtier.attention" not in edges.get("kvtier.tiers", set())
    assert "kvtier.connector" not in edges.get("kvtier.attention", set())  # the feed takes plain lists
    assert find_cycle(edges) is None, f"import cycle: {' -> '.join(find_cycle(edges) or [])}"


def test_harness_modules_import_each_other_without_cycles() -> None:
    edges: dict[str, set[str]] = {}
    for path in HARNESS.rglob("*.py"):
        name = module_name(path, HARNESS)
        for target in imports_of(path, name.rpartition(".")[0]):
            if target.startswith("kvtier_bench.") and target.count(".") == 1 and target != name:
                edges.setdefault(name, set()).add(target)
    assert find_cycle(edges) is None, f"import cycle: {' -> '.join(find_cycle(edges) or [])}"
