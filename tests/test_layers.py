"""The house as a one-way pipeline: each module imports only from its own layer or the layers below it, nothing
imports in a circle, and a function-level ("lazy") import is only for an optional package or a process's start-up,
with its reason on the line.

The layer map below is the data the README's "How the code is laid out" section shows; a new file must take a
place in it (the test fails for a module the map does not name) and in the README.
"""
import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Lowest first. A module may import from its own layer (without a circle) and from any layer below.
LAYERS = [
    ("L0 names", ["modelscape/_version.py", "modelscape/config.py", "modelscape/utils.py",
                  "modelscape/backend/records.py", "modelscape/backend/__init__.py"]),
    ("L1 physics, data and formats", [
        "modelscape/mup/__init__.py", "modelscape/mup/rules.py", "modelscape/mup/shapes.py", "modelscape/mup/layers.py",
        "modelscape/mup/assign.py", "modelscape/mup/depth.py", "modelscape/mup/apply.py", "modelscape/mup/optim.py", "modelscape/mup/coord.py", "modelscape/models.py", "modelscape/model.py", "modelscape/data/__init__.py",
        "modelscape/data/synthetic.py", "modelscape/data/digits.py", "modelscape/data/language.py",
        "modelscape/data/data.py", "modelscape/data/monomial.py", "modelscape/data/ntk_coeffs.py",
        "modelscape/data/mlp_grabs.py", "modelscape/backend/utils.py", "modelscape/results.py", "modelscape/transfer.py",
        "modelscape/diagnostics.py",
        "modelscape/backend/identity.py", "modelscape/backend/checkpoints.py"]),
    ("L2 storage", ["modelscape/backend/stored.py", "modelscape/backend/rows.py", "modelscape/backend/beside.py", "modelscape/backend/claims.py",
                    "modelscape/backend/units.py", "modelscape/backend/db.py",
                    "modelscape/backend/store.py"]),
    ("L3 names to objects, the step loop", ["modelscape/backend/build.py", "modelscape/backend/inputs.py",
                                            "modelscape/backend/graphs.py",
                                            "modelscape/backend/trainloop.py"]),
    ("L4 around a job: its observers, what fuses", [
        "modelscape/backend/interventions.py", "modelscape/backend/checkpointer.py",
        "modelscape/backend/tensorboard.py", "modelscape/backend/live.py", "modelscape/backend/plan.py"]),
    ("L5 a job, a fused group", ["modelscape/backend/job.py", "modelscape/backend/stacked.py",
                                 "modelscape/backend/fused.py"]),
    ("L6 a unit of work", ["modelscape/backend/runner.py"]),
    ("L7 executors", ["modelscape/backend/spawned.py", "modelscape/backend/executors/base.py", "modelscape/backend/executors/inprocess.py",
                      "modelscape/backend/executors/pool.py", "modelscape/backend/executors/ray_executor.py",
                      "modelscape/backend/executors/__init__.py"]),
    ("L8 the driver", ["modelscape/backend/board.py", "modelscape/backend/sweep.py"]),
    ("L9 the cluster", ["modelscape/backend/slurm.py"]),
    ("L10 faces", ["modelscape/backend/job_iterator.py", "modelscape/backend/cli.py", "modelscape/backend/worker.py",
                   "modelscape/cli.py", "modelscape/plotting.py", "modelscape/__init__.py", "backend/__init__.py"]),
]

# Function-level imports allowed, by (importing module, what it imports: a modelscape module, or the top-level
# package of anything else), with why. Each such line also says why in a comment of its own.
LAZY = {
    ("modelscape", "modelscape.backend.store"): "worker start-up: every worker imports the package, never the store",
    ("modelscape.backend.spawned", "modelscape.backend.runner"):
        "worker start-up: the engine imports torch, after the worker's watchdog runs",
    ("modelscape.backend.spawned", "torch"): "worker start-up, as above",
    ("modelscape.backend.spawned", "ctypes"): "worker start-up: Linux's death signal, in a worker only",
    ("modelscape.backend.executors.ray_executor", "ray"): "optional package (the ray extra), in a Ray task only",
    ("modelscape.backend.tensorboard", "tensorboard"): "optional package (the tensorboard extra)",
    ("modelscape.backend.tensorboard", "google"): "protobuf, which comes with the tensorboard extra",
    ("modelscape.backend.tensorboard", "torch"): "torch's tensorboard summaries need the tensorboard extra",
    ("modelscape.backend.utils", "yaml"): "optional package: PyYAML, for a .yaml config file only",
    ("modelscape.data.data", "scipy"): "optional package: scipy, for one function",
    ("modelscape.mup.coord", "xarray"): "worker start-up: workers import modelscape.mup, never xarray",
    ("modelscape.mup.coord", "matplotlib"): "optional until a figure is drawn",
    ("modelscape.plotting", "matplotlib"): "optional until a figure is drawn",
    ("modelscape.results", "xarray"): "worker start-up: workers import the results module, never xarray",
    ("modelscape.backend.stored", "modelscape.backend.checkpoints"): "start-up: reading a store (`modelscape ls`) needs no torch",
    ("modelscape.cli", "modelscape.backend.checkpoints"): "start-up: `modelscape show` needs no torch",
}
MAX_LINES = 650  # a file longer than this holds two things; split it


def module_name(path: str) -> str:
    parts = path[:-3].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


LAYER_OF = {module_name(p): i for i, (_, paths) in enumerate(LAYERS) for p in paths}
PATH_OF = {module_name(p): p for _, paths in LAYERS for p in paths}


def python_files():
    return sorted(str(p.relative_to(ROOT)) for d in ("modelscape", "backend") for p in (ROOT / d).rglob("*.py"))


def imports(path: str):
    """``(imported module, line number, lazy, source line)`` of every import in ``path``, relative ones resolved."""
    text = (ROOT / path).read_text()
    lines = text.splitlines()
    tree = ast.parse(text)
    me = module_name(path)
    package = me if path.endswith("__init__.py") else me.rpartition(".")[0]
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        lazy, up = False, parents.get(node)
        while up is not None:
            lazy |= isinstance(up, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            up = parents.get(up)
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in PATH_OF else base for a in node.names]
        out += [(n, node.lineno, lazy, lines[node.lineno - 1]) for n in names]
    return out


def own_module(name: str) -> str | None:
    """The module of the map ``name`` (or the package it is an attribute of) is, or None outside modelscape."""
    while name and name not in PATH_OF:
        name = name.rpartition(".")[0]
    return name or None


def edges():
    """``(importer, imported, lazy, line)`` between modules of the map; importing ``a.b.c`` also runs the packages
    ``a`` and ``a.b`` (each ``__init__``), which counts unless the importer is inside that package."""
    out = []
    for path in python_files():
        me = module_name(path)
        for name, lineno, lazy, line in imports(path):
            target = own_module(name)
            if target is None or target == me:
                continue
            chain = [target] + [".".join(target.split(".")[:k]) for k in range(1, target.count(".") + 1)]
            for t in chain:
                if t in PATH_OF and t != me and not me.startswith(t + "."):
                    out.append((me, t, lazy, f"{path}:{lineno}"))
    return out


def test_every_module_has_a_place_in_the_layer_map():
    files = set(python_files())
    mapped = [p for _, paths in LAYERS for p in paths]
    assert len(mapped) == len(set(mapped)), "a module is in two layers"
    assert sorted(files - set(mapped)) == [], "new modules: give each a layer in LAYERS (and in the README)"
    assert sorted(set(mapped) - files) == [], "the map names modules that do not exist"


def test_no_module_imports_from_a_layer_above_it():
    up = [f"{where}: {a} ({LAYERS[LAYER_OF[a]][0]}) imports {b} ({LAYERS[LAYER_OF[b]][0]})"
          for a, b, _, where in edges() if LAYER_OF[b] > LAYER_OF[a]]
    assert up == []


def test_the_import_graph_has_no_circle():
    graph = {}
    for a, b, _, _ in edges():
        graph.setdefault(a, set()).add(b)
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_lazy_imports_are_listed_and_say_why_on_their_line():
    found, unlisted, silent = set(), [], []
    for path in python_files():
        me = module_name(path)
        for name, lineno, lazy, line in imports(path):
            if not lazy:
                continue
            key = (me, own_module(name) or name.split(".")[0])
            found.add(key)
            if key not in LAZY:
                unlisted.append(f"{path}:{lineno}: {line.strip()}")
            if "#" not in line:
                silent.append(f"{path}:{lineno}: {line.strip()}")
    assert unlisted == [], "a lazy import is for an optional package or a process's start-up: list it in LAZY"
    assert silent == [], "say why the import is lazy in a comment on its line"
    assert sorted(set(LAZY) - found) == [], "LAZY lists imports that are gone: drop them"


def test_no_file_is_longer_than_the_limit():
    long = {p: n for p in python_files() if (n := len((ROOT / p).read_text().splitlines())) > MAX_LINES}
    assert long == {}


def readme_layout() -> dict:
    text = (ROOT / "README.md").read_text()
    section = text.split("## How the code is laid out", 1)[1].split("\n## ", 1)[0]
    layout, current = {}, None
    for line in section.splitlines():
        head = re.match(r"\*\*(L\d+ [^*]+)\*\*", line.strip())
        if head:
            current = layout.setdefault(head.group(1), [])
        elif current is not None:
            current += re.findall(r"`((?:modelscape|backend)/[\w/]+\.py)`", line)
    return layout


def test_the_readme_shows_the_layer_map():
    assert {k: sorted(v) for k, v in readme_layout().items()} == {name: sorted(paths) for name, paths in LAYERS}


@pytest.mark.parametrize("bad", ["upward", "circle"])
def test_the_checks_catch_what_they_forbid(bad, monkeypatch):
    """The checks above fail on a graph that breaks them (so a passing run means something)."""
    fake = [("modelscape.config", "modelscape.backend.job", False, "x:1")] if bad == "upward" else \
        [("modelscape.backend.build", "modelscape.backend.trainloop", False, "x:1")]
    monkeypatch.setattr(sys.modules[__name__], "edges", lambda real=edges: real() + fake)
    check = test_no_module_imports_from_a_layer_above_it if bad == "upward" else test_the_import_graph_has_no_circle
    with pytest.raises(AssertionError):
        check()
