"""The persistent results store: one SQLite file per experiment, one row per finished job.

A sweep's driver opens ``Store(RESULTS_DIR/EXPT_NAME)`` and calls ``write(record)`` the moment each job's
record arrives; every write is its own transaction, so a sweep killed at any point leaves every job finished
before it on disk. Readers in other processes (``load``, the ``modelscape`` command) see a consistent snapshot
while the driver keeps writing (SQLite's WAL mode).

Layout (schema version ``SCHEMA_VERSION``, kept in ``PRAGMA user_version``; ``PRAGMA application_id`` marks
the file as ours):

- ``jobs``: one row per job identity (``job_identity``): status, axes (labels, JSON), the resolved config
  (``jsonable``, JSON), error, steps, wall_time, device, seed, trial, train_loss, test_loss, created time,
  ``layout`` (JSON: which record keys exist and where each lives) and ``arrays``, one ``np.savez`` blob holding
  every array of the record (timekeys, curves, grabs). Arrays are read back with ``allow_pickle=False``.
- ``sweeps``: one row per distinct sweep (axis names, axis values as labels, meta); re-running the same sweep
  reuses its row and bumps ``last_run``.
- ``sweep_jobs``: which job ids, in product order, make up a sweep.
- ``claims`` (schema 2): which driver (host, pid, start time, last heartbeat) is running each job right now, so
  that several drivers on one store share a sweep's jobs instead of training each twice (``claim``,
  ``heartbeat``, ``release``, ``live_claims``). A schema-1 store gains the table when it is opened for writing.
- ``live``: the partial record (columns as in ``jobs``, plus ``max_iter`` and ``started``) of each job its driver
  reported running (``write_live``, every few seconds), dropped in the transaction that writes the job's record.
  A row whose job no live driver holds is what a dead driver left: ``StoreUnion.running_records`` leaves it out.
  Created, if missing, whenever a store is opened for writing; readers of older versions ignore it.

A job's identity hashes everything that decides its numbers and nothing else; see ``job_identity``.

Other writers (the array tasks of a Slurm sweep) each write their own ``shard-*.db`` beside ``results.db``;
``StoreUnion`` reads the directory as one store.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import math
import os
import socket
import sqlite3
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from modelscape.results import SweepResults, axis_label

SCHEMA_VERSION = 2  # 2: the claims table
APPLICATION_ID = 0x4D534350  # "MSCP": tells our databases from other SQLite files
DB_NAME = "results.db"
PAGE_SIZE = 32768
DB_SUFFIXES = (".db", ".sqlite", ".sqlite3")
IDENTITY_VERSION = 2  # bump when the identity recipe changes, so old and new ids never collide (2: code)

# Hyperparameters that cannot change a job's numbers: where it runs, how loudly, where results go, whether
# to resume. They are left out of ``job_identity`` so that, e.g., moving a sweep from 1 GPU to 8 or turning
# VERBOSE on still finds the jobs already stored.
NON_RESULT_KEYS = frozenset({"VERBOSE", "DEVICES", "EXECUTOR", "WORKERS_PER_DEVICE", "RESULTS_DIR", "EXPT_NAME",
                             "RESUME", "CLAIM_TIMEOUT", "THREADS", "JOB_TIMEOUT", "RETRY_FAILED", "RAY_ADDRESS",
                             "SLURM_PARTITION", "SLURM_TIME", "SLURM_GPUS_PER_NODE", "SLURM_CPUS_PER_TASK",
                             "SLURM_MEM", "SLURM_ACCOUNT", "SLURM_QOS", "SLURM_EXTRA", "SLURM_SHARDS",
                             "SLURM_ARRAY_PARALLELISM", "SLURM_LOG_DIR", "DETACH", "FUSE", "FUSE_MAX", "JOB_ID",
                             "TENSORBOARD", "CHECKPOINTS", "CHECKPOINT_OPTIMIZER",
                             "LIVE_EVERY"})

# crashed: the job killed its worker process twice; timeout: it ran past JOB_TIMEOUT (see executors/pool.py)
STATUSES = ("done", "not_reached", "diverged", "failed", "crashed", "timeout")

# Record keys that live in their own column, with the Python type the column gives back.
_COLUMNS = {"status": str, "error": str, "steps": int, "wall_time": float, "device": str, "seed": int,
            "trial": int, "train_loss": float, "test_loss": float}
_INT64 = (-(2 ** 63), 2 ** 63 - 1)

# A stored record's columns: the jobs table's, and (with two more) the live table's, so a row of either decodes
# the same way.
_RECORD_COLUMNS = """
    job_id     TEXT PRIMARY KEY,
    status     TEXT NOT NULL,
    axes       TEXT NOT NULL,
    config     TEXT,
    error      TEXT,
    steps      INTEGER,
    wall_time  REAL,
    device     TEXT,
    seed       INTEGER,
    trial      INTEGER,
    train_loss REAL,
    test_loss  REAL,
    created    REAL NOT NULL,
    layout     TEXT NOT NULL,
    arrays     BLOB"""
_SCHEMA_SQL = f"""
CREATE TABLE jobs ({_RECORD_COLUMNS}
);
CREATE INDEX jobs_status ON jobs(status);
CREATE TABLE sweeps (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    created     REAL NOT NULL,
    last_run    REAL NOT NULL,
    runs        INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    axis_names  TEXT NOT NULL,
    axis_values TEXT NOT NULL,
    meta        TEXT
);
CREATE INDEX sweeps_fingerprint ON sweeps(fingerprint);
CREATE TABLE sweep_jobs (
    sweep_id INTEGER NOT NULL REFERENCES sweeps(id),
    position INTEGER NOT NULL,
    job_id   TEXT NOT NULL,
    PRIMARY KEY (sweep_id, position)
);
CREATE INDEX sweep_jobs_job ON sweep_jobs(job_id);
"""
_CLAIMS_SQL = """
CREATE TABLE claims (
    job_id    TEXT PRIMARY KEY,
    driver    TEXT NOT NULL,
    host      TEXT NOT NULL,
    pid       INTEGER NOT NULL,
    started   REAL NOT NULL,
    claimed   REAL NOT NULL,
    heartbeat REAL NOT NULL
);
CREATE INDEX claims_driver ON claims(driver);
"""
# The partial records of running jobs (``write_live``), one row per job, dropped when its record is written.
# Added to any store a writer opens (older readers ignore it), so it needs no new schema version.
_LIVE_SQL = f"""
CREATE TABLE IF NOT EXISTS live ({_RECORD_COLUMNS},
    max_iter   INTEGER,
    started    REAL
)
"""
_OUR_TABLES = {"jobs", "sweeps", "sweep_jobs"}  # every schema version has these


class StoreError(Exception):
    """A results store that cannot be used: missing, corrupt, foreign, or written by a newer version."""


# --- drivers and their claims -----------------------------------------------------------------------------

DEFAULT_STALE_AFTER = 30.0  # seconds without a heartbeat after which a driver's claims may be taken over
_CLAIM_COLS = "job_id, driver, host, pid, started, claimed, heartbeat"
_ACTIVE_DRIVERS: set = set()  # ids of the drivers running in this process
# The host of claims that a scheduler's queued or running array task holds (EXECUTOR=slurm). No machine is
# named so; such a claim is not live here: only the scheduler knows whether its task is (``executors.slurm``).
SCHEDULER_HOST = "<slurm>"


@dataclass(frozen=True)
class Driver:
    """The process running a sweep, as its claims name it: ``Driver.start()`` makes one for this process."""

    id: str
    host: str
    pid: int
    started: float

    @classmethod
    def start(cls) -> "Driver":
        """A new driver of this process, registered as active until ``stop``."""
        host, pid, started = socket.gethostname(), os.getpid(), time.time()
        d = cls(f"{host}:{pid}:{started:.6f}:{uuid.uuid4().hex[:8]}", host, pid, started)
        _ACTIVE_DRIVERS.add(d.id)
        return d

    def stop(self) -> None:
        """This driver is done: any claim of it left behind (a crash) is dead to drivers of this host at once."""
        _ACTIVE_DRIVERS.discard(self.id)


def _claim_dict(row) -> dict:
    return dict(zip(_CLAIM_COLS.split(", "), row))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except OSError:
        return True  # cannot tell: trust the heartbeat
    return True


def _claim_live(claim: dict, now: float, stale_after: float) -> bool:
    """Whether the driver that holds ``claim`` is alive: its heartbeat is recent and, on this host, its pid
    exists (this process: the driver is still registered)."""
    if claim["host"] == SCHEDULER_HOST or now - claim["heartbeat"] > stale_after:
        return False
    if claim["host"] == socket.gethostname():
        if claim["pid"] == os.getpid():
            return claim["driver"] in _ACTIVE_DRIVERS
        return _pid_alive(claim["pid"])
    return True


# --- identity and JSON ----------------------------------------------------------------------------------

def _qualname(obj) -> str:
    """``module.qualname`` (as ``modelscape.utils.qualname``, without importing torch)."""
    if isinstance(obj, functools.partial):
        return _qualname(obj.func)
    mod = getattr(obj, "__module__", None) or "?"
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{mod}.{name}"


def _torch_tensor(obj):
    """``obj`` if it is a torch tensor; checked via sys.modules so the store never imports torch itself."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def _tensor_to_numpy(t) -> np.ndarray:
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
    arr = _tensor_to_numpy(a) if _torch_tensor(a) else np.asarray(a)
    h = hashlib.sha256()
    h.update(f"{arr.dtype.str}|{arr.shape}|".encode())
    if arr.dtype.hasobject:
        h.update(_dumps(_canon(arr.tolist())).encode())
    else:
        h.update(np.ascontiguousarray(arr).data)
    digest = h.hexdigest()
    if cache is not None:
        cache[id(a)] = (a, digest)  # holding ``a`` keeps its id from being reused by another object
    return digest


def _key_str(k) -> str:
    # a non-string key is tagged so that {1: x} and {"1": x} stay distinct
    return k if isinstance(k, str) else "\x00" + _dumps(_canon(k))


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
    if isinstance(obj, np.ndarray) or _torch_tensor(obj):
        return {"__array__": array_digest(obj)}
    if isinstance(obj, Mapping):
        return {_key_str(k): _canon(v, d) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canon(v, d) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((_canon(v, d) for v in obj), key=_dumps)
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


def _dumps(obj) -> str:
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
        digest = hashlib.sha256(_dumps(items).encode()).hexdigest()
    if cache is not None and not _fingerprinting:  # inside a cycle (a recursive function) the digest is partial
        cache[key] = (obj, digest)
    return digest


def _code_items(obj):
    """A JSON-able structure standing for ``obj``'s code, or None if there is none to read."""
    import inspect
    import types
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


def _code_object_items(co, doc=None):
    import inspect
    consts = [c for k, c in enumerate(co.co_consts) if not (k == 0 and doc is not None and c == doc)]
    return {"bytecode": co.co_code.hex(), "names": list(co.co_names), "args": [co.co_argcount, co.co_kwonlyargcount],
            "consts": [_code_object_items(c) if inspect.iscode(c) else _canon(c) for c in consts]}


def _function_items(fn):
    import types
    out = _code_object_items(fn.__code__, fn.__doc__)
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
    import types
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
        elif callable(obj) and not _is_library(obj) and not _torch_tensor(obj):
            fp = code_fingerprint(obj)
            out[_qualname(obj)] = fp[:12] if fp else "name-only"

    for o in objs:
        walk(o)
    return dict(sorted(out.items()))


def _identity_axis_value(name, value):
    """An axis value as the job sees it: a schema hyperparameter is coerced (LR=1 -> 1.0), like the config."""
    from modelscape.config import ALIASES, BY_NAME, coerce
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
        "config": {k: v for k, v in config.items() if k not in NON_RESULT_KEYS},
        "bfn_config": dict(bfn_config or {}),
        "axes": {k: _identity_axis_value(k, v) for k, v in (axes or {}).items()},
    }
    return hashlib.sha256(_dumps(_canon(payload)).encode()).hexdigest()


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
    if isinstance(obj, np.ndarray) or _torch_tensor(obj):
        arr = _tensor_to_numpy(obj) if _torch_tensor(obj) else obj
        return {"array": list(arr.shape), "dtype": str(arr.dtype), "sha": array_digest(obj)[:16]}
    if isinstance(obj, Mapping):
        return {k if isinstance(k, str) else str(jsonable(k)): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((jsonable(v) for v in obj), key=_dumps)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if callable(obj):
        return _qualname(obj)
    return str(obj)


def provenance(cwd=None) -> dict:
    """Where and with what a sweep runs: host, Python, modelscape, torch and numpy versions, and the git commit
    of ``cwd`` (default: the working directory) with ``git_dirty`` (uncommitted changes); git fields are None
    outside a repository or without git."""
    import platform
    import subprocess

    import modelscape

    def git(*args):
        try:
            out = subprocess.run(["git", *args], cwd=cwd or os.getcwd(), capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    torch = sys.modules.get("torch")
    return {"host": socket.gethostname(), "python": platform.python_version(), "modelscape": modelscape.__version__,
            "torch": getattr(torch, "__version__", None), "numpy": np.__version__,
            "git_commit": commit, "git_dirty": bool(status) if status is not None else None}


# --- records <-> rows ---------------------------------------------------------------------------------

def _plain(v):
    return v.item() if isinstance(v, np.generic) and not isinstance(v, np.void) else v


def _json_exact(v) -> bool:
    """Whether ``v`` survives a JSON round trip as an equal value of the same types."""
    try:
        back = json.loads(json.dumps(v, allow_nan=True))
    except (TypeError, ValueError):
        return False
    return _same(v, back)


def _same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _as_array(name, v) -> np.ndarray:
    arr = _tensor_to_numpy(v) if _torch_tensor(v) else np.asarray(v)
    if arr.dtype.hasobject:
        raise StoreError(f"{name} is an array of Python objects (dtype object); the store keeps numeric and "
                         "string arrays only: return numbers or a numeric array")
    return arr


def _encode(record: Mapping):
    """A record -> (column values, layout JSON, npz blob or None)."""
    if "job_id" not in record or "status" not in record:
        raise ValueError(f"a record needs 'job_id' and 'status'; it has keys {sorted(record)}")
    cols = {k: None for k in _COLUMNS}
    layout = {"keys": list(record), "none": [], "json": {}, "arrays": {}}
    arrays = {}

    def put_array(a):
        name = f"a{len(arrays)}"
        arrays[name] = a
        return name

    for key, value in record.items():
        value = _plain(value)
        if key in ("job_id", "axes", "config"):
            continue
        if value is None:
            layout["none"].append(key)
        elif key in _COLUMNS and type(value) is _COLUMNS[key] and not (
                type(value) is int and not _INT64[0] <= value <= _INT64[1]):
            cols[key] = value
        elif key == "grabs" and isinstance(value, Mapping):
            layout["grabs"] = grabs = {}
            for gname, g in value.items():
                g = g if isinstance(g, np.generic) else _plain(g)  # numpy scalars keep their dtype
                if g is None:
                    grabs[gname] = ["none", None]
                elif isinstance(g, np.generic):
                    grabs[gname] = ["scalar", put_array(_as_array(f"grab {gname!r}", g))]
                elif isinstance(g, (bool, int, float)) and _json_exact(g):
                    grabs[gname] = ["json", g]
                else:
                    grabs[gname] = ["array", put_array(_as_array(f"grab {gname!r}", g))]
        elif isinstance(value, np.ndarray) or _torch_tensor(value):
            layout["arrays"][key] = put_array(_as_array(f"record key {key!r}", value))
        elif _json_exact(value):
            layout["json"][key] = value
        else:  # lossy, but a record must never fail to be stored for an odd extra key
            layout["json"][key] = jsonable(value)
    if cols["status"] is None:
        raise ValueError(f"record {record['job_id']}: status must be a string, got {record['status']!r}")
    blob = None
    if arrays:
        buf = io.BytesIO()
        np.savez(buf, allow_pickle=False, **arrays)
        blob = buf.getvalue()
    axes = {str(k): axis_label(v) for k, v in (record.get("axes") or {}).items()}
    config = _dumps_store(jsonable(record["config"])) if "config" in record else None
    return dict(job_id=str(record["job_id"]), axes=_dumps_store(axes), config=config,
                layout=_dumps_store(layout), arrays=blob, **cols)


def _dumps_store(obj) -> str:
    return json.dumps(obj, allow_nan=True, separators=(",", ":"))


# CAST: a damaged row may hold text where the blob belongs; read as bytes, it fails to decode as that row alone
_SELECT = ("SELECT job_id, status, axes, config, error, steps, wall_time, device, seed, trial, train_loss, "
           "test_loss, layout, CAST(arrays AS BLOB) FROM jobs")


def _decode(row) -> dict:
    """A row of ``_SELECT`` -> the record that was written."""
    (job_id, status, axes, config, error, steps, wall_time, device, seed, trial, train_loss, test_loss,
     layout, blob) = row
    layout = json.loads(layout)
    cols = dict(status=status, error=error, steps=steps, wall_time=wall_time, device=device, seed=seed,
                trial=trial, train_loss=train_loss, test_loss=test_loss)
    arrays = {}
    if blob is not None:
        with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    none, js = set(layout["none"]), layout["json"]
    out = {}
    for key in layout["keys"]:
        if key == "job_id":
            out[key] = job_id
        elif key == "axes":
            out[key] = json.loads(axes)
        elif key == "config":
            out[key] = json.loads(config) if config is not None else None
        elif key in none:
            out[key] = None
        elif key in js:
            out[key] = js[key]
        elif key in layout["arrays"]:
            out[key] = arrays[layout["arrays"][key]]
        elif key == "grabs" and "grabs" in layout:
            grabs = out[key] = {}
            for gname, (kind, ref) in layout["grabs"].items():
                grabs[gname] = (None if kind == "none" else ref if kind == "json"
                                else arrays[ref][()] if kind == "scalar" else arrays[ref])
        elif key in cols:
            v = cols[key]
            # SQLite stores NaN in a REAL column as NULL
            out[key] = float("nan") if v is None and _COLUMNS[key] is float else v
        else:
            raise StoreError(f"job {job_id}: stored layout names key {key!r} but holds no value for it")
    return out


# --- the store ------------------------------------------------------------------------------------------

def resolve_db_path(path, create: bool = False) -> Path:
    """The database file a store path means: the file itself, or ``DIR/results.db`` for a directory.

    A path that does not exist is a file if it ends in .db/.sqlite/.sqlite3 and a directory otherwise;
    with ``create`` the missing directories are made, without it a missing store is a StoreError.
    """
    p = Path(os.fspath(path)).expanduser()
    if p.exists():  # checked first: another process may be creating the directory right now
        if not p.is_dir():
            return p
        db = p / DB_NAME
        if not create and not db.exists():
            raise StoreError(f"no results store in {p}: it holds no {DB_NAME}")
        return db
    if not create:
        raise StoreError(f"no results store at {p}: no such file or directory")
    if p.suffix.lower() in DB_SUFFIXES:
        p.parent.mkdir(parents=True, exist_ok=True)
        return p
    p.mkdir(parents=True, exist_ok=True)
    return p / DB_NAME


def _run_script(conn, sql):
    for stmt in sql.split(";"):
        if stmt.strip():
            conn.execute(stmt)


class Store:
    """The SQLite results store of one experiment. ``Store(path)`` opens (creating it if needed) ``path``
    if it is a .db file, else ``path/results.db``; ``readonly=True`` opens an existing store for reading only.

    Drivers write (several may share a store: see ``claim``); any number of processes may read meanwhile.
    A file that is not a modelscape store raises ``StoreError`` naming it. Usable as a context manager; safe
    to share between threads of one process (calls are serialized). A read-only store in a directory SQLite
    cannot write to is opened as an immutable file (``immutable`` is then True).
    """

    def __init__(self, path, readonly: bool = False, timeout: float = 30.0):
        self.readonly = readonly
        self.path = resolve_db_path(path, create=not readonly)
        self._lock = threading.RLock()
        self._conn = None
        self.immutable = False  # opened read-only in a place where SQLite cannot even make its -shm file
        self.damaged: dict[str, str] = {}  # job id -> why its row could not be read (filled by readers)
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a directory, not a results database")
        self._check_header()
        try:
            self._conn = self._connect(timeout)
            self._check_schema()
            if not readonly:
                self._enable_wal(timeout)
                self._conn.execute("PRAGMA synchronous = NORMAL")
                self._conn.execute(_LIVE_SQL)
        except sqlite3.DatabaseError as e:
            self.close()
            raise StoreError(f"{self.path} is not a usable results store: {e}") from None
        except BaseException:
            self.close()
            raise

    def _enable_wal(self, timeout):
        """Switch the file to WAL (once: the mode is stored in the file). The switch needs the file to itself
        and SQLite reports "locked" at once, without waiting, while another process has it open (several
        processes opening a new store together): try again until ``timeout``."""
        deadline = time.monotonic() + timeout
        while self._conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            try:
                self._conn.execute("PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def _connect(self, timeout):
        def connect(target, uri=False):
            conn = sqlite3.connect(target, uri=uri, timeout=timeout, isolation_level=None, check_same_thread=False)
            # Text that is not UTF-8 (a damaged row) must not fail a whole query: it decodes with U+FFFD marks,
            # and the row's JSON then fails to parse, which names that one row as damaged.
            conn.text_factory = lambda b: b.decode("utf-8", "replace")
            conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            return conn

        if not self.readonly:
            return connect(self.path)
        uri = self.path.resolve().as_uri()
        conn = connect(f"{uri}?mode=ro", uri=True)
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.OperationalError as e:
            conn.close()
            msg = str(e).lower()
            if "readonly" not in msg and "read-only" not in msg and "unable to open" not in msg:
                raise
        # A WAL database needs its -shm file even to read; in a read-only directory SQLite cannot create it.
        # Nobody can be writing there either, so the file can be read as immutable (no locks, no WAL).
        self.immutable = True
        return connect(f"{uri}?mode=ro&immutable=1", uri=True)

    def _check_header(self):
        # sqlite only notices a foreign file at the first query, with a bare "file is not a database"
        for attempt in range(40):
            try:
                size = self.path.stat().st_size
            except FileNotFoundError:
                return
            if size == 0:
                if self.readonly:
                    raise StoreError(f"{self.path} is an empty file, not a results store")
                return
            with open(self.path, "rb") as f:
                head = f.read(16)
            if head == b"SQLite format 3\x00":
                return
            # Another process may be writing the first page of a store it is creating right now: a header read
            # in the middle of that write is short or zeros. Look again before calling the file foreign.
            if len(head) == 16 and any(head):
                break
            time.sleep(0.05)
        raise StoreError(f"{self.path} is not a modelscape results store (not an SQLite database; "
                         f"it starts with {head[:8]!r})")

    def _schema_state(self):
        """``(application_id, user_version, tables)`` read in one transaction: read one by one, they could
        straddle another process's creation of the schema and look like a foreign database."""
        conn = self._conn
        conn.execute("BEGIN")
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.execute("COMMIT")
        return app_id, version, tables

    def _check_schema(self):
        app_id, version, tables = self._schema_state()
        if app_id == 0 and not tables and not self.readonly:
            self._create_schema()
            app_id, version, tables = self._schema_state()
        if app_id == APPLICATION_ID:
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self.path} was written by a newer modelscape (store schema {version}; this "
                                 f"version reads up to {SCHEMA_VERSION}); upgrade modelscape")
            if not _OUR_TABLES <= tables:
                raise StoreError(f"{self.path} is a damaged results store: tables "
                                 f"{sorted(_OUR_TABLES - tables)} are missing")
            if version < 2 and not self.readonly:
                self._migrate()
            return
        what = f"its tables are {sorted(tables)}" if tables else "it holds no tables"
        raise StoreError(f"{self.path} is an SQLite database but not a modelscape results store ({what})")

    def _create_schema(self):
        conn = self._conn
        # Rows carry blobs of 0.1-10 MB; 32 KiB pages halve the write time of a 4 MB grab against SQLite's
        # default 4 KiB for ~3% more space. Only possible while the file is empty.
        conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
        with self._write_transaction(conn):
            # another process may have created it between our check and the lock
            if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                _run_script(conn, _SCHEMA_SQL + _CLAIMS_SQL)
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _migrate(self):
        """Schema 1 -> 2: add the claims table (a schema-1 store is otherwise unchanged)."""
        conn = self._conn
        with self._write_transaction(conn):
            if conn.execute("PRAGMA user_version").fetchone()[0] < 2:  # not done by another process meanwhile
                _run_script(conn, _CLAIMS_SQL)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @staticmethod
    @contextlib.contextmanager
    def _write_transaction(conn):
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _guard(self, what: str):
        """Serialize access and turn sqlite's errors into a StoreError naming the file."""
        if self._conn is None:
            raise StoreError(f"store {self.path} is closed")
        with self._lock:
            try:
                yield self._conn
            except sqlite3.DatabaseError as e:
                raise StoreError(f"{what} in {self.path} failed: {e}") from e

    @contextlib.contextmanager
    def _snapshot(self, what: str):
        """One read transaction, so several SELECTs see the same committed state."""
        with self._guard(what) as conn:
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    # --- writing ---
    def begin_sweep(self, axis_names, axis_values, job_ids, meta=None) -> int:
        """Record the sweep about to run: its axes and the ids of its jobs in product order. Returns its id.

        Re-running the same sweep (same axes, values and job ids) reuses its id; ``meta`` (JSON-able, via
        ``jsonable``) replaces the stored one.
        """
        self._writable()
        axis_names = [str(n) for n in axis_names]
        labels = [[axis_label(v) for v in vals] for vals in axis_values]
        job_ids = [str(j) for j in job_ids]
        if len(axis_names) != len(labels):
            raise ValueError(f"{len(axis_names)} axis names {axis_names} but {len(labels)} lists of values")
        n = math.prod(len(v) for v in labels)
        if len(job_ids) != n:
            raise ValueError(f"the sweep over {dict(zip(axis_names, labels))} has {n} jobs but {len(job_ids)} "
                             "job ids were given")
        fingerprint = hashlib.sha256(_dumps([axis_names, labels, job_ids]).encode()).hexdigest()
        now = time.time()
        meta_json = _dumps_store(jsonable(meta)) if meta is not None else None
        with self._guard("recording a sweep") as conn, self._write_transaction(conn):
            row = conn.execute("SELECT id FROM sweeps WHERE fingerprint = ?", (fingerprint,)).fetchone()
            if row is not None:
                sweep_id = row[0]
                conn.execute("UPDATE sweeps SET last_run = ?, runs = runs + 1, meta = coalesce(?, meta) "
                             "WHERE id = ?", (now, meta_json, sweep_id))
            else:
                cur = conn.execute(
                    "INSERT INTO sweeps (created, last_run, runs, fingerprint, axis_names, axis_values, meta) "
                    "VALUES (?, ?, 1, ?, ?, ?, ?)",
                    (now, now, fingerprint, _dumps_store(axis_names), _dumps_store(labels), meta_json))
                sweep_id = cur.lastrowid
                conn.executemany("INSERT INTO sweep_jobs (sweep_id, position, job_id) VALUES (?, ?, ?)",
                                 [(sweep_id, i, j) for i, j in enumerate(job_ids)])
        return sweep_id

    def write(self, record: Mapping) -> None:
        """Store one job's record, committed at once (replacing any earlier row of the same ``job_id``).

        Record keys: ``job_id`` and ``status`` are required; axis values are stored as labels (``axis_label``),
        ``config`` as ``jsonable(config)``; arrays (top-level and in ``grabs``) go to one npz blob with their
        dtypes; everything else is read back as written. A grab of dtype object raises StoreError.
        """
        self.write_many([record])

    def write_many(self, records) -> None:
        """Store several records (each as ``write`` takes it) in one transaction: all of them, or, should the
        process die or a record be refused, none."""
        self._writable()
        rows = []
        for record in records:
            row = _encode(record)
            row["created"] = time.time()
            rows.append(row)
        if not rows:
            return
        what = f"writing job {rows[0]['job_id']}" if len(rows) == 1 else f"writing {len(rows)} jobs"
        with self._guard(what) as conn, self._write_transaction(conn):
            for row in rows:
                names = list(row)
                conn.execute(f"INSERT OR REPLACE INTO jobs ({', '.join(names)}) VALUES "
                             f"({', '.join('?' * len(names))})", [row[k] for k in names])
                conn.execute("DELETE FROM live WHERE job_id = ?", (row["job_id"],))  # the final record wins

    def write_live(self, partials) -> None:
        """Store the partial records of running jobs, in one transaction: ``partials`` is a list of
        ``(record, started)``, each record shaped as a finished one (``job_id``, ``status`` 'running', ``axes``,
        ``steps``, ``max_iter``, curves so far) and ``started`` the time the job began. Replaces each job's
        earlier live row; ``write`` drops it."""
        self._writable()
        rows = []
        for record, started in partials:
            row = _encode({k: v for k, v in record.items() if k != "max_iter"})
            row.update(created=time.time(), max_iter=record.get("max_iter"), started=started)
            rows.append(row)
        if not rows:
            return
        names = list(rows[0])
        with self._guard("writing the progress of running jobs") as conn, self._write_transaction(conn):
            conn.executemany(f"INSERT OR REPLACE INTO live ({', '.join(names)}) VALUES "
                             f"({', '.join('?' * len(names))})", [[r[k] for k in names] for r in rows])

    def _writable(self):
        if self.readonly:
            raise StoreError(f"store {self.path} was opened read-only")

    # --- claims: which driver runs which job ---
    def claim(self, job_id: str, driver: "Driver", since: float | None = None,
              stale_after: float = DEFAULT_STALE_AFTER) -> tuple[str, dict | None]:
        """Try to make ``driver`` the one that runs ``job_id``, in one transaction. Returns ``(outcome, owner)``:

        - ``("stored", None)``: a record of the job was written at or after ``since`` (another driver ran it
          while this one was going; pass the time the driver started);
        - ``("busy", owner)``: a live driver holds it (``owner`` is its claim: driver, host, pid, started,
          heartbeat); skip it for now;
        - ``("claimed", None)``: it is ``driver``'s now; ``("taken_over", owner)``: it was, until now, claimed by
          a driver that is dead (on this host its pid is gone) or silent for more than ``stale_after`` seconds.
        """
        self._writable()
        now = time.time()
        with self._guard(f"claiming job {job_id}") as conn, self._write_transaction(conn):
            if since is not None and conn.execute("SELECT 1 FROM jobs WHERE job_id = ? AND created >= ?",
                                                  (job_id, since)).fetchone():
                return "stored", None
            row = conn.execute(f"SELECT {_CLAIM_COLS} FROM claims WHERE job_id = ?", (job_id,)).fetchone()
            owner = _claim_dict(row) if row is not None else None
            if owner is not None and owner["driver"] != driver.id and _claim_live(owner, now, stale_after):
                return "busy", owner
            conn.execute("INSERT OR REPLACE INTO claims (job_id, driver, host, pid, started, claimed, heartbeat) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (job_id, driver.id, driver.host, driver.pid, driver.started, now, now))
        if owner is not None and owner["driver"] != driver.id:
            return "taken_over", owner
        return "claimed", None

    def heartbeat(self, driver: "Driver") -> int:
        """Mark every claim of ``driver`` alive now; returns how many it holds."""
        self._writable()
        with self._guard("refreshing claims") as conn:
            return conn.execute("UPDATE claims SET heartbeat = ? WHERE driver = ?",
                                (time.time(), driver.id)).rowcount

    def release(self, driver: "Driver", job_ids=None) -> None:
        """Drop ``driver``'s claims on ``job_ids`` (all of them if None): the jobs are finished or abandoned."""
        self._writable()
        with self._guard("releasing claims") as conn:
            if job_ids is None:
                conn.execute("DELETE FROM claims WHERE driver = ?", (driver.id,))
            else:
                conn.executemany("DELETE FROM claims WHERE job_id = ? AND driver = ?",
                                 [(str(j), driver.id) for j in job_ids])

    def claims(self) -> list[dict]:
        """Every claim, live or not: job_id, driver, host, pid, started, claimed, heartbeat. Empty for a
        schema-1 store opened read-only."""
        with self._guard("reading claims") as conn:
            if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'claims'").fetchone():
                return []
            rows = conn.execute(f"SELECT {_CLAIM_COLS} FROM claims ORDER BY claimed").fetchall()
        return [_claim_dict(row) for row in rows]

    def live_claims(self, stale_after: float = DEFAULT_STALE_AFTER) -> list[dict]:
        """The claims of drivers that are alive (see ``claim``): job_id, driver, host, pid, started, claimed,
        heartbeat. Empty for a schema-1 store opened read-only."""
        now = time.time()
        return [c for c in self.claims() if _claim_live(c, now, stale_after)]

    # --- reading ---
    def statuses(self) -> dict:
        """``{job id: (status, time written)}`` of every stored job, without reading their arrays."""
        with self._guard("reading job statuses") as conn:
            return {r[0]: (r[1], r[2]) for r in conn.execute("SELECT job_id, status, created FROM jobs")}

    def done_ids(self, retry_failed: bool = False) -> set:
        """Ids of the jobs a resumed sweep skips: every stored status but ``failed`` (and, with
        ``retry_failed``, but ``crashed`` and ``timeout`` too)."""
        redo = ("failed", "crashed", "timeout") if retry_failed else ("failed",)
        marks = ",".join("?" * len(redo))
        with self._guard("reading job ids") as conn:
            return {r[0] for r in conn.execute(f"SELECT job_id FROM jobs WHERE status NOT IN ({marks})", redo)}

    def records(self, job_ids=None) -> list[dict]:
        """Stored records: all of them (in the order written), or those of ``job_ids`` that are present, in
        that order."""
        with self._snapshot("reading records") as conn:
            return self._records(conn, job_ids)

    def _records(self, conn, job_ids):
        if job_ids is None:
            rows = conn.execute(_SELECT + " ORDER BY created, rowid").fetchall()
            return [r for r in map(self._decode, rows) if r is not None]
        job_ids = [str(j) for j in job_ids]
        found = {}
        unique = list(dict.fromkeys(job_ids))
        for i in range(0, len(unique), 500):  # stay under SQLite's limit on bound parameters
            chunk = unique[i:i + 500]
            q = _SELECT + f" WHERE job_id IN ({', '.join('?' * len(chunk))})"
            for r in conn.execute(q, chunk):
                found[r[0]] = r
        decoded = {j: self._decode(r) for j, r in found.items()}
        return [decoded[j] for j in job_ids if decoded.get(j) is not None]

    def _decode(self, row):
        """The record of a row, or None for a damaged row: it is named in a warning and in ``self.damaged``,
        and readers go on without it (a resumed sweep trains the job again and overwrites the row)."""
        try:
            return _decode(row)
        except Exception as e:  # a damaged blob or layout: SQLite keeps no checksums of its contents
            why = f"{type(e).__name__}: {e}"
            if row[0] not in self.damaged:
                warnings.warn(f"job {row[0]} in {self.path} is damaged and is skipped ({why}); a resumed sweep "
                              "trains it again", stacklevel=4)
            self.damaged[row[0]] = why
            return None

    def live_records(self) -> list[dict]:
        """The partial records of the jobs a driver reported running (``write_live``), whether or not that
        driver still lives (see ``StoreUnion.running_records``); each has ``max_iter``, ``started`` and
        ``updated`` (the time of its last flush). Empty for a store written before live rows existed."""
        with self._snapshot("reading running jobs") as conn:
            if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'live'").fetchone():
                return []
            rows = conn.execute(_SELECT.replace("FROM jobs", ", max_iter, started, created FROM live")).fetchall()
        out = []
        for row in rows:
            rec = self._decode(row[:-3])
            if rec is not None:
                rec.update(max_iter=row[-3], started=row[-2], updated=row[-1])
                out.append(rec)
        return out

    def sweeps(self) -> list[dict]:
        """The recorded sweeps, oldest first: id, created, last_run, runs, axis_names, axis_values (labels),
        meta and n_jobs."""
        with self._guard("reading sweeps") as conn:
            rows = conn.execute(
                "SELECT s.id, s.created, s.last_run, s.runs, s.axis_names, s.axis_values, s.meta, "
                "(SELECT count(*) FROM sweep_jobs j WHERE j.sweep_id = s.id) FROM sweeps s ORDER BY s.id").fetchall()
        return [dict(id=r[0], created=r[1], last_run=r[2], runs=r[3], axis_names=json.loads(r[4]),
                     axis_values=json.loads(r[5]), meta=json.loads(r[6]) if r[6] is not None else None, n_jobs=r[7])
                for r in rows]

    def latest_sweep(self) -> int | None:
        """The id of the sweep run most recently, or None if none was recorded."""
        with self._guard("reading sweeps") as conn:
            row = conn.execute("SELECT id FROM sweeps ORDER BY last_run DESC, id DESC LIMIT 1").fetchone()
        return row[0] if row else None

    def sweep_job_ids(self, sweep_id: int) -> list[str]:
        """The job ids of sweep ``sweep_id`` in product order."""
        with self._guard("reading a sweep") as conn:
            return self._sweep_job_ids(conn, sweep_id)

    def _sweep_job_ids(self, conn, sweep_id):
        return [r[0] for r in conn.execute("SELECT job_id FROM sweep_jobs WHERE sweep_id = ? ORDER BY position",
                                           (sweep_id,))]

    def status_counts(self, sweep_id: int | None = None) -> dict:
        """``{status: number of jobs}`` over the whole store, or over one sweep (its jobs not stored yet
        count as ``missing``)."""
        with self._snapshot("counting jobs") as conn:
            if sweep_id is None:
                rows = conn.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall()
                return _ordered_counts(dict(rows))
            self._sweep_row(conn, sweep_id)
            rows = conn.execute(
                "SELECT coalesce(j.status, 'missing'), count(*) FROM sweep_jobs s LEFT JOIN jobs j "
                "ON j.job_id = s.job_id WHERE s.sweep_id = ? GROUP BY 1", (sweep_id,)).fetchall()
            return _ordered_counts(dict(rows))

    def _sweep_row(self, conn, sweep_id):
        row = conn.execute("SELECT axis_names, axis_values FROM sweeps WHERE id = ?", (int(sweep_id),)).fetchone()
        if row is None:
            ids = [r[0] for r in conn.execute("SELECT id FROM sweeps ORDER BY id")]
            raise StoreError(f"{self.path} has no sweep {sweep_id}; its sweeps are {ids}")
        return json.loads(row[0]), json.loads(row[1])

    def results(self, sweep: int | None = None) -> SweepResults:
        """The sweep ``sweep`` (default: the one run most recently) as SweepResults, with the records of its
        jobs stored so far."""
        with self._snapshot("reading a sweep") as conn:
            if sweep is None:
                row = conn.execute("SELECT id FROM sweeps ORDER BY last_run DESC, id DESC LIMIT 1").fetchone()
                if row is None:
                    raise StoreError(f"{self.path} holds no recorded sweep")
                sweep = row[0]
            names, values = self._sweep_row(conn, sweep)
            records = self._records(conn, self._sweep_job_ids(conn, sweep))
        return SweepResults(names, values, records, store_dir=self.path.parent)

    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"Store({str(self.path)!r}{', readonly=True' if self.readonly else ''})"


def _ordered_counts(counts: dict) -> dict:
    order = {s: i for i, s in enumerate(STATUSES + ("missing",))}
    return {k: counts[k] for k in sorted(counts, key=lambda s: (order.get(s, len(order)), s))}


SHARD_GLOB = "shard-*.db"  # results files written beside results.db by other writers (Slurm array tasks)


def shard_path(directory, name: str) -> Path:
    """The results file of one extra writer (``name``: letters, digits, '-' and '_') in a store directory."""
    return Path(directory) / f"shard-{name}.db"


class StoreUnion:
    """A store directory read as one store: its ``results.db`` and every ``shard-*.db`` beside it.

    Each file has one writer (a driver, a Slurm array task), so nothing writes one SQLite file from several
    machines; readers see the union. A job appears once whichever file holds it: a record with a status other
    than failed wins over a failed one, then the newest. The sweeps (axes, job order, meta) are those
    recorded in ``results.db``. Read-only; offers the reading methods of ``Store``.
    """

    def __init__(self, path):
        self.primary = Store(path, readonly=True)
        self.path = self.primary.path
        self.stores = [self.primary]
        if self.path.name == DB_NAME:  # a store directory: shards live beside its results.db
            for f in sorted(self.path.parent.glob(SHARD_GLOB)):
                try:
                    self.stores.append(Store(f, readonly=True))
                except StoreError as e:  # e.g. an array task creating its file right now: read the rest
                    warnings.warn(f"shard file {f.name} is skipped: {e}", stacklevel=2)

    @property
    def damaged(self) -> dict:
        return {j: why for st in self.stores for j, why in st.damaged.items()}

    def _best(self) -> dict:
        """``{job id: (status, created, store)}`` of the record each job is read from."""
        best = {}
        for st in self.stores:
            for job_id, (status, created) in st.statuses().items():
                old = best.get(job_id)
                if old is None or (status != "failed", created) > (old[0] != "failed", old[1]):
                    best[job_id] = (status, created, st)
        return best

    def done_ids(self, retry_failed: bool = False) -> set:
        return set().union(*(st.done_ids(retry_failed) for st in self.stores))

    def records(self, job_ids=None) -> list[dict]:
        best = self._best()
        if job_ids is None:
            job_ids = sorted(best, key=lambda j: best[j][1])
        job_ids = [str(j) for j in job_ids]
        found = {}
        for st in self.stores:
            mine = [j for j in dict.fromkeys(job_ids) if j in best and best[j][2] is st]
            if mine:
                found.update((r["job_id"], r) for r in st.records(mine))
        return [found[j] for j in job_ids if j in found]

    def status_counts(self, sweep_id: int | None = None) -> dict:
        best = self._best()
        ids = best if sweep_id is None else self.primary.sweep_job_ids(self._check_sweep(sweep_id))
        counts = {}
        for j in ids:
            status = best[j][0] if j in best else "missing"
            counts[status] = counts.get(status, 0) + 1
        return _ordered_counts(counts)

    def _check_sweep(self, sweep_id):
        ids = [s["id"] for s in self.primary.sweeps()]
        if sweep_id not in ids:
            raise StoreError(f"{self.path} has no sweep {sweep_id}; its sweeps are {ids}")
        return sweep_id

    def live_claims(self, stale_after: float = DEFAULT_STALE_AFTER) -> list[dict]:
        return [c for st in self.stores for c in st.live_claims(stale_after)]

    def live_records(self) -> dict:
        """``{job id: partial record}`` of the jobs some driver reported running and no file holds a record
        of (a finished record wins), the newest row where several files have one. Includes the rows a dead
        driver left behind: ``running_records`` keeps only those a live driver holds."""
        finished = self._best()
        out = {}
        for st in self.stores:
            for rec in st.live_records():
                j = rec["job_id"]
                if j not in finished and (j not in out or rec["updated"] > out[j]["updated"]):
                    out[j] = rec
        return out

    def running_records(self) -> dict:
        """``{job id: partial record}`` of the jobs running right now: a live row whose job a live driver
        holds (``live_claims``). A row left by a driver that died is not among them."""
        held = {c["job_id"] for c in self.live_claims()}
        return {j: r for j, r in self.live_records().items() if j in held}

    def sweeps(self) -> list[dict]:
        return self.primary.sweeps()

    def latest_sweep(self) -> int | None:
        return self.primary.latest_sweep()

    def sweep_job_ids(self, sweep_id: int) -> list[str]:
        return self.primary.sweep_job_ids(sweep_id)

    def results(self, sweep: int | None = None, running: bool = False) -> SweepResults:
        """The sweep ``sweep`` (default: the latest) with the records of its jobs stored so far; with ``running``
        also the partial records (status ``running``) of its jobs running now (``running_records``)."""
        sweep = self.latest_sweep() if sweep is None else sweep
        if sweep is None:
            raise StoreError(f"{self.path} holds no recorded sweep")
        info = next((s for s in self.sweeps() if s["id"] == sweep), None)
        if info is None:
            self._check_sweep(sweep)  # raises, naming the sweeps there are
        ids = self.sweep_job_ids(sweep)
        records = self.records(ids)
        if running:
            now = self.running_records()
            records += [now[j] for j in ids if j in now]
        return SweepResults(info["axis_names"], info["axis_values"], records, store_dir=self.path.parent)

    def close(self) -> None:
        for st in self.stores:
            st.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"StoreUnion({str(self.path)!r}, {len(self.stores) - 1} shards)"


def load(path, sweep: int | None = None, running: bool = True) -> SweepResults:
    """Load a sweep from a results store, from any process, even while the sweep is still running.

    ``path``: the .db file, or the directory holding it (``RESULTS_DIR/EXPT_NAME``). ``sweep``: a sweep id
    (see ``Store(path).sweeps()``); default, the sweep run most recently. Returns the SweepResults the job
    iterator returns, with the jobs stored so far (from ``results.db`` and any shard files beside it) and,
    with ``running``, the jobs running right now: status ``running``, ``steps`` done of ``max_iter``, their
    curves so far (as of the driver's last flush, a few seconds old) and ``train_loss`` the EMA at ``steps``.
    """
    with StoreUnion(path) as store:
        return store.results(sweep, running=running)
