"""The package's import graph, read with ``ast`` (imports at the top of files and inside functions alike):
no cycle between packages, the packages in pipeline order (a package never imports one above it), and few
imports of the package inside functions. The order and what each package owns: docs/architecture.md.

Run as a script for the numbers: ``python3 tests/test_architecture.py``."""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "prunepath"

# Bottom to top. A package may import only packages listed before it ("__init__" is the front door,
# prunepath/__init__.py; "registrations" fills the registries and is imported by the front door only).
ORDER = ["errors", "_version", "io", "hf_remote", "state", "data", "models", "routing", "conversion", "stats", "checkpoint",
         "calibration", "baselines", "training", "evaluation", "kernels", "decoding", "registrations", "__init__",
         "pipeline", "cli"]
MAX_IN_FUNCTION = 25


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _targets(node: ast.AST, module: str, is_pkg: bool) -> list[str]:
    """The prunepath modules an import statement loads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = module.split(".")
        if not is_pkg:
            base = base[:-1]
        base = base[:len(base) - node.level + 1]
        name = ".".join(base + ([node.module] if node.module else []))
    else:
        name = node.module or ""
    out = [name]
    for a in node.names:  # `from prunepath import registrations` loads prunepath.registrations
        sub = name + "." + a.name
        rel = Path(*sub.split(".")[1:])
        if (SRC / rel).with_suffix(".py").exists() or (SRC / rel / "__init__.py").exists():
            out.append(sub)
    return out


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]], list[tuple[str, str, str]]]:
    """(package → packages it imports, in-function imports (module, target, line), module-level edges)."""
    edges: dict[str, set[str]] = defaultdict(set)
    in_function: list[tuple[str, str, int]] = []
    detail: list[tuple[str, str, str]] = []
    for path in sorted(SRC.rglob("*.py")):
        module = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = [t for t in _targets(node, module, path.name == "__init__.py")
                       if t == "prunepath" or t.startswith("prunepath.")]
            if not targets:
                continue
            p, inside = node, False
            while p in parents:
                p = parents[p]
                if isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    inside = True
                    break
            if inside:
                in_function.append((module, targets[0], node.lineno))
            for t in targets:
                a, b = _package(module), _package(t)
                if a != b:
                    edges[a].add(b)
                    detail.append((module, t, "in function" if inside else "top"))
    return edges, in_function, detail


def package_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one package (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_between_packages():
    edges, _, _ = import_graph()
    assert package_cycles(edges) == []


def test_packages_follow_the_pipeline_order():
    edges, _, detail = import_graph()
    rank = {p: i for i, p in enumerate(ORDER)}
    assert set(edges) | {w for ws in edges.values() for w in ws} <= set(rank), "a package missing from ORDER"
    upward = [(m, t, where) for m, t, where in detail if rank[_package(t)] > rank[_package(m)]]
    assert upward == []


def test_few_imports_of_the_package_inside_functions():
    _, in_function, _ = import_graph()
    assert len(in_function) <= MAX_IN_FUNCTION, in_function


if __name__ == "__main__":
    edges, in_function, detail = import_graph()
    print("package cycles:", package_cycles(edges) or "none")
    print(f"imports of the package inside functions: {len(in_function)}")
    for m, t, line in in_function:
        print(f"  {m}:{line} -> {t}")
    rank = {p: i for i, p in enumerate(ORDER)}
    for p in sorted(edges, key=lambda p: rank.get(p, -1)):
        print(f"{p:14s} -> {', '.join(sorted(edges[p], key=lambda q: rank.get(q, -1)))}")
    sys.exit(0 if not package_cycles(edges) else 1)
