"""The suite runs on any device: a static check, run on the CPU CI, of the code that builds a job's data or reads
its tensors (batch functions, grabs, step hooks) in the tests, the examples, ``modelscape/data``, the benchmarks
and the README's Python blocks.

On a CUDA machine a job's batch function gets a generator on the job's GPU (``gen.device``), its grabs and hooks
get the model and data there; code written for CPU tensors fails there only, so the CPU CI could never see it.
The rules, each found by ``ast`` and named by file:line:

- ``generator``: a tensor factory (``torch.randn``, ``torch.randint``, ...) given ``generator=`` also names its
  ``device=`` (a CPU generator would make a CPU tensor; a CUDA one needs the device named) -- unless the
  generator is a CPU one made right there (``torch.Generator()`` without a device, inline or bound to a name in
  the same function): CPU generator, CPU tensor.
- ``job-device``: inside a batch function (a function with a parameter ``gen``, and what it defines) or a grab or
  step hook (a function named in ``otherreturns``/``step_hooks``/``post_init_fn``, or named ``*grab*``), every
  tensor factory names its ``device=`` or is moved at once (``torch.randn(...).to(p.device)``): a CPU constant
  met with a CUDA batch or model fails there.
- ``numpy``: ``.numpy()`` is called on a chain through ``.cpu()`` (``t.detach().cpu().numpy()``): a CUDA tensor
  has no numpy view.

Code in a string that is run (a notebook cell given to ``exec``, a script written to a file) is checked too,
where it is plain Python (not an f-string).
"""
import ast
import json
import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FACTORIES = frozenset({"randn", "rand", "randint", "zeros", "ones", "empty", "arange", "full", "normal", "randperm",
                       "linspace", "logspace", "eye", "tensor", "as_tensor"})
GRAB_KEYS = frozenset({"otherreturns", "step_hooks", "post_init_fn"})


def _factory(node) -> str | None:
    """``randn`` for a call ``torch.randn(...)``, else None."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES:
        owner = node.func.value
        if isinstance(owner, ast.Name) and owner.id == "torch":
            return node.func.attr
    return None


def _keywords(call: ast.Call) -> dict:
    return {k.arg: k.value for k in call.keywords if k.arg is not None}


def _cpu_generator(node) -> bool:
    """``torch.Generator()`` without a device, possibly seeded (``.manual_seed(0)``): a CPU generator."""
    while isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "manual_seed":
        node = node.func.value
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "Generator"
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
            and "device" not in _keywords(node) and not node.args)


def _through_cpu(node) -> bool:
    """The receiver chain of a method call passes through ``.cpu()`` (``x.detach().cpu()``, ``x.cpu()[0]``)."""
    while True:
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Attribute) and node.func.attr == "cpu":
                return True
            node = node.func
        elif isinstance(node, (ast.Attribute, ast.Subscript)):
            node = node.value
        else:
            return False


def _grab_names(tree) -> set:
    """Names of the functions handed to a job as grabs or hooks in this code (values of an ``otherreturns`` or
    ``step_hooks`` dict, a ``post_init_fn``), as keyword, dict entry or item assignment."""
    given = []
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg in GRAB_KEYS:
            given.append(node.value)
        elif isinstance(node, ast.Dict):
            given += [v for k, v in zip(node.keys, node.values)
                      if isinstance(k, ast.Constant) and k.value in GRAB_KEYS]
        elif isinstance(node, ast.Assign):
            for t in node.targets:
                if (isinstance(t, ast.Subscript) and isinstance(t.slice, ast.Constant)
                        and t.slice.value in GRAB_KEYS):
                    given.append(node.value)
    names = set()
    for value in given:
        for v in (value.values if isinstance(value, ast.Dict) else [value]):
            if isinstance(v, ast.Name):
                names.add(v.id)
    return names


class _Checker(ast.NodeVisitor):
    def __init__(self, grabs: set):
        self.grabs = grabs
        self.scopes = []  # enclosing functions (and the module), innermost last
        self.job_code = 0  # depth inside batch functions, grabs and hooks
        self.moved = set()  # factory calls moved at once: torch.randn(...).to(device)
        self.found = []  # (line, rule, message)

    def _bound_to_cpu_generator(self, name: str) -> bool:
        for scope in reversed(self.scopes):
            params = scope.args if isinstance(scope, (ast.FunctionDef, ast.Lambda)) else None
            if params is not None and name in {a.arg for a in params.args + params.kwonlyargs}:
                return False
            values = [n.value for n in ast.walk(scope) if isinstance(n, ast.Assign)
                      and any(isinstance(t, ast.Name) and t.id == name for t in n.targets)]
            if values:
                return all(_cpu_generator(v) for v in values)
        return False

    def _function(self, node, is_job_code: bool):
        self.scopes.append(node)
        self.job_code += is_job_code
        self.generic_visit(node)
        self.job_code -= is_job_code
        self.scopes.pop()

    def visit_Module(self, node):
        self.scopes.append(node)
        self.generic_visit(node)

    def visit_FunctionDef(self, node):
        params = {a.arg for a in node.args.args + node.args.kwonlyargs}
        self._function(node, "gen" in params or node.name in self.grabs or "grab" in node.name.lower())

    def visit_Lambda(self, node):
        self._function(node, "gen" in {a.arg for a in node.args.args + node.args.kwonlyargs})

    def visit_Dict(self, node):
        # a lambda written straight into an otherreturns / step_hooks dict is a grab or hook
        for k, v in zip(node.keys, node.values):
            if k is not None:
                self.visit(k)
            inline = isinstance(k, ast.Constant) and k.value in GRAB_KEYS and isinstance(v, ast.Dict)
            for item in (v.values if inline else []):
                if isinstance(item, ast.Lambda):
                    self._function(item, True)
            if inline:
                for key in v.keys:
                    if key is not None:
                        self.visit(key)
            else:
                self.visit(v)

    def visit_keyword(self, node):
        if node.arg in GRAB_KEYS and isinstance(node.value, (ast.Dict, ast.Lambda)):
            for item in (node.value.values if isinstance(node.value, ast.Dict) else [node.value]):
                if isinstance(item, ast.Lambda):
                    self._function(item, True)
                else:
                    self.visit(item)
        else:
            self.generic_visit(node)

    def visit_Call(self, node):
        if isinstance(node.func, ast.Attribute) and node.func.attr == "to" and _factory(node.func.value):
            self.moved.add(id(node.func.value))
        name = _factory(node)
        if name is not None:
            kw = _keywords(node)
            gen = kw.get("generator")
            if gen is not None and "device" not in kw and not (
                    _cpu_generator(gen) or isinstance(gen, ast.Name) and self._bound_to_cpu_generator(gen.id)):
                self.found.append((node.lineno, "generator",
                                   f"torch.{name}(..., generator=...) without device=: the tensor is made on "
                                   "the CPU whatever the generator's device (name it: device=gen.device)"))
            elif self.job_code and "device" not in kw and id(node) not in self.moved:
                self.found.append((node.lineno, "job-device",
                                   f"torch.{name}(...) without device= in a batch function, grab or hook: a CPU "
                                   "tensor beside the job's (CUDA) data or model"))
        if (isinstance(node.func, ast.Attribute) and node.func.attr == "numpy" and not node.args
                and not _through_cpu(node.func.value)):
            self.found.append((node.lineno, "numpy", ".numpy() on a chain without .cpu(): a CUDA tensor has no "
                                                     "numpy view (use .detach().cpu().numpy())"))
        self.generic_visit(node)


def _code_strings(tree):
    """(line, source, parsed) of the string constants in ``tree`` that are Python code using torch (cells to
    exec, scripts to write)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "torch" in node.value \
                and re.search(r"^\s*(def |import |from )", node.value, flags=re.M):
            source = textwrap.dedent(node.value)
            try:
                yield node.lineno, source, ast.parse(source)
            except SyntaxError:
                continue


def violations(source: str, where: str, first_line: int = 1, strings: bool = True) -> list[str]:
    """``where:line: [rule] message`` for each breach of the module docstring's rules in ``source``, whose first
    line is line ``first_line`` of ``where``; with ``strings``, in the code strings it holds too."""
    tree = ast.parse(source)
    out = []
    checker = _Checker(_grab_names(tree))
    checker.visit(tree)
    for line, rule, message in checker.found:
        out.append(f"{where}:{first_line + line - 1}: [{rule}] {message}")
    for line, _, inner_tree in (_code_strings(tree) if strings else ()):
        # a triple-quoted cell starts on the line after its opening quotes when its text begins with a newline
        inner_checker = _Checker(_grab_names(inner_tree))
        inner_checker.visit(inner_tree)
        for l2, rule, message in inner_checker.found:
            out.append(f"{where}:{first_line + line - 1 + l2 - 1}: [{rule}] {message} (in a code string)")
    return out


def _readme_python_blocks():
    text = (ROOT / "README.md").read_text()
    for m in re.finditer(r"^```python\n(.*?)^```\s*$", text, flags=re.S | re.M):
        yield text[:m.start(1)].count("\n") + 1, m.group(1)


def _notebook_cells(path: Path):
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            # IPython magics (%matplotlib) are not Python
            yield "".join(line if not line.lstrip().startswith(("%", "!")) else "\n"
                          for line in cell["source"])


def checked_sources():
    """(label, source, first line, whether its code strings count) of every piece of code the rules cover; this
    module's own strings are the checker's bad examples."""
    for pattern in ("tests/*.py", "examples/*.py", "modelscape/data/*.py", "benchmarks/*.py"):
        for path in sorted(ROOT.glob(pattern)):
            yield str(path.relative_to(ROOT)), path.read_text(), 1, path.resolve() != Path(__file__).resolve()
    for line, source in _readme_python_blocks():
        yield "README.md", source, line, True
    for path in sorted(ROOT.glob("examples/*.ipynb")):
        for i, source in enumerate(_notebook_cells(path)):
            yield f"{path.relative_to(ROOT)}[cell {i}]", source, 1, True


def test_batch_functions_grabs_and_reads_work_on_any_device():
    found = [v for label, source, first, strings in checked_sources()
             for v in violations(source, label, first, strings)]
    assert not found, "code that assumes CPU tensors (see this module's docstring):\n" + "\n".join(found)


BAD = '''
import torch

def bfn(bsz, gen, X=None, y=None):
    w = torch.ones(4)
    return lambda step: (torch.randn(bsz, 4, generator=gen), None)

def norm_grab(model, X_te, **kw):
    return model(X_te).detach().numpy()

def hook(model, opt, step):
    noise = torch.randn(3)
    kept = torch.randn(3, generator=torch.Generator()).to(model.device)

CELL = """
import torch
def cell_bfn(bsz, gen, X, y):
    return lambda step: torch.rand(bsz, 2, generator=gen)
"""
config = {"otherreturns": {"n": lambda model, **kw: torch.zeros(1)}, "step_hooks": {0: hook}}
'''

GOOD = '''
import torch

def bfn(bsz, gen, X=None, y=None):
    w = torch.ones(4, device=gen.device)
    return lambda step: (torch.randn(bsz, 4, generator=gen, device=gen.device), None)

def norm_grab(model, X_te, **kw):
    return model(X_te).detach().cpu().numpy()

def test_here():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, generator=g)
    y = torch.randn(3, generator=torch.Generator().manual_seed(1))
    return x.numpy, y.cpu()[0].numpy()
'''


def test_the_checker_names_each_breach_by_line_and_passes_device_aware_code():
    found = violations(textwrap.dedent(BAD), "bad.py")
    got = sorted((int(v.split(":")[1]), re.search(r"\[(\S+)\]", v).group(1)) for v in found)
    assert got == [(5, "job-device"), (6, "generator"), (9, "numpy"), (12, "job-device"), (18, "generator"),
                   (20, "job-device")], "\n".join(found)
    assert violations(textwrap.dedent(GOOD), "good.py") == []


@pytest.mark.parametrize("call, flagged", [
    ("torch.randn(3, generator=gen)", True),
    ("torch.randint(0, 5, (3,), generator=gen, device=gen.device)", False),
    ("torch.rand(3, generator=torch.Generator(device='cuda'))", True),
    ("torch.rand(3, generator=torch.Generator().manual_seed(0))", False),
    ("x.numpy()", True),
    ("x.detach().cpu().numpy()", False),
    ("np.asarray(x)", False),
])
def test_the_checker_outside_job_code(call, flagged):
    assert bool(violations(f"def f(x, gen):\n    pass\n\ny = {call}\n", "t.py")) == flagged
