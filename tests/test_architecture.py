"""The file tree's promises, checked: the import graph of muxd/.

- protocol/ is sans-I/O and at the bottom: its modules import nothing of muxd
  but each other and muxd.errors;
- no circle of module-level imports (imports under ``if TYPE_CHECKING:`` and
  inside functions are not run at import time, and are left out);
- no module is longer than MAX_LINES unless its docstring says why, in a
  paragraph that starts with WHY_LONG.

Read from the source with ast, so a test failure names the file and the line.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "muxd"
MAX_LINES = 500
WHY_LONG = "Why this module is long:"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _top_level_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Imports run when the module is imported: at the top, or in a top-level
    if/try, but not under TYPE_CHECKING and not in a function or class."""
    found: list[ast.Import | ast.ImportFrom] = []
    todo: list[ast.stmt] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                todo += node.body
            todo += node.orelse
        elif isinstance(node, ast.Try):
            todo += node.body + node.orelse + node.finalbody
            for handler in node.handlers:
                todo += handler.body
    return found


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The muxd modules an import statement loads."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in MODULES}
    base = node.module or ""
    if node.level:
        package = module.split(".")
        is_package = MODULES[module].name == "__init__.py"
        package = package[: len(package) - node.level + (1 if is_package else 0)]
        base = ".".join([*package, base] if base else package)
    out = set()
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        if sub in MODULES:
            out.add(sub)  # `from muxd import config`: the submodule itself
        elif base in MODULES:
            out.add(base)
    return out


def _graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: line}"""
    graph: dict[str, dict[str, int]] = {}
    for name, path in MODULES.items():
        edges: dict[str, int] = {}
        for node in _top_level_imports(ast.parse(path.read_text(), str(path))):
            for target in _targets(name, node):
                if target != name:
                    edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def test_protocol_imports_nothing_above_it() -> None:
    wrong = [
        f"{MODULES[name]}:{line}: imports {target}"
        for name, edges in _graph().items()
        if name.startswith("muxd.protocol")
        for target, line in edges.items()
        if not (target.startswith("muxd.protocol") or target == "muxd.errors")
    ]
    assert not wrong, "\n".join(wrong)


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    graph = _graph()
    cycles = _cycles(graph)
    described = [
        "; ".join(
            f"{m} -> {t} ({MODULES[m].name}:{line})" for m in c for t, line in graph[m].items() if t in c
        )
        for c in cycles
    ]
    assert not cycles, "\n".join(described)


def test_cycle_finder_finds_a_cycle() -> None:
    # The check above is only as good as this: a known circle must be found.
    assert _cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]


def test_long_modules_say_why() -> None:
    unexplained = []
    for path in MODULES.values():
        lines = path.read_text().count("\n")
        if lines > MAX_LINES:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            if WHY_LONG not in doc:
                unexplained.append(f"{path}: {lines} lines, and no '{WHY_LONG}' in its docstring")
    assert not unexplained, "\n".join(unexplained)
