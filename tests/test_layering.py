"""The package's import graph: no circle anywhere and no import from a lower layer to a higher one
(DESIGN.md, "Layout"). Imports inside functions count too: a lazy import only hides a circle.

Layers, lowest first (a module may import its own layer and the ones below):
  0  records, config, optional, child_process, file_digest, regular_file
  1  gpu, documents
  2  store, graph, isne, embedding, orchestration
  3  pipelines, retrieval
  4  benchmarks, cluster, cli, ingest (entry points)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hades_gpu"
LAYERS = {"records": 0, "config": 0, "optional": 0, "child_process": 0, "file_digest": 0, "regular_file": 0, "exit_guard": 0, "console_logs": 0, "gpu": 1, "documents": 1, "store": 2, "graph": 2, "isne": 2,
          "embedding": 2, "orchestration": 2, "pipelines": 3, "retrieval": 3, "benchmarks": 4, "cluster": 4, "cli": 4, "ingest": 4}


# `hades_gpu/__init__.py` is the package's public face (`hades_gpu.search`): its functions import the
# top layers when called. A module that imports `hades_gpu` itself (for `__file__`, `__version__`)
# gets those names, not the face's call-time imports, so `import hades_gpu` adds no edge.
ROOT = "hades_gpu"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """hades_gpu modules that `path` imports, anywhere in the file (`from pkg import sub` -> pkg.sub)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import a.b.c` of a name inside a module: its module
                t = t.rpartition(".")[0]
            if t.startswith("hades_gpu") and t != name:
                out.add(t)
    return out


def graph() -> dict[str, set[str]]:
    """Edges between modules, with each package's `__init__` replaced by what it imports (a package
    re-exporting its submodules is not a circle with them)."""
    mods = modules()
    raw = {name: imports_of(path, name, set(mods)) for name, path in mods.items()}
    packages = {name for name, path in mods.items() if path.name == "__init__.py"}

    def expand(target: str, seen: frozenset = frozenset()) -> set[str]:
        if target == ROOT:  # the package's public face: see ROOT
            return set()
        if target not in packages or target in seen:
            return {target} if target not in packages else set()
        return set().union(*(expand(t, seen | {target}) for t in raw[target])) if raw[target] else set()

    return {name: set().union(*(expand(t) for t in targets)) - {name} if targets else set()
            for name, targets in raw.items() if name not in packages}


def layer(name: str) -> int:
    parts = name.split(".")
    return LAYERS[parts[1]] if len(parts) > 1 else 0


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as a path that returns to its start, or None (iterative DFS)."""
    colour: dict[str, int] = {}
    for root in sorted(edges):
        if colour.get(root):
            continue
        stack = [(root, iter(sorted(edges.get(root, ()))))]
        path = [root]
        colour[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                colour[node] = 2
                stack.pop()
                path.pop()
                continue
            if colour.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if not colour.get(nxt):
                colour[nxt] = 1
                path.append(nxt)
                stack.append((nxt, iter(sorted(edges.get(nxt, ())))))
    return None


def test_every_top_level_part_of_the_package_has_a_layer():
    tops = {name.split(".")[1] for name in modules() if "." in name}
    assert tops <= set(LAYERS), f"give {sorted(tops - set(LAYERS))} a layer in DESIGN.md and here"


def test_no_import_circle():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_import_from_a_lower_layer_to_a_higher_one():
    bad = sorted(f"{src} (layer {layer(src)}) imports {dst} (layer {layer(dst)})"
                 for src, dsts in graph().items() for dst in dsts if layer(dst) > layer(src))
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("edges,circle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ({"a": {"a"}}, ["a", "a"]),
])
def test_the_circle_finder_finds_circles(edges, circle):
    assert find_cycle(edges) == circle
