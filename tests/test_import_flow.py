"""The house follows the data: capture -> storage <- analysis <- api, no import cycles.

Reads every module of the installed ``mechray`` package with ``ast`` (imports at module level and
inside functions), so a new import against the flow fails here with the offending line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import mechray

ROOT = Path(mechray.__file__).parent

# package -> packages it may import (besides itself). Top-level modules not listed here
# (cli, serve, testing, the package __init__, demo) sit above everything and may import anything.
MAY_IMPORT = {
    "_util": set(),
    "version": set(),
    "errors": {"_util"},
    "config": {"_util", "errors", "version"},
    "capture": {"_util", "config", "errors", "version", "storage"},
    "storage": {"_util", "config", "errors", "version"},
    # interventions hook the live model with capture's rules (layer names, which output tensor)
    "analysis": {"_util", "config", "errors", "version", "storage", "capture"},
    "api": {"_util", "config", "errors", "version", "storage", "analysis"},
}
# The one import against the flow, done lazily inside a validator: config checks analysis names
# against the registry (mechray.analysis.base), which is the single list of analyses.
EXCEPTIONS = {("mechray.config", "mechray.analysis.base")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported mechray module, line, at module level) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    here = module_name(path)
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                pkg = here.split(".")[: len(here.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join(pkg + ([base] if base else []))
            # ``from pkg import sub`` imports the module pkg.sub; ``from pkg import name``, pkg
            names = [f"{base}.{a.name}" for a in node.names] \
                if base == "mechray" or base.startswith("mechray.") else []
        for name in names:
            if name == "mechray" or name.startswith("mechray."):
                out.append((_existing(name), node.lineno, id(node) in top))
    return out


def _existing(name: str) -> str:
    """The longest prefix of ``name`` that is a module or package of mechray."""
    parts = name.split(".")
    while len(parts) > 1:
        rel = Path(*parts[1:])
        if (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file():
            return ".".join(parts)
        parts.pop()
    return "mechray"


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def against_flow(module: str, target: str) -> bool:
    src, dst = layer_of(module), layer_of(target)
    if src not in MAY_IMPORT or dst == src or (module, target) in EXCEPTIONS:
        return False
    return dst not in MAY_IMPORT[src]


def test_every_import_points_along_the_flow():
    wrong = [f"{path.relative_to(ROOT.parent)}:{line}: {module} imports {target} "
             f"({layer_of(module)} may import only {sorted(MAY_IMPORT[layer_of(module)])})"
             for module, path in all_modules().items() for target, line, _ in imports(path)
             if against_flow(module, target)]
    assert not wrong, "imports against the data flow:\n" + "\n".join(wrong)


def test_the_rules_catch_imports_against_the_flow(tmp_path):
    assert against_flow("mechray.storage.reader", "mechray.analysis.base")
    assert against_flow("mechray.capture.sampler", "mechray.api.routes")
    assert against_flow("mechray.errors", "mechray.config")
    assert not against_flow("mechray.api.service", "mechray.storage.reader")
    # and the walk sees imports inside functions, where a lazy import could hide
    pkg = tmp_path / "mechray" / "storage"
    pkg.mkdir(parents=True)
    (pkg / "probe.py").write_text("def f():\n    from mechray.analysis import base\n")
    globals()["ROOT"], old = tmp_path / "mechray", ROOT
    try:
        (tmp_path / "mechray" / "analysis").mkdir()
        (tmp_path / "mechray" / "analysis" / "base.py").write_text("")
        found = imports(pkg / "probe.py")
    finally:
        globals()["ROOT"] = old
    assert [(t, top) for t, _, top in found] == [("mechray.analysis.base", False)]


def related(a: str, b: str) -> bool:
    """A package and its own submodules (an ``__init__`` importing what it registers)."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def test_no_import_cycles_at_module_level():
    modules = all_modules()
    graph = {m: sorted({t for t, _, top in imports(p) if top and not related(m, t)})
             for m, p in modules.items()}
    cycles: list[str] = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("package", ["mechray", "mechray.capture", "mechray.storage",
                                     "mechray.analysis", "mechray.api"])
def test_star_import_gives_every_name_in_all(package):
    """``from PACKAGE import *`` works: every name ``__all__`` promises exists (ruff's F822
    does not check ``__init__.py``; ``mechray.analysis`` once listed four it never imported)."""
    import importlib

    module = importlib.import_module(package)
    missing = [name for name in getattr(module, "__all__", []) if not hasattr(module, name)]
    assert not missing, f"{package}.__all__ names {missing}, which it does not define"
    exec(f"from {package} import *", {})


def _runtime_imports(path: Path) -> set[str]:
    """The mechray modules ``path`` imports when it runs: at module level or inside a function,
    but not under ``if TYPE_CHECKING:`` (annotations only; its ``else:`` runs)."""
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {n.lineno for node in ast.walk(tree) if isinstance(node, ast.If)
                   and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING"
                   for stmt in node.body for n in ast.walk(stmt) if hasattr(n, "lineno")}
    return {t for t, line, _ in imports(path) if line not in typing_only}


def circles(graph: dict[str, list[str]]) -> set[frozenset[str]]:
    """Every import circle in ``graph`` (module -> modules it imports): its strongly connected
    components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: set[frozenset[str]] = set()

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = set()
            while True:
                w = stack.pop()
                part.add(w)
                if w == v:
                    break
            if len(part) > 1:
                found.add(frozenset(part))

    for m in sorted(graph):
        if m not in index:
            connect(m)
    return found


def runtime_graph() -> dict[str, list[str]]:
    modules = all_modules()
    return {m: sorted(t for t in _runtime_imports(p) if t in modules and not related(m, t))
            for m, p in modules.items()}


def test_no_import_circles_counting_function_level_imports():
    """The package's import graph, lazy imports included, has no circle (``analysis/sae/``
    opened the three the review found: ``inputs`` and ``intervene``, the SAE rows and the
    analysis, the SAE model and its trainer; ``storage`` the two of the S3 history work: the
    claim, history, manifest and sink, and the transports and the writer pool)."""
    found = circles(runtime_graph())
    assert not found, f"import circles (lazy imports counted): {sorted(sorted(c) for c in found)}"


def test_a_circle_through_a_function_level_import_is_found(tmp_path):
    """The circle check sees a lazy import that closes a circle, and an import in the ``else:``
    of ``if TYPE_CHECKING:``, but not one under ``if TYPE_CHECKING:`` (annotations only)."""
    pkg = tmp_path / "mechray" / "storage"
    pkg.mkdir(parents=True)
    (pkg / "low.py").write_text("def f():\n    from mechray.storage.high import g\n")
    (pkg / "high.py").write_text("from mechray.storage import low, other, typed\n")
    (pkg / "typed.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                  "    from mechray.storage.high import g\n")
    (pkg / "other.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                  "    pass\nelse:\n    from mechray.storage.high import g\n")
    globals()["ROOT"], old = tmp_path / "mechray", ROOT
    try:
        graph = runtime_graph()
    finally:
        globals()["ROOT"] = old
    # counting the annotation-only import would add typed; missing the lazy one would leave out
    # low, and missing the else branch, other
    assert circles(graph) == {frozenset({f"mechray.storage.{m}" for m in ("low", "high", "other")})}
