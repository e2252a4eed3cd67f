"""The package's structure: imports among its modules run one way (no circle), and every module stays readable in
one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# source folder -> package it installs as (pyproject.toml's package-dir)
PACKAGES = {"tokendance_sgl": "tokendance_sgl", "kernels": "tokendance_sgl.kernels", "patches": "tokendance_sgl.patches"}
MAX_LINES = 520  # about 500: a module reads in one sitting
MAX_FUNCTION_LINES = 80
# the core: the cache, its parts and the worker side (the frontend, workloads and tools may have longer functions)
CORE = ("accounting", "backend", "bases", "collective_tree", "collector", "config", "diff_alloc", "early_match", "host",
        "ledger", "live_rows", "pic", "planning", "position_map", "radix_holds", "recompute", "request_state", "reuse",
        "segment_store", "segments", "selection", "support")


def _modules() -> dict[str, Path]:
    out = {}
    for folder, pkg in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules ``name`` imports (at any level, lazily or not)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                mod = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):  # a package's own __init__ is not an edge
                found.add(t)
    return found


def _cycle(graph: dict[str, set[str]]):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                got = visit(m)
                if got:
                    return got
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            got = visit(n)
            if got:
                return got
    return None


def test_no_import_circle_among_the_package_modules():
    mods = _modules()
    known = set(mods)
    graph = {name: _imports(name, path, known) for name, path in mods.items()}
    assert "tokendance_sgl.collective_tree" in graph["tokendance_sgl.pic"]  # the parser sees real edges
    cycle = _cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_modules_stay_small():
    big = {str(p.relative_to(ROOT)): n for p in _modules().values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_core_functions_stay_short():
    long = {}
    for name in CORE:
        tree = ast.parse((ROOT / "tokendance_sgl" / f"{name}.py").read_text())
        for n in ast.walk(tree):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES:
                long[f"{name}.{n.name}"] = n.end_lineno - n.lineno + 1
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
