"""The package layout: imports go down the pipeline only, no import cycles, modules of a
readable size, and the README's public API is ``flowverify.__all__``."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import flowverify

SRC = Path(flowverify.__file__).parent
README = SRC.parents[1] / "README.md"

#: Stages of the pipeline, lowest first: a module may import from its own stage and the
#: ones before it.
STAGES = (
    "core",
    "transport",
    "model",
    "verification",
    "attacks",
    "baselines",
    "api",
    "io",
    "runner",
    "report",
    "paper",
    "cli",
)

#: Imports that still go up the pipeline; each is to be removed, none may be added.
KNOWN_UPWARD: set[tuple[str, str]] = set()

#: Import cycles between modules still present; each is to be removed, none may be added.
KNOWN_CYCLES: set[frozenset[str]] = set()


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str:
    """The module an imported name lives in (``a.b.c`` -> ``a.b`` if ``c`` is a name)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(module: str, path: Path) -> set[str]:
    """flowverify modules that ``module`` imports (anywhere in the file)."""
    out = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                root = ".".join(base + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            # ``from package import module`` depends on the module, not the package
            names = [
                f"{root}.{a.name}" if f"{root}.{a.name}" in MODULES else root for a in node.names
            ]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "flowverify":
                target = _resolve(name)
                if target and target != module:
                    out.add(target)
    return out


def _stage(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] not in STAGES:
        return len(STAGES)  # the package itself, __main__: the top
    return STAGES.index(parts[1])


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def test_no_module_over_500_lines():
    sizes = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    assert {m: n for m, n in sizes.items() if n > 500} == {}


def test_every_module_belongs_to_a_stage():
    loose = [m for m in MODULES if m.count(".") == 1 and m.split(".")[1] not in STAGES]
    assert sorted(loose) == ["flowverify.__main__"]


def test_imports_go_down_the_pipeline():
    upward = {
        (m, t)
        for m, targets in GRAPH.items()
        for t in targets
        if t != "flowverify" and _stage(t) > _stage(m)
    }
    assert upward - KNOWN_UPWARD == set()
    assert KNOWN_UPWARD - upward == set(), "a known upward import is gone: drop it from the list"


def _cycles() -> set[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), set()
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH.get(v, ()):
            if w not in MODULES or w == "flowverify":
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.add(frozenset(comp))

    for v in MODULES:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    found = _cycles()
    assert found - KNOWN_CYCLES == set()
    assert KNOWN_CYCLES - found == set(), "a known cycle is gone: drop it from the list"


def test_no_public_name_shares_a_name_with_a_module():
    """``import flowverify.x.y`` and ``from flowverify.x import y`` give the same object."""
    import importlib

    for package in [m for m, p in MODULES.items() if p.name == "__init__.py"]:
        for name in getattr(importlib.import_module(package), "__all__", ()):
            assert f"{package}.{name}" not in MODULES, f"{package}.{name}"


def test_readme_lists_exactly_the_public_api():
    text = README.read_text()
    section = text[text.index("The public API is `flowverify.__all__`") :].split("\n\n")[0]
    listed = set(re.findall(r"`(\w+)`", section))
    assert listed == set(flowverify.__all__)
