"""No import cycle among pcmoe's modules. Imports are read with `ast`, not run: module-level and
function-level imports both count (a lazy import still ties two modules together), and so do
`importlib.import_module("pcmoe.x")` / `__import__("pcmoe.x")` with a literal name."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pcmoe"


def module_names(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted name -> file of every module of the package (packages by their __init__.py)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The pcmoe module that importing `name` names (a name inside a module resolves to it)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, known: dict[str, Path]) -> dict[str, int]:
    """The pcmoe modules `module` imports anywhere in its file -> the first line that does."""
    is_package = path.name == "__init__.py"
    found: dict[str, int] = {}

    def add(name: str, line: int) -> None:
        target = _resolve(name, known)
        if target and target != module:
            found.setdefault(target, line)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:  # `from pcmoe.bench import suite` imports the module pcmoe.bench.suite
                add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source, node.lineno)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__"):
                add(node.args[0].value, node.lineno)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, dict[str, int]]:
    known = module_names(root)
    return {m: imports_of(m, p, known) for m, p in known.items()}


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, deterministic order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def _describe(cycle: list[str], graph) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_no_import_cycle_in_pcmoe():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + _describe(cycle, graph)


def test_the_checker_sees_every_kind_of_import(tmp_path):
    pkg = tmp_path / "pcmoe"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pcmoe.sub import b\n")  # function level, submodule
    (pkg / "sub" / "b.py").write_text("from . import c\n")                # relative
    (pkg / "sub" / "c.py").write_text("import importlib\nimportlib.import_module('pcmoe.a')\n")
    (pkg / "d.py").write_text("from pcmoe.a import f\n")                   # a name inside a module
    graph = import_graph(pkg)
    assert graph["pcmoe.a"] == {"pcmoe.sub.b": 2} and graph["pcmoe.sub.b"] == {"pcmoe.sub.c": 1}
    assert graph["pcmoe.d"] == {"pcmoe.a": 1}
    cycle = find_cycle(graph)
    assert cycle == ["pcmoe.a", "pcmoe.sub.b", "pcmoe.sub.c", "pcmoe.a"]
    assert _describe(cycle, graph) == ("pcmoe.a (line 2) -> pcmoe.sub.b (line 1) -> pcmoe.sub.c (line 2) "
                                       "-> pcmoe.a")
    (pkg / "sub" / "c.py").write_text("import pcmoe.d\n")  # d -> a -> b -> c -> d
    assert find_cycle(import_graph(pkg)) == ["pcmoe.a", "pcmoe.sub.b", "pcmoe.sub.c", "pcmoe.d", "pcmoe.a"]
    (pkg / "sub" / "c.py").write_text("x = 1\n")
    assert find_cycle(import_graph(pkg)) is None
