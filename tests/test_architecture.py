"""The dependency rules, read from the source with ast (no imports run): no import circle among
the product's modules; client/ and server/ never import each other; shared/ imports only
shared/ and holds only what client/ or server/ uses; each one-of-a-kind helper has one
definition."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "client", "server", "dental_datasets", "simulations", "dentfed")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((REPO / pkg).rglob("*.py")):
            parts = f.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _graph() -> dict[str, set[str]]:
    """module -> the product modules it imports (anywhere in the file, also inside functions)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods
                         else node.module for a in node.names]
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != mod and mods[name].name != "__init__.py":
                    graph[mod].add(name)  # (package __init__ files are empty markers)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walker_sees_real_imports():
    graph = _graph()
    assert "shared.config" in graph["shared.models"]
    assert "server.federation" in graph["server.run"]  # a module-level import
    assert "server.secagg" in graph["server.run"]  # an import inside a function
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# Known and being removed on another branch (issue 12: the clinic's state and training function
# move to their own module). Empty this list when that lands; a new circle fails either way.
def test_no_import_circle():
    assert _cycles(_graph()) == []


def test_layers():
    bad = []
    allowed = {"shared": {"shared"}, "client": {"shared", "client"},
               "server": {"shared", "server"}, "dental_datasets": {"shared", "dental_datasets"}}
    for mod, deps in _graph().items():
        top = mod.split(".")[0]
        for d in deps:
            if top in allowed and d.split(".")[0] not in allowed[top]:
                bad.append(f"{mod} imports {d}")
    assert bad == []


def test_every_shared_module_is_used_by_client_or_server():
    graph = _graph()
    seen: set[str] = set()
    todo = [m for m in graph if m.split(".")[0] in ("client", "server")]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    unused = [m for m in graph if m.startswith("shared.") and m not in seen
              and _modules()[m].name != "__init__.py"]
    assert unused == [], "move these to the part that uses them"


ONE_DEFINITION = {  # helper -> the one module that may define it
    r"def write_text_atomic\b": "shared/atomic_files.py",
    r"def atomic_folder\b": "shared/atomic_files.py",
    r"def torch_save_atomic\b": "shared/atomic_files.py",
    r"def save_model_file\b": "shared/model_file.py",
    r"def read_model_file\b": "shared/model_file.py",
    r"def probabilities\b": "shared/models.py",
    r"def _?free_port\b": "simulations/engine.py",
    r"^IMAGE_SUFFIXES\b": "shared/data/readers.py",
}


def test_each_helper_has_one_definition():
    files = [f for pkg in (*PACKAGES, "tests") for f in (REPO / pkg).rglob("*.py")]
    for pattern, home in ONE_DEFINITION.items():
        rx = re.compile(pattern, re.M)
        where = sorted(str(f.relative_to(REPO)) for f in files if rx.search(f.read_text())
                       and f.name != "test_architecture.py")
        assert where == [home], pattern
    # the model file's keys are written in one place only
    writers = sorted(str(f.relative_to(REPO)) for f in files
                     if '"trainable_keys":' in f.read_text() and f.parts[-2] != "tests")
    assert writers == ["shared/model_file.py"]
