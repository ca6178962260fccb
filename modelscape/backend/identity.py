"""A job's identity: what decides its numbers, hashed; code fingerprints of the user's functions; the JSON-safe
copy of a config the store keeps; a sweep's provenance.

``job_identity(config, bfn_config, axes)`` is a sha256 of everything that determines a job's result (see there):
the key of its row in the store, so a rerun finds the jobs already done and a change that matters trains anew.
Pure functions of their arguments: no torch import (a tensor is recognised through ``sys.modules``), no store.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import os
import platform
import socket
import subprocess
import sys
import types
import warnings
from collections.abc import Mapping

import numpy as np

from modelscape._version import __version__
from modelscape.config import ALIASES, BY_NAME, coerce

__all__ = ["IDENTITY_VERSION", "NON_RESULT_KEYS", "COUNTED_WHEN_SET", "identity_cache", "array_digest",
           "code_fingerprint", "code_versions", "job_identity", "jsonable", "provenance"]

IDENTITY_VERSION = 3  # bump when the identity recipe changes, so old and new ids never collide (2: code; 3: a
# docstring counts as none, whether a function has one or not)

# Keys added to the schema after IDENTITY_VERSION 3: they count only when set away from their default, so a sweep
# stored before they existed keeps its ids and is not trained again.
COUNTED_WHEN_SET = frozenset({"DEPTH_ALPHA", "BASE_DEPTH"})

# Hyperparameters that cannot change a job's numbers: where it runs, how loudly, where results go, whether
# to resume. They are left out of ``job_identity`` so that, e.g., moving a sweep from 1 GPU to 8 or turning
# VERBOSE on still finds the jobs already stored.
NON_RESULT_KEYS = frozenset({"VERBOSE", "DEVICES", "EXECUTOR", "WORKERS_PER_DEVICE", "RESULTS_DIR", "EXPT_NAME",
                             "RESUME", "CLAIM_TIMEOUT", "THREADS", "JOB_TIMEOUT", "RETRY_FAILED", "RAY_ADDRESS",
                             "SLURM_PARTITION", "SLURM_TIME", "SLURM_GPUS_PER_NODE", "SLURM_CPUS_PER_TASK",
                             "SLURM_MEM", "SLURM_ACCOUNT", "SLURM_QOS", "SLURM_EXTRA", "SLURM_SHARDS",
                             "SLURM_ARRAY_PARALLELISM", "SLURM_LOG_DIR", "DETACH", "FUSE", "FUSE_MAX", "JOB_ID",
                             "TENSORBOARD", "CHECKPOINTS", "CHECKPOINT_OPTIMIZER",
                             "LIVE_EVERY", "CUDA_GRAPHS"})



def _qualname(obj) -> str:
    """``module.qualname`` (as ``modelscape.utils.qualname``, without importing torch)."""
    if isinstance(obj, functools.partial):
        return _qualname(obj.func)
    mod = getattr(obj, "__module__", None) or "?"
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{mod}.{name}"


def is_torch_tensor(obj):
    """Whether ``obj`` is a torch tensor; checked via sys.modules so the store never imports torch itself."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def tensor_to_numpy(t) -> np.ndarray:
    """A tensor's values as a numpy array on the host (float32 for dtypes numpy lacks, such as bfloat16)."""
    t = t.detach().cpu()
    try:
        return t.numpy()
    except TypeError:  # bfloat16 and friends have no numpy dtype: hash/store their float32 values
        return t.float().numpy()


_digest_cache: dict | None = None


@contextlib.contextmanager
def identity_cache():
    """Within this block, each array object is hashed once however many ``job_identity`` calls see it.

    For computing the ids of a whole sweep whose ``bfn_config`` holds a large dataset. Arrays are keyed by
    object identity, so nothing may modify them in place inside the block.
    """
    global _digest_cache
    outer = _digest_cache
    if outer is None:
        _digest_cache = {}
    try:
        yield
    finally:
        _digest_cache = outer


def array_digest(a) -> str:
    """sha256 of an array's dtype, shape and bytes; numpy and torch arrays with equal contents agree."""
    cache = _digest_cache
    if cache is not None and id(a) in cache:
        return cache[id(a)][1]
    arr = tensor_to_numpy(a) if is_torch_tensor(a) else np.asarray(a)
    h = hashlib.sha256()
    h.update(f"{arr.dtype.str}|{arr.shape}|".encode())
    if arr.dtype.hasobject:
        h.update(canonical_json(_canon(arr.tolist())).encode())
    else:
        h.update(np.ascontiguousarray(arr).data)
    digest = h.hexdigest()
    if cache is not None:
        cache[id(a)] = (a, digest)  # holding ``a`` keeps its id from being reused by another object
    return digest


def _key_str(k) -> str:
    # a non-string key is tagged so that {1: x} and {"1": x} stay distinct
    return k if isinstance(k, str) else "\x00" + canonical_json(_canon(k))


def _canon(obj, depth=0):
    """A deterministic JSON-able structure standing for ``obj`` in a job identity."""
    if depth > 50:
        raise ValueError("config nests deeper than 50 levels (a cycle?); cannot compute a job identity")
    d = depth + 1
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.generic) and not isinstance(obj, np.void):
        return _canon(obj.item(), d)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, np.ndarray) or is_torch_tensor(obj):
        return {"__array__": array_digest(obj)}
    if isinstance(obj, Mapping):
        return {_key_str(k): _canon(v, d) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canon(v, d) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((_canon(v, d) for v in obj), key=canonical_json)
    if isinstance(obj, (bytes, bytearray)):
        return {"__bytes__": hashlib.sha256(obj).hexdigest()}
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, functools.partial):
        return {"__partial__": _qualname(obj.func), "code": code_fingerprint(obj.func),
                "args": _canon(obj.args, d), "kwargs": _canon(obj.keywords, d)}
    if callable(obj):
        return {"__callable__": _qualname(obj), "code": code_fingerprint(obj)}
    if hasattr(obj, "__dict__"):
        return {"__object__": _qualname(type(obj)), "state": _canon(vars(obj), d)}
    r = repr(obj)
    # a default repr holds a memory address, which would change the id in every process
    return {"__object__": _qualname(type(obj))} if " at 0x" in r else {"__repr__": r}


def canonical_json(obj) -> str:
    """Deterministic JSON (sorted keys, no spaces): the text an identity hashes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=True)


# --- code fingerprints ------------------------------------------------------------------------------------

# Code from these top-level modules counts by its name: its version is recorded with each sweep (provenance),
# and hashing torch's own classes would tie every id to one torch build.
_LIBRARIES = frozenset(sys.stdlib_module_names) | {"torch", "numpy", "builtins", "scipy", "sklearn"}
_CLASS_SKIP = frozenset({"__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__annotations__",
                         "__firstlineno__", "__static_attributes__", "__parameters__", "__orig_bases__"})
_fingerprinting: set = set()  # ids of the objects being fingerprinted right now (a class naming itself)
_unreadable_warned: set = set()


def _is_library(obj) -> bool:
    mod = getattr(obj, "__module__", None) or ""
    return mod.split(".")[0] in _LIBRARIES


def code_fingerprint(obj) -> str | None:
    """sha256 of the code of a user function or class; None (after a warning, once) if it cannot be read.

    A function counts by its bytecode, constants (nested functions' code included), the names it uses, its
    default arguments, the values its closure captured, and the user functions, classes and plain constants
    (numbers, strings) it names as globals; its docstring, comments, formatting and line numbers do not count.
    A class counts by the code of its methods (properties, static and class methods included), its plain class
    attributes and its user-defined base classes; a callable object by its class. Code of the standard
    library, torch, numpy, scipy and scikit-learn counts by name. Stable across processes; bytecode differs
    between Python versions, so a new Python version means new ids.
    """
    cache = _digest_cache
    key = ("code", id(obj))
    if cache is not None and key in cache:
        return cache[key][1]
    if _is_library(obj) and not isinstance(obj, functools.partial):
        digest = hashlib.sha256(_qualname(obj).encode()).hexdigest()
    else:
        items = _code_items(obj)
        if items is None:
            name = _qualname(obj)
            if name not in _unreadable_warned:
                _unreadable_warned.add(name)
                warnings.warn(f"cannot read the code of {name} ({type(obj).__name__}); the job identity counts it "
                              "by its name only, so edits to it will not retrain stored jobs", stacklevel=3)
            return None
        digest = hashlib.sha256(canonical_json(items).encode()).hexdigest()
    if cache is not None and not _fingerprinting:  # inside a cycle (a recursive function) the digest is partial
        cache[key] = (obj, digest)
    return digest


def _code_items(obj):
    """A JSON-able structure standing for ``obj``'s code, or None if there is none to read."""
    if id(obj) in _fingerprinting:
        return {"cycle": _qualname(obj)}
    _fingerprinting.add(id(obj))
    try:
        if isinstance(obj, functools.partial):
            return {"partial": _code_items(obj.func), "args": _canon(obj.args), "kwargs": _canon(obj.keywords)}
        if _is_library(obj):
            return {"library": _qualname(obj)}
        if inspect.ismethod(obj):
            return {"method": _code_items(obj.__func__)}
        if isinstance(obj, types.FunctionType):
            return _function_items(obj)
        if isinstance(obj, type):
            return _class_items(obj)
        if isinstance(getattr(type(obj), "__call__", None), types.FunctionType):  # an object with a Python __call__
            return {"instance_of": _code_items(type(obj))}
        return None  # compiled code (a C or Cython function) has nothing to read
    finally:
        _fingerprinting.discard(id(obj))


# A function's code object keeps its docstring, or None when it has none, as its first constant (Python 3.10 to
# 3.13; 3.14 keeps it there only when the flag below says there is one). Comprehensions and class bodies have
# no such slot.
_CO_HAS_DOCSTRING = 0x4000000
_NO_DOC_SLOT = frozenset({"<listcomp>", "<setcomp>", "<dictcomp>", "<genexpr>", "<module>"})


def _consts_without_doc(co) -> list:
    """A code object's constants with its docstring slot read as None: a function with a docstring and the same
    function without one count the same (a docstring is not code)."""
    consts = list(co.co_consts)
    function = co.co_flags & inspect.CO_NEWLOCALS and co.co_name not in _NO_DOC_SLOT
    if not function or not consts:
        return consts
    if sys.version_info >= (3, 14):
        return [None] + consts[1:] if co.co_flags & _CO_HAS_DOCSTRING else [None] + consts
    if consts[0] is None or isinstance(consts[0], str):
        consts[0] = None
    return consts


def _code_object_items(co):
    consts = _consts_without_doc(co)
    return {"bytecode": co.co_code.hex(), "names": list(co.co_names), "args": [co.co_argcount, co.co_kwonlyargcount],
            "consts": [_code_object_items(c) if inspect.iscode(c) else _canon(c) for c in consts]}


def _function_items(fn):
    out = _code_object_items(fn.__code__)
    out["defaults"] = _canon([fn.__defaults__, fn.__kwdefaults__])
    cells = []
    for cell in fn.__closure__ or ():
        try:
            cells.append(_canon(cell.cell_contents))
        except ValueError:  # an empty cell
            cells.append(None)
    out["closure"] = cells
    refs = {}
    for name in fn.__code__.co_names:
        if name not in fn.__globals__:
            continue
        v = fn.__globals__[name]
        if isinstance(v, (types.FunctionType, type, functools.partial)):
            if not _is_library(v):
                refs[name] = code_fingerprint(v) or _qualname(v)
        elif v is None or isinstance(v, (bool, int, float, str)):
            refs[name] = _canon(v)
    out["globals"] = refs
    if getattr(fn, "__wrapped__", None) is not None:  # functools.wraps: the decorated function counts too
        out["wrapped"] = _code_items(fn.__wrapped__)
    return out


def _class_items(cls):
    members = {}
    for name, v in sorted(vars(cls).items()):
        if name in _CLASS_SKIP:
            continue
        if isinstance(v, (staticmethod, classmethod)):
            v = v.__func__
        if isinstance(v, property):
            members[name] = [_code_items(f) for f in (v.fget, v.fset, v.fdel) if f is not None]
        elif isinstance(v, (types.FunctionType, type)):
            members[name] = _code_items(v)
        elif v is None or isinstance(v, (bool, int, float, str, tuple, list, frozenset)):
            members[name] = _canon(v)
    bases = [_code_items(b) for b in cls.__bases__ if b is not object]
    return {"class": members, "bases": bases}


def code_versions(*objs) -> dict:
    """``{module.qualname: first 12 hex digits of its code_fingerprint}`` of every user callable in ``objs``
    (walking dicts, lists and tuples), e.g. the config and bfn_config of a job. Library code is left out;
    a function whose code cannot be read shows ``"name-only"``."""
    out = {}

    def walk(obj, depth=0):
        if depth > 20:
            return
        if isinstance(obj, Mapping):
            for v in obj.values():
                walk(v, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v, depth + 1)
        elif isinstance(obj, functools.partial):
            walk(obj.func, depth + 1)
        elif callable(obj) and not _is_library(obj) and not is_torch_tensor(obj):
            fp = code_fingerprint(obj)
            out[_qualname(obj)] = fp[:12] if fp else "name-only"

    for o in objs:
        walk(o)
    return dict(sorted(out.items()))


def _identity_axis_value(name, value):
    """An axis value as the job sees it: a schema hyperparameter is coerced (LR=1 -> 1.0), like the config."""
    name = ALIASES.get(name, name)
    if name in BY_NAME:
        try:
            return coerce(name, value)
        except Exception:  # the job itself will report a bad value; the id just has to be stable
            return value
    return value


def job_identity(config: dict, bfn_config: dict, axes: dict) -> str:
    """The id of a job: a sha256 hex digest of everything that determines its result.

    In it: every entry of the (canonicalized) ``config`` except ``NON_RESULT_KEYS`` (so all hyperparameters
    that change numbers, and user keys), every entry of ``bfn_config``, and the axis values ``axes`` (schema
    hyperparameters coerced to their type, so LR=1 and LR=1.0 agree). Within these, arrays and tensors count by
    dtype, shape and bytes (a numpy array and a tensor with equal contents agree); callables (the base batch
    function, a model class, grabs in ``otherreturns``, ``post_init_fn``, a LOSS or OPTIMIZER given as code)
    count by ``module.qualname`` and ``code_fingerprint``, so editing a function's body trains anew; dicts
    count independently of key order; other objects by their type and attributes. Stable across processes
    and machines (no ``hash()``, no addresses).
    """
    payload = {
        "version": IDENTITY_VERSION,
        "config": {k: v for k, v in config.items() if k not in NON_RESULT_KEYS
                   and not (k in COUNTED_WHEN_SET and v == BY_NAME[k].default)},
        "bfn_config": dict(bfn_config or {}),
        "axes": {k: _identity_axis_value(k, v) for k, v in (axes or {}).items()},
    }
    return hashlib.sha256(canonical_json(_canon(payload)).encode()).hexdigest()


def jsonable(obj):
    """A JSON-safe copy of a config, for storing and showing (not for identity).

    Callables become ``module.qualname`` strings; arrays and tensors ``{"array": shape, "dtype": ..., "sha":
    ...}`` summaries; numpy scalars Python numbers; tuples and sets lists; dict keys strings; other objects
    ``str(obj)``. Floats stay floats (NaN included: Python's json reads it back). ``jsonable(jsonable(x)) ==
    jsonable(x)``.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.generic) and not isinstance(obj, np.void):
        return jsonable(obj.item())
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, np.ndarray) or is_torch_tensor(obj):
        arr = tensor_to_numpy(obj) if is_torch_tensor(obj) else obj
        return {"array": list(arr.shape), "dtype": str(arr.dtype), "sha": array_digest(obj)[:16]}
    if isinstance(obj, Mapping):
        return {k if isinstance(k, str) else str(jsonable(k)): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((jsonable(v) for v in obj), key=canonical_json)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if callable(obj):
        return _qualname(obj)
    return str(obj)


def provenance(cwd=None) -> dict:
    """Where and with what a sweep runs: host, Python, modelscape, torch and numpy versions, and the git commit
    of ``cwd`` (default: the working directory) with ``git_dirty`` (uncommitted changes); git fields are None
    outside a repository or without git."""
    def git(*args):
        try:
            out = subprocess.run(["git", *args], cwd=cwd or os.getcwd(), capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    torch = sys.modules.get("torch")
    return {"host": socket.gethostname(), "python": platform.python_version(), "modelscape": __version__,
            "torch": getattr(torch, "__version__", None), "numpy": np.__version__,
            "git_commit": commit, "git_dirty": bool(status) if status is not None else None}

