"""The shape of the code: its floors (each package and subpackage imports only from the floors
below it), no import cycle between the project's modules (imports inside functions included,
where a cycle hides), and no module reaching into another's private names."""

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


# The floors of the house, from the bottom up. A module imports from its own unit (a package's top
# level, or one subpackage) or from a lower floor, never from beside or above: files and manifests
# know nothing of alignment, the DataModules nothing of models, training nothing of serving,
# tracking nothing of the training callbacks, and only the command line knows every command.
FLOORS = (
    ("datamodules.io",),  # manifests, images, prediction sources, atomic files
    ("datamodules.alignment", "datamodules.download", "datamodules.synthau", "datamodules.benchmarks"),
    ("datamodules",),  # the two DataModules, the sampler, augmentation
    ("lightning_modules",),  # the networks, losses, metrics: the training science
    ("lightning_modules.serving",),  # predictor, pyfunc model, ONNX
    ("callbacks.tracking",),  # MLflow: spool, lineage, system metrics
    ("callbacks",),  # the training callbacks
    ("experiments",),  # the commands: fit, predict and its annotated copies, sweep, compare...
    ("experiments.ablation",),
    ("experiments.cli",),  # the entry point
)
FLOOR = {unit: level for level, units in enumerate(FLOORS) for unit in units}
# The DataModules' floor holds only these; everything else has a subpackage of its kind.
DATAMODULES_TOP = {"au_datamodule", "pretrain_datamodule", "sampling", "augmentation"}


def _unit(module: str) -> str:
    """The unit a module belongs to: ``experiments.cli`` itself, a subpackage, or a package's top."""
    parts = module.split(".")
    return module if module in FLOOR else ".".join(parts[:2]) if len(parts) > 2 else parts[0]


def _floor_breaches(graph: dict[str, set[str]]) -> list[str]:
    """Every import that goes sideways or up the floors."""
    found = []
    for name, imported in sorted(graph.items()):
        for other in sorted(imported):
            a, b = _unit(name), _unit(other)
            if a != b and FLOOR[b] >= FLOOR[a]:
                found.append(f"{name} (floor {FLOOR[a]}) imports {other} (floor {FLOOR[b]})")
    return found


def test_floor_check_finds_a_breach():
    assert _floor_breaches({"datamodules.io.manifest": {"datamodules.alignment.align"}}) == [
        "datamodules.io.manifest (floor 0) imports datamodules.alignment.align (floor 1)"]
    assert _floor_breaches({"datamodules.synthau.scene": {"datamodules.download.downloader"}})  # beside
    assert _floor_breaches({"lightning_modules.au_detector": {"lightning_modules.serving.predictor"}})
    assert not _floor_breaches({"lightning_modules.serving.predictor": {"lightning_modules.au_detector"},
                                "experiments.ablation.run": {"experiments.tracking"}})


def test_every_module_has_a_floor():
    assert [name for name in _modules() if _unit(name) not in FLOOR] == []


def test_imports_go_down_the_floors():
    modules = _modules()
    graph = {name: _imports(name, tree, set(modules)) for name, tree in modules.items()}
    assert _floor_breaches(graph) == []


def test_datamodules_top_holds_only_datamodules_sampler_and_augmentation():
    assert {p.stem for p in (ROOT / "datamodules").glob("*.py")} - {"__init__"} == DATAMODULES_TOP


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
