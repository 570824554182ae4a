"""The package's import graph, read from the source: no cycles, and no import against the layers' arrows.

Every `import minivit...`, `from minivit... import ...` and relative import in minivit/**/*.py is an edge, wherever
it stands (module top, function body, try block, if block). A package's __init__ is a node of its own
(minivit/data/__init__.py is `minivit.data`); `import minivit.x.y` and `from minivit.x.y import f` depend on
`minivit.x.y` only, not on `minivit` or `minivit.x`; `from minivit.x import y` depends on `minivit.x.y` when that
is a module, else on `minivit.x` (y is a name defined there). Imports by a computed name (importlib.import_module
of a variable) are not seen.

The layers, lowest first. A module may import from its own layer or any layer below, never above. A table entry
names a module or a package (the package and everything under it); modules the table does not name are only
checked for cycles.
"""
import ast
from collections import deque
from pathlib import Path

import pytest

LAYERS = [
    ("leaf math: the reference pairs", ["minivit.layers", "minivit.attention"]),
    ("their fast twins, and the two namespaces", ["minivit.fast", "minivit.reference"]),
    ("model", ["minivit.model"]),
    ("tasks, training, recipes", ["minivit.tasks", "minivit.train", "minivit.recipes"]),
    ("command line", ["minivit.cli"]),
    ("entry point", ["minivit.__main__"]),
]

PACKAGE = Path(__file__).resolve().parent.parent / "minivit"

# ----------------------------------------------------------------------------------------------------------------
# The graph

def module_names(root, package):
    """{dotted module name: path} for every .py file under root (the folder of `package`)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def import_graph(root, package):
    """{module: {modules of the package it imports}} from the source under root; raises ValueError naming the
    file and line of an import of a module of the package that does not exist."""
    modules = module_names(root, package)
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:                                     # relative: from the importing module's package
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for t in targets:
                if t == package or t.startswith(package + "."):
                    if t not in modules:
                        raise ValueError(f"{path}:{node.lineno} imports {t}, which is not a module of {package}")
                    if t != name:                              # importing itself is no edge
                        edges.add(t)
        graph[name] = edges
    return graph


def knots(graph):
    """The strongly connected components of more than one module (sets, sorted by their first module): every
    module of a knot imports, directly or not, every other one of it."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):                                                  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(components, key=sorted)


def cycles(graph):
    """One cycle per knot: a shortest one through its first module (sorted), ending where it starts:
    ['a', 'b', 'a']. The knot may hold more modules than its cycle (describe names them)."""
    found = []
    for component in knots(graph):
        start = min(component)
        came_from, queue = {}, deque([start])                      # breadth first, inside the component
        while start not in came_from:
            v = queue.popleft()
            for w in sorted(graph[v] & component):
                if w not in came_from:
                    came_from[w] = v
                    queue.append(w)
        path, v = [start], came_from[start]
        while v != start:
            path.append(v)
            v = came_from[v]
        found.append([start] + path[1:][::-1] + [start])
    return found


def layer_of(module, layers):
    """The index in `layers` of the entry naming `module` (or a package above it), or None."""
    for i, (_, names) in enumerate(layers):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    return None


def layer_violations(graph, layers):
    """['a (layer name) imports b (higher layer name)', ...] for every import of a module in a higher layer."""
    out = []
    for a in sorted(graph):
        la = layer_of(a, layers)
        for b in sorted(graph[a]):
            lb = layer_of(b, layers)
            if la is not None and lb is not None and lb > la:
                out.append(f"{a} ({layers[la][0]}) imports {b} ({layers[lb][0]})")
    return out


def describe(graph):
    """The import cycles in words: each knot's shortest cycle, and the knot's other modules if it has more."""
    parts = []
    for knot, cycle in zip(knots(graph), cycles(graph)):
        rest = sorted(knot - set(cycle))
        parts.append(" -> ".join(cycle) + (f" (the same knot: {', '.join(rest)})" if rest else ""))
    return "import cycles: " + "; ".join(parts)


# ----------------------------------------------------------------------------------------------------------------
# The package

def test_no_import_cycles_in_the_package():
    graph = import_graph(PACKAGE, "minivit")
    assert len(graph) > 40 and "minivit.fast" in graph["minivit.model"]      # it read the package
    assert not knots(graph), describe(graph)


def test_no_import_against_the_layers():
    graph = import_graph(PACKAGE, "minivit")
    named = [n for _, names in LAYERS for n in names]
    assert len(named) == len(set(named))                           # one layer per entry
    bad = layer_violations(graph, LAYERS)
    assert not bad, "\n".join(bad)
    importers = sorted(m for m, targets in graph.items() if "minivit.cli" in targets)
    assert importers == ["minivit.__main__"], f"only the entry point imports the command line: {importers}"


def test_the_graph_sees_the_package():
    """Not vacuous on the real source: the graph has every module and the edges we know are there."""
    graph = import_graph(PACKAGE, "minivit")
    assert set(graph) == set(module_names(PACKAGE, "minivit")) and len(graph) > 20
    assert {"minivit.layers", "minivit.backend"} <= graph["minivit.attention"]
    assert "minivit.cli" in graph["minivit.__main__"] and "minivit.model" in graph["minivit"]
    assert "minivit.data.shapes" in graph["minivit.data"]          # a relative import


# ----------------------------------------------------------------------------------------------------------------
# The machinery, on a made-up package

def write_package(root, files):
    """files: {relative path: source} -> the folder root/pkg holding them."""
    for rel, text in files.items():
        path = root / "pkg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


ACYCLIC = {
    "__init__.py": "from pkg.low import f\n",
    "low.py": "import os\n\ndef f():\n    return os.sep\n",
    "mid.py": "from .low import f\nfrom . import low\n",
    "top.py": "import pkg.mid\n\ndef g():\n    from pkg.sub import deep\n    return deep\n",
    "sub/__init__.py": "from . import deep\n",
    "sub/deep.py": "from ..mid import low\nfrom pkg import low as again\n",
}


def test_an_acyclic_package_passes_and_every_kind_of_import_is_an_edge(tmp_path):
    graph = import_graph(write_package(tmp_path, ACYCLIC), "pkg")
    assert graph == {"pkg": {"pkg.low"}, "pkg.low": set(), "pkg.mid": {"pkg.low"},
                     "pkg.top": {"pkg.mid", "pkg.sub.deep"}, "pkg.sub": {"pkg.sub.deep"},
                     "pkg.sub.deep": {"pkg.mid", "pkg.low"}}
    assert knots(graph) == [] and cycles(graph) == []
    layers = [("low", ["pkg.low"]), ("mid", ["pkg.mid", "pkg.sub"]), ("top", ["pkg.top"])]
    assert layer_violations(graph, layers) == []


def test_a_made_up_cycle_is_found_and_named(tmp_path):
    files = dict(ACYCLIC)
    files["low.py"] = "def f():\n    from .sub.deep import again   # deferred: still an edge\n    return again\n"
    files["top.py"] = "import pkg.top2\n"
    files["top2.py"] = "from pkg import top\n"
    graph = import_graph(write_package(tmp_path, files), "pkg")
    assert knots(graph) == [{"pkg.low", "pkg.mid", "pkg.sub.deep"}, {"pkg.top", "pkg.top2"}]
    assert cycles(graph) == [["pkg.low", "pkg.sub.deep", "pkg.low"], ["pkg.top", "pkg.top2", "pkg.top"]]
    assert describe(graph) == ("import cycles: pkg.low -> pkg.sub.deep -> pkg.low (the same knot: pkg.mid); "
                               "pkg.top -> pkg.top2 -> pkg.top")


def test_a_longer_cycle_is_named_in_order(tmp_path):
    files = {"__init__.py": "", "a.py": "from . import b\n", "b.py": "import pkg.c\n",
             "c.py": "if True:\n    try:\n        from pkg.a import x\n    except ImportError:\n        pass\n"}
    assert cycles(import_graph(write_package(tmp_path, files), "pkg")) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


def test_an_import_against_the_layers_is_found(tmp_path):
    graph = import_graph(write_package(tmp_path, ACYCLIC), "pkg")
    layers = [("low", ["pkg.low", "pkg.mid"]), ("high", ["pkg.sub"])]   # pkg.sub.deep is in the package pkg.sub
    assert layer_violations(graph, layers) == []
    layers = [("low", ["pkg.mid"]), ("high", ["pkg.low"])]
    assert layer_violations(graph, layers) == ["pkg.mid (low) imports pkg.low (high)"]


def test_an_import_of_a_missing_module_is_named(tmp_path):
    root = write_package(tmp_path, {"__init__.py": "", "a.py": "\n\nimport pkg.nosuch\n"})
    with pytest.raises(ValueError, match=r"a\.py:3 imports pkg\.nosuch, which is not a module of pkg"):
        import_graph(root, "pkg")
