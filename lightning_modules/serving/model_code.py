"""The code a logged model carries: the project's modules that loading and serving it import.

An MLflow model from code ships the Python it runs (``code_paths``). Shipping whole packages
would put the training loop, the downloader and the SynthAU renderer into every model; instead
the modules are found by following imports from the model's entry file
(:mod:`lightning_modules.serving.pyfunc_model`), imports inside functions included (the ONNX
backend is imported only when asked for, but a served model may be asked). The files are read,
not run, so finding them imports nothing.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("datamodules", "lightning_modules")  # the project's packages a served model may import


def _file_of(module: str) -> Path | None:
    """The source file of a project module or package, if ``module`` is one."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported(path: Path) -> set[str]:
    """The modules a file imports anywhere in it, named absolutely (``from x import y`` may name
    a module ``x.y`` or an attribute of ``x``: both are offered)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def served_files(entry: Path) -> list[Path]:
    """``entry`` and every project file it needs, with the ``__init__.py`` of each package on the way."""
    seen: set[Path] = set()
    todo = [entry.resolve()]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in _imported(path):
            parts = module.split(".")
            # importing a.b.c runs a/__init__.py and a/b/__init__.py first
            for depth in range(1, len(parts) + 1):
                found = _file_of(".".join(parts[:depth]))
                if found is not None and found not in seen:
                    todo.append(found)
    return sorted(seen)


def copy_served_code(entry: Path, into: Path) -> list[Path]:
    """The files :func:`served_files` finds, copied under ``into`` in their packages' folders;
    returns the top-level package folders (what MLflow's ``code_paths`` takes)."""
    tops = set()
    for path in served_files(entry):
        relative = path.relative_to(ROOT)
        target = into / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        tops.add(into / relative.parts[0])
    return sorted(tops)
