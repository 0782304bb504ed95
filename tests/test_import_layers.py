"""Imports go one way: base -> converters -> runtime -> commands, with tasks, train and eval beside the runtime.

Read from the source with ``ast`` (no third-party tool, nothing imported), function-level imports included, since
that is where cycles hide. See docs/architecture.md for what each layer holds.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("toolchain", "converters")

# module prefix -> layer; the longest matching prefix wins
LAYER_OF = {
    "toolchain": "base",  # the package root: __version__, plus the lazy `Model` re-export (see EXCEPTIONS)
    "toolchain.errors": "base",
    "toolchain.paths": "base",
    "toolchain.fmt": "base",
    "toolchain.console": "base",
    "toolchain.heads": "base",
    "toolchain.gguf_keys": "base",
    "toolchain.sdist": "base",
    "toolchain.models": "base",
    "toolchain.validate": "base",
    "toolchain.atomic": "base",
    "converters": "converters",
    "toolchain.runtime": "runtime",
    "toolchain.tasks": "tasks",
    "toolchain.train": "train",
    "toolchain.eval": "eval",
    "toolchain.commands": "commands",
    "toolchain.cli": "commands",
}
# what each layer may import (its own layer included)
ALLOWED = {
    "base": {"base"},
    "converters": {"base", "converters"},
    "runtime": {"base", "converters", "runtime"},
    "tasks": {"base", "tasks"},
    "train": {"base", "converters", "tasks", "train"},
    "eval": {"base", "converters", "runtime", "tasks", "eval"},
    "commands": {"base", "converters", "runtime", "tasks", "train", "eval", "commands"},
}
# `from toolchain import Model` is the public API; the package root imports it lazily, inside a function
EXCEPTIONS = {("toolchain", "toolchain.runtime.model")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(mod: str, path: Path, known: set[str]) -> set[str]:
    """Every first-party module ``mod`` imports, anywhere in the file."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(mod, is_pkg, node)
            # `from pkg import sub` imports the submodule pkg.sub; `from pkg import name` imports pkg
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in known else target for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import a.b.c` of a non-module tail -> its nearest module
                name = name.rpartition(".")[0]
            if name and name.split(".")[0] in PACKAGES and name != mod:
                out.add(name)
    return out


def _layer(mod: str) -> str:
    best = max((p for p in LAYER_OF if mod == p or mod.startswith(p + ".")), key=len, default=None)
    assert best is not None, f"{mod} is in no layer: add it to LAYER_OF"
    return LAYER_OF[best]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(m, p, set(mods)) for m, p in mods.items()}


def test_every_module_has_a_layer(graph):
    for mod in graph:
        _layer(mod)


def test_no_upward_or_sideways_import(graph):
    bad = [f"{m} ({_layer(m)}) imports {t} ({_layer(t)})" for m, targets in sorted(graph.items())
           for t in sorted(targets) if _layer(t) not in ALLOWED[_layer(m)] and (m, t) not in EXCEPTIONS]
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycles(graph):
    cycles = _cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_function_level_imports_and_cycles(tmp_path):
    """The rules would catch the cycles this layout removed: a function-level import is an edge like any other."""
    pkg = tmp_path / "toolchain" / "runtime"
    pkg.mkdir(parents=True)
    (tmp_path / "toolchain" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "beacons.py").write_text("def f():\n    from ..commands.convert import convert_model\n")
    node = ast.parse((pkg / "beacons.py").read_text()).body[0].body[0]
    assert _resolve("toolchain.runtime.beacons", False, node) == "toolchain.commands.convert"
    assert _layer("toolchain.commands.convert") not in ALLOWED[_layer("toolchain.runtime.beacons")]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
