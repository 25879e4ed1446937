"""The shape of the code: no import cycle between the project's modules (imports inside functions
included, where a cycle hides), and no module reaching into another's private names."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("datamodules", "lightning_modules", "callbacks", "experiments")


def _modules() -> dict[str, ast.Module]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): ast.parse(p.read_text(), str(p))
            for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py")) if p.stem != "__init__"}


def _imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """Project modules a module imports, anywhere in it."""
    found = set()
    package = name.split(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = f"{package}.{node.module}" if node.level else node.module or ""
            if base in known:
                found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known}
    return found - {name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph, if there is one."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(name, tree, set(modules)) for name, tree in modules.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def _own_names(tree: ast.Module) -> set[str]:
    """Every name a module defines: functions, classes, attributes it assigns, arguments."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return names


def _private(attr: str, own: set[str]) -> bool:
    return attr.startswith("_") and not attr.startswith("__") and attr not in own


def _is_self(value: ast.expr) -> bool:
    """``self``, ``cls`` or ``super()``: a class using what it inherits (e.g. Lightning's documented
    ``Callback._generate_state_key``) is not reaching into another object."""
    return (isinstance(value, ast.Name) and value.id in ("self", "cls")) or (
        isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "super")


def test_no_module_reaches_into_private_names_of_another():
    """``obj._name`` is fine for a name the module itself defines (its own class's attribute);
    anything else private (another module's, or a library's) is reached for from outside."""
    found = []
    for name, tree in _modules().items():
        own = _own_names(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                found += [f"{name}: imports {node.module}.{a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
            elif isinstance(node, ast.Attribute):
                if _private(node.attr, own) and not _is_self(node.value):
                    found.append(f"{name}:{node.lineno}: .{node.attr}")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id in ("getattr", "hasattr", "setattr") and len(node.args) > 1
                  and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
                if _private(node.args[1].value, own):  # the same reach, spelt as a string
                    found.append(f"{name}:{node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
    assert found == []
