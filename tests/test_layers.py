"""Imports point one way: api -> engine -> graphs -> ops, each layer using only the layers below it.

Read from the source with `ast`, not by importing (ops/cuda and graphs need CuPy), and every import counts:
those inside functions (the lazy ones), under `if TYPE_CHECKING`, and importlib calls by name. (A relative import
stays inside its top-level package, so it cannot point up; it is resolved all the same.)
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("ops", "graphs", "engine", "api")  # bottom first: a layer may import those before it, never after
RANK = {name: i for i, name in enumerate(LAYERS)}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.AST, module: str, is_package: bool):
    """(line, absolute module name) of every import anywhere in `tree`."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # from . import x, from ..y import z
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            yield node.lineno, base
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and \
                isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__"):
                yield node.lineno, node.args[0].value


def upward_imports(path: Path, source: str | None = None) -> list[str]:
    """'file:line: layer imports module (a higher layer)' for every import of `path` that points up."""
    module = module_name(path)
    layer = module.split(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8") if source is None else source, filename=str(path))
    found = []
    for line, target in imported_modules(tree, module, path.name == "__init__.py"):
        top = target.split(".")[0]
        if top in RANK and RANK[top] > RANK[layer]:
            found.append(f"{path.relative_to(ROOT)}:{line}: {layer} imports {target}, a layer above it "
                         f"(allowed: {', '.join(LAYERS[:RANK[layer]]) or 'none of ' + ', '.join(LAYERS[1:])})")
    return found


def layer_files() -> list[Path]:
    return sorted(p for layer in LAYERS for p in (ROOT / layer).rglob("*.py") if "__pycache__" not in p.parts)


def test_every_layer_is_read():
    files = layer_files()
    for layer in LAYERS:
        assert any(module_name(p).split(".")[0] == layer for p in files), f"no module of {layer} found"
    assert ROOT / "ops" / "cuda" / "upload.py" in files and ROOT / "graphs" / "manager.py" in files


def test_no_import_points_up():
    problems = [p for path in layer_files() for p in upward_imports(path)]
    assert not problems, "imports that point up the layers (api > engine > graphs > ops):\n" + "\n".join(problems)


def test_lazy_imports_are_seen():
    """The engine's lazy import of the graphs (inside ModelRunner.__init__) is one the walk finds."""
    path = ROOT / "engine" / "model_runner.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    assert any(target == "graphs.manager" for _, target in imported_modules(tree, "engine.model_runner", False))


@pytest.mark.parametrize("source, line, target", [
    ("def f():\n    from engine.loader import WeightsError\n", 2, "engine.loader"),
    ("import numpy\n\n\nclass A:\n    def m(self):\n        import graphs.manager as g\n", 6, "graphs.manager"),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from api import cli\n", 3, "api"),
    ("import importlib\nimportlib.import_module('engine.demo')\n", 2, "engine.demo"),
])
def test_an_upward_import_is_named_with_file_and_line(source, line, target):
    assert upward_imports(ROOT / "ops" / "cuda" / "fake.py", source) == [
        f"ops/cuda/fake.py:{line}: ops imports {target}, a layer above it (allowed: none of graphs, engine, api)"]


def test_downward_same_layer_and_relative_imports_pass():
    source = "from ops.metadata import AttentionMetadata\nfrom graphs import manager\nfrom . import config\n"
    assert upward_imports(ROOT / "engine" / "fake.py", source) == []
    assert upward_imports(ROOT / "graphs" / "fake.py", "from engine import config\n") == [
        "graphs/fake.py:1: graphs imports engine, a layer above it (allowed: ops)"]
