"""Checkpoints: a job's weights (and, with CHECKPOINT_OPTIMIZER, its optimizer's state) at chosen steps, at each
threshold crossing and at the end, saved beside the store and loaded back as a built model.

Layout, under the experiment directory ``RESULTS_DIR/EXPT_NAME`` (the directory of the store), in a folder of the
store's own (``dirname``): ``checkpoints`` for ``results.db`` and its Slurm shards, ``<file>-checkpoints`` for any
other store file (``expB.db-checkpoints``), so two store files in one folder never share a job's checkpoints:

- ``<folder>/<JOB_ID>/step-<n>.safetensors``: the model after ``n`` updates (the user's model: under CENTER,
  the trained function is ``model - baseline``, the baseline being the model at step 0);
- ``<folder>/<JOB_ID>/step-<n>.opt.safetensors``: the optimizer's ``state_dict`` at the same step, its
  tensors flattened, its structure (param groups, numbers) as JSON in the file's metadata;
- ``<folder>/<JOB_ID>/model.json``: how to build the model again, as data: its class (``module:qualname``),
  the constructor's arguments (JSON; a tensor among them in ``model.safetensors``), the muP multipliers and
  GAMMA of each module, whether it was centered, and the optimizer's class, settings and parameter groups (by
  parameter name); ``model.safetensors`` holds the centering baseline's weights (the model at init).

Loading runs nothing a store holds: no pickle. The model's class is imported by name only from a package this
process has imported already (or torch, modelscape), else the caller passes it (``model_class=``); every path
read from a record must stay inside the store's directory. Checkpoints written by modelscape 0.3 (``model.pkl``,
a pickle) are not loaded: the error says how to write them again.

The job's store record is the index: its ``checkpoints`` list holds one entry per checkpoint (step, label such
as ``step 500`` / ``threshold 0.1`` / ``final``, file, bytes, optimizer file), written by the job's worker
with the rest of its record, so a record from a Slurm shard file indexes its checkpoints the same way.
Every file is written to a temporary name and renamed, so a reader never sees half a file.

This module is the files: what a config asks for, their layout, writing and reading them, loading one back as a
model, and their disk use. The job's side, the observers that write them while it trains, is ``checkpointer``.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from modelscape.backend.identity import code_fingerprint
from modelscape.config import ConfigError, signature_names
from modelscape.models import Centered
from modelscape.mup.apply import scale_output
from modelscape.utils import USER_MODULE_PREFIX, check_path_name

__all__ = ["DIRNAME", "dirname", "plan", "job_dir", "check_sweep", "flatten_model", "flatten_tree", "unflatten_tree",
           "encode_value", "decode_value", "write_tensors", "read_tensors", "load", "describe", "find_entry",
           "satisfied", "keep_satisfied", "human_bytes", "disk_use", "disk_line", "record_cell", "CheckpointError"]

DIRNAME = "checkpoints"
SKELETON = "model.json"  # how to build the model again, as data
SKELETON_TENSORS = "model.safetensors"  # the centering baseline's weights, tensors among the constructor's arguments
LEGACY_SKELETON = "model.pkl"  # modelscape 0.3's pickle: never loaded
FORMAT = 2  # of the metadata written into each file (1: 0.3, with a pickled model)
_SHARED_STORE_FILES = ("results.db",)  # db.DB_NAME: its shards (shard-*.db) share its folder too
_MAX_SKELETON = 64 * 2**20  # bytes of model.json read at most
# Modules whose names a record may make this process import (their top-level package): nothing else is imported
# on a record's word, unless the caller's process imported its package already.
_TRUSTED_PACKAGES = ("torch", "modelscape", "math", "numpy")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded: a file missing or outside its store, a model class not importable here,
    checkpoints written by an older modelscape. The message says what to do."""


# --------------------------------------------------------------------------------------------------------
# What a config asks for
# --------------------------------------------------------------------------------------------------------

def plan(cfg: dict) -> tuple[list[int], bool, bool]:
    """``(steps, thresholds, final)`` that a config's CHECKPOINTS asks for (steps sorted, without repeats)."""
    items = cfg.get("CHECKPOINTS") or []
    steps = sorted({int(i) for i in items if not isinstance(i, str)})
    return steps, "thresholds" in items, "final" in items


def dirname(store_file: str | None) -> str:
    """The checkpoint folder of a store file, beside it: ``checkpoints`` for ``results.db`` and its shard files
    (one store, read as their union), ``<file>-checkpoints`` for any other file."""
    if not store_file or store_file in _SHARED_STORE_FILES or (store_file.startswith("shard-")
                                                               and store_file.endswith(".db")):
        return DIRNAME
    return f"{store_file}-checkpoints"


def job_dir(cfg: dict) -> Path:
    """Where a job's checkpoints go: ``RESULTS_DIR/EXPT_NAME/<dirname(STORE_FILE)>/<JOB_ID>``; EXPT_NAME and
    JOB_ID must be plain names (ConfigError), so this never leaves the experiment's folder."""
    check_path_name("EXPT_NAME", cfg["EXPT_NAME"])
    check_path_name("JOB_ID", cfg["JOB_ID"])
    check_path_name("STORE_FILE", cfg.get("STORE_FILE") or DIRNAME)
    return Path(cfg["RESULTS_DIR"]) / cfg["EXPT_NAME"] / dirname(cfg.get("STORE_FILE")) / cfg["JOB_ID"]


def needs_store_error(what: str) -> ConfigError:
    """The error of CHECKPOINTS asked where there is no store to file them beside (``what``: why not)."""
    return ConfigError(f"CHECKPOINTS is set but {what}: checkpoints are filed beside a results store, by job. "
                       "Run the sweep with a store (RESULTS_DIR/EXPT_NAME, or main(store=PATH)), or drop CHECKPOINTS")


def check_sweep(configs, has_store: bool) -> None:
    """Before any job of a sweep runs: a sweep without a store cannot keep checkpoints (ConfigError)."""
    if not has_store and any(cfg.get("CHECKPOINTS") for cfg in configs):
        raise needs_store_error("the sweep keeps no store (store=False)")



def flatten_model(state: dict) -> tuple[dict, dict]:
    """A model's state dict -> ``(tensors, meta)`` for safetensors: CPU, contiguous, and a tensor that several
    names share (tied weights) stored once, the other names kept in ``meta['aliases']``."""
    tensors, aliases, seen = {}, {}, {}
    for name, t in state.items():
        key = (t.device, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = t.detach().to("cpu").contiguous()
    return tensors, {"aliases": aliases}


def flatten_tree(tree) -> tuple[dict, dict]:
    """An optimizer's state dict -> ``(tensors, meta)``: each tensor under a key ``t<k>``; ``meta['tree']`` the
    structure (dicts with their key types, lists, tuples, numbers, strings) pointing at those keys."""
    tensors = {}

    def enc(obj):
        if isinstance(obj, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = obj.detach().to("cpu").contiguous()
            return {"tensor": key}
        if isinstance(obj, dict):
            return {"dict": [[enc(k), enc(v)] for k, v in obj.items()]}
        if isinstance(obj, (list, tuple)):
            return {"list" if isinstance(obj, list) else "tuple": [enc(v) for v in obj]}
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return {"value": obj}
        raise TypeError(f"cannot save optimizer state entry {obj!r} ({type(obj).__name__})")

    return tensors, {"tree": enc(tree)}


def unflatten_tree(tensors: dict, meta: dict):
    """Inverse of ``flatten_tree``."""

    def dec(node):
        (kind, v), = node.items()
        if kind == "tensor":
            return tensors[v]
        if kind == "dict":
            return {dec(k): dec(x) for k, x in v}
        if kind in ("list", "tuple"):
            items = [dec(x) for x in v]
            return items if kind == "list" else tuple(items)
        return v

    return dec(meta["tree"])


def encode_value(obj, tensors: dict, where: str):
    """A constructor argument or optimizer setting as JSON: numbers, strings, None, lists, tuples, dicts with
    string keys, torch dtypes and devices, classes and functions (by ``module:qualname``), and tensors or
    arrays (put into ``tensors``, the JSON naming them). TypeError naming ``where`` for anything else."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    if isinstance(obj, np.generic):
        return {"value": obj.item()}
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        key = f"arg{len(tensors)}"
        tensors[key] = torch.as_tensor(obj).detach().to("cpu").contiguous()
        return {"tensor": key}
    if isinstance(obj, torch.dtype):
        return {"dtype": str(obj).removeprefix("torch.")}
    if isinstance(obj, torch.device):
        return {"device": str(obj)}
    if isinstance(obj, (list, tuple)):
        return {"list" if isinstance(obj, list) else "tuple": [encode_value(v, tensors, where) for v in obj]}
    if isinstance(obj, dict) and all(isinstance(k, str) for k in obj):
        return {"dict": [[k, encode_value(v, tensors, f"{where}[{k!r}]")] for k, v in obj.items()]}
    if isinstance(obj, type) or callable(obj) and hasattr(obj, "__qualname__"):
        return {"callable": path_of(obj)}
    raise TypeError(f"{where} is a {type(obj).__name__} ({obj!r:.80}), which a checkpoint cannot describe as data "
                    "(numbers, strings, lists, dicts, tensors, dtypes, classes and functions can be)")


def decode_value(node, tensors: dict, resolve):
    """Inverse of ``encode_value``; ``resolve(path)`` turns a ``module:qualname`` into the class or function."""
    (kind, v), = node.items()
    if kind == "value":
        return v
    if kind == "tensor":
        return tensors[v]
    if kind == "dtype":
        dtype = getattr(torch, str(v), None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{v!r} is not a torch dtype")
        return dtype
    if kind == "device":
        return torch.device(v)
    if kind in ("list", "tuple"):
        items = [decode_value(x, tensors, resolve) for x in v]
        return items if kind == "list" else tuple(items)
    if kind == "dict":
        return {str(k): decode_value(x, tensors, resolve) for k, x in v}
    if kind == "callable":
        return resolve(v)
    raise CheckpointError(f"unknown value kind {kind!r} in a checkpoint's description")


def path_of(obj) -> str:
    """``module:qualname`` of a class or function, as a model description names it: the name under which its
    module holds it (a builtin such as ``torch.sigmoid`` has a qualname its module does not hold)."""
    module = getattr(obj, "__module__", None) or "?"
    found = sys.modules.get(module)
    for name in (obj.__qualname__, getattr(obj, "__name__", "")):
        target = found
        for part in name.split(".") if name and found is not None else ["\0"]:
            target = getattr(target, part, None)
        if target is obj:
            return f"{module}:{name}"
    return f"{module}:{obj.__qualname__}"  # a lambda, a local function: loading it needs model_kwargs


def write_tensors(path: Path, tensors: dict, meta: dict, extra: dict) -> int:
    """Write a safetensors file atomically (temporary name, then rename); returns its size in bytes."""
    data = safetensors_bytes(tensors, metadata={"modelscape": json.dumps({"format": FORMAT, **extra, **meta})})
    atomic_write(path, data)
    return len(data)


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read_tensors(path: Path) -> tuple[dict, dict]:
    """``(tensors, meta)`` of a file written by ``write_tensors`` (tensors on the CPU)."""
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("modelscape", "{}"))
        return {k: f.get_tensor(k) for k in f.keys()}, meta


# --------------------------------------------------------------------------------------------------------
# Reading, in any process
# --------------------------------------------------------------------------------------------------------

def load(record: dict, root, step=None, threshold=None, optimizer: bool = False, device="cpu", model_class=None,
         model_kwargs: dict | None = None, classes: dict | None = None):
    """The model of one checkpoint of a stored job, built as ``prepare_job`` built it and loaded with the saved
    weights; with ``optimizer`` the pair ``(model, optimizer)``, the optimizer holding its saved state.

    ``root`` is the experiment directory (the store's). ``step``: a step number or ``"final"``; or
    ``threshold``: a value of LOSS_CHECKPOINTS (the model at its timekey). Under CENTER the model is the
    ``Centered`` wrapper (what was trained: ``.model`` minus ``.baseline``, the model at init).

    Nothing the store holds is executed: the model is built from its description (``model.json``) by its
    class, which is ``model_class`` if given (a class, or any callable taking the constructor's keyword
    arguments and returning the module), else the class of that name in ``classes`` (``{module.qualname:
    class}``: the sweep's own, when it ran in this process), else imported by name from a package this process
    has imported already (torch and modelscape always). ``model_kwargs`` replace recorded constructor
    arguments (one the description could only name, a function from your own code, say). CheckpointError says
    what is missing.
    """
    entry = find_entry(record, step, threshold)
    if optimizer and not entry.get("optimizer"):
        raise ValueError(f"job {_axes(record)}: the checkpoint at {entry['label']} holds no optimizer state (the "
                         "sweep ran without CHECKPOINT_OPTIMIZER)")
    weights = _confined(root, entry["file"], record)
    folder = weights.parent
    desc, arg_tensors = _read_skeleton(folder, record)
    resolver = _Resolver(record, model_class, classes)
    net, model = _rebuild(desc, arg_tensors, resolver, dict(model_kwargs or {}), record)
    tensors, meta = read_tensors(_existing(weights, record))
    for name, target in meta.get("aliases", {}).items():
        tensors[name] = tensors[target]
    _fill(model, tensors, weights)
    net.to(device)
    if not optimizer:
        return net
    opt = _build_optimizer(desc["optimizer"], model, arg_tensors, resolver, record)
    opt.load_state_dict(unflatten_tree(*read_tensors(_existing(_confined(root, entry["optimizer"], record), record))))
    return net, opt


def _confined(root, rel, record) -> Path:
    """``root/rel`` for a file a record names, refused unless it stays inside the store's directory."""
    base = Path(root).resolve()
    bad = not isinstance(rel, str) or not rel or "\x00" in rel or os.path.isabs(rel) or ".." in Path(rel).parts
    path = None if bad else (base / rel).resolve()
    if bad or (path != base and base not in path.parents):
        raise CheckpointError(f"job {_axes(record)}: its record names the checkpoint file {rel!r}, which is not "
                              f"inside the store's directory {base}; refusing to read it")
    return path


def _read_skeleton(folder: Path, record) -> tuple[dict, dict]:
    path = folder / SKELETON
    if not path.exists():
        if (folder / LEGACY_SKELETON).exists():
            raise CheckpointError(
                f"job {_axes(record)}: its checkpoints in {folder} were written by modelscape 0.3, which kept the "
                f"model as a pickle ({LEGACY_SKELETON}); unpickling runs code that whoever wrote the file chose, "
                "so it is not loaded. Write them again: re-run the sweep with the same CHECKPOINTS (each job "
                f"lacking a {SKELETON} trains again, to the same numbers with DETERMINISTIC)")
        _existing(path, record)
    if path.stat().st_size > _MAX_SKELETON:
        raise CheckpointError(f"{path} is larger than a model's description can be ({path.stat().st_size} bytes)")
    try:
        desc = json.loads(path.read_text())
        if not isinstance(desc, dict) or desc.get("format") != FORMAT or "model" not in desc:
            raise ValueError(f"not a format-{FORMAT} model description")
    except ValueError as e:
        raise CheckpointError(f"{path} is not a model description ({e})") from None
    extra = folder / SKELETON_TENSORS
    tensors = read_tensors(extra)[0] if extra.exists() else {}
    return desc, tensors


class _Resolver:
    """``module:qualname`` -> a class or function, without importing anything the caller did not choose."""

    def __init__(self, record, model_class, classes):
        self.record, self.model_class = record, model_class
        self.classes = dict(classes or {})
        self.code = record.get("code") or {}

    def __call__(self, path: str, kind: str = "argument"):
        module, _, qual = str(path).partition(":")
        name = f"{module}.{qual}"
        if name in self.classes:
            return self.classes[name]
        hint = ("pass it: res.checkpoint(..., model_class=YourClass)" if kind == "model" else
                "pass it: res.checkpoint(..., model_kwargs={name: value})" if kind == "argument" else
                f"import {module} first")
        if module.startswith(USER_MODULE_PREFIX) and module not in sys.modules:  # loaded here: the sweep's process
            raise CheckpointError(f"job {_axes(self.record)}: its {kind} {qual} came from a file (MODEL_FILE "
                                  f"{(self.record.get('config') or {}).get('MODEL_FILE')!r}); a store does not make "
                                  f"this process run a file it names: {hint}")
        if "<locals>" in qual or not qual:
            raise CheckpointError(f"job {_axes(self.record)}: its {kind} {name} was defined inside a function and "
                                  f"cannot be found by name: {hint}")
        top = module.split(".")[0]
        if module not in sys.modules and top not in sys.modules and top not in _TRUSTED_PACKAGES:
            raise CheckpointError(f"job {_axes(self.record)}: its {kind} {name} lives in {module}, which this "
                                  f"process has not imported; a store does not make it import modules: {hint}, or "
                                  f"import {top} first")
        try:
            obj = importlib.import_module(module) if module != "__main__" else sys.modules["__main__"]
            for part in qual.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError, KeyError) as e:
            where = "a script or notebook (__main__)" if module == "__main__" else module
            raise CheckpointError(f"job {_axes(self.record)}: its {kind} {name} (defined in {where}) is not found "
                                  f"here ({type(e).__name__}: {e}): {hint}") from None
        self._check(obj, name, kind)
        return obj

    def _check(self, obj, name, kind):
        base = {"model": torch.nn.Module, "optimizer": torch.optim.Optimizer}.get(kind)
        if base is not None and not (isinstance(obj, type) and issubclass(obj, base)):
            raise CheckpointError(f"job {_axes(self.record)}: its {kind} {name} is not a {base.__qualname__} "
                                  "subclass; refusing to call it")
        if base is None and not (isinstance(obj, type) and issubclass(obj, torch.nn.Module)) and \
                getattr(obj, "__module__", "").split(".")[0] not in _TRUSTED_PACKAGES:
            raise CheckpointError(f"job {_axes(self.record)}: the constructor argument {name} is a function of your "
                                  "own code; a store does not choose which of your functions run: pass it, "
                                  "res.checkpoint(..., model_kwargs={...})")
        trained = self.code.get(name)
        if trained and trained != "name-only" and (code_fingerprint(obj) or "")[:12] != trained:
            warnings.warn(f"job {_axes(self.record)}: the code of {name} here differs from the code that trained "
                          "it; the checkpoint's weights are loaded into this version", stacklevel=4)


def _rebuild(desc: dict, tensors: dict, resolve, kwargs: dict, record):
    """``(net, model)`` built from a model description: the class called with its recorded arguments (under a
    forked RNG: loading draws nothing from the caller's), its modules' muP multipliers and GAMMA put back, and
    under CENTER the ``Centered`` wrapper whose baseline holds the saved weights at init."""
    spec = desc["model"]
    cls = resolve.model_class or resolve(spec["class"], "model")
    args = {k: v for k, v in decode_value(spec["kwargs"], tensors, resolve).items() if k not in kwargs}
    with torch.random.fork_rng(devices=[]):
        try:
            model = cls(**args, **kwargs)
        except Exception as e:
            raise CheckpointError(f"job {_axes(record)}: building its model {spec['class']} with the arguments "
                                  f"{sorted({**args, **kwargs})} failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, torch.nn.Module):
        raise CheckpointError(f"job {_axes(record)}: model_class returned a {type(model).__name__}, not a module")
    for path, attrs in spec.get("modules", {}).items():
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            raise CheckpointError(f"job {_axes(record)}: the model built here has no module {path!r}, which the "
                                  f"trained one had: is {type(model).__qualname__} the class that trained it?") from None
        for k, v in attrs.items():
            if k == "hook":
                if v and scale_output not in mod._forward_hooks.values():
                    mod.register_forward_hook(scale_output)
            else:
                setattr(mod, k, v)
    saved = spec.get("modules", {})
    unscaled = [path for path, mod in model.named_modules()
                if hasattr(mod, "attn_scale") and "attn_scale" not in saved.get(path, {})]
    if unscaled:  # written before checkpoints kept it: the constructor's 1/sqrt(d_head), not muP's 1/d_head
        warnings.warn(f"job {_axes(record)}: its checkpoint does not record the attention scale of {unscaled}, so "
                      "they keep their constructor's (1/sqrt(d_head)); under muP the job trained with another "
                      "(1/d_head). Checkpoints written since modelscape records it load exactly: train the job again "
                      "with CHECKPOINTS to write one", stacklevel=3)
    if not desc.get("centered"):
        return model, model
    net = Centered(model)
    baseline = {k[len("baseline."):]: t for k, t in tensors.items() if k.startswith("baseline.")}
    _fill(net.baseline, baseline, "the centering baseline")
    for p in net.baseline.parameters():
        p.requires_grad_(False)
    return net, model


def _build_optimizer(spec: dict, model, tensors: dict, resolve, record):
    """The job's optimizer over ``model``'s parameters: its class, its settings, its parameter groups by
    parameter name (``load_state_dict`` then puts the saved state and group settings in)."""
    if not spec:
        raise CheckpointError(f"job {_axes(record)}: its checkpoints describe no optimizer")
    cls = resolve(spec["class"], "optimizer")
    params = dict(model.named_parameters())
    groups = []
    for group in spec["groups"]:
        missing = [n for n in group["params"] if n not in params]
        if missing:
            raise CheckpointError(f"job {_axes(record)}: the optimizer's parameters {missing} are not in the model")
        groups.append({**decode_value(group["settings"], tensors, resolve), "params": [params[n] for n in group["params"]]})
    defaults = decode_value(spec["defaults"], tensors, resolve)
    named = signature_names(cls)
    return cls(groups, **{k: v for k, v in defaults.items() if k in named and k != "params"})


def _fill(model, tensors: dict, path) -> None:
    """Put saved tensors into ``model``'s tensors in place (their saved dtype kept), so that an optimizer's
    references to its parameters stay valid."""
    targets = model.state_dict(keep_vars=True)
    missing, unexpected = sorted(set(targets) - set(tensors)), sorted(set(tensors) - set(targets))
    if missing or unexpected:
        raise CheckpointError(f"{path} does not fit the job's model: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, t in targets.items():
            t.data = tensors[name].to(t.device)


def _existing(path: Path, record) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"job {_axes(record)}: checkpoint file {path} is missing (deleted or moved?); "
                                "re-run the sweep with the same CHECKPOINTS to write it again")
    return path


def _axes(record) -> str:
    return ", ".join(f"{k}={v}" for k, v in (record.get("axes") or {}).items()) or record.get("job_id", "?")


def describe(entries) -> str:
    """The checkpoints of a job, for error messages: ``step 0, step 500, threshold 0.1 (step 212), final (step
    734)``."""
    out = []
    for e in entries:
        out.append(e["label"] if e["label"].startswith("step ") else f"{e['label']} (step {e['step']})")
    return ", ".join(out) or "none"


def find_entry(record: dict, step=None, threshold=None) -> dict:
    """The entry of ``record['checkpoints']`` at ``step`` (a number or ``"final"``) or at ``threshold``; a
    ValueError listing the job's checkpoints when there is none."""
    if (step is None) == (threshold is None):
        raise TypeError("give exactly one of step= (a step number or 'final') and threshold=")
    if record.get("status") in ("failed", "crashed", "timeout"):
        raise ValueError(f"job {_axes(record)} {record['status']}: it has no checkpoints")
    entries = record.get("checkpoints")
    if not entries:
        raise ValueError(f"job {_axes(record)} has no checkpoints: it ran without CHECKPOINTS (a stored job "
                         "lacking requested checkpoints is trained again: re-run the sweep with CHECKPOINTS set)")
    if threshold is not None:
        hits = [e for e in entries if e.get("threshold") is not None and np.isclose(e["threshold"], threshold)]
        what = f"threshold {threshold:g}"
    elif isinstance(step, str):
        if step != "final":
            raise ValueError(f"step={step!r}: give a step number or 'final'")
        hits = [e for e in entries if e["label"] == "final"]
        what = "the final step"
    else:
        hits = [e for e in entries if e["step"] == int(step)]
        what = f"step {int(step)}"
    if not hits:
        raise ValueError(f"job {_axes(record)} has no checkpoint at {what} (it ran {record.get('steps')} steps); "
                         f"its checkpoints: {describe(entries)}")
    return hits[0]


def satisfied(record: dict, cfg: dict, root) -> bool:
    """Whether a stored job has every checkpoint ``cfg`` asks for, with its files on disk (a resumed sweep
    trains it again otherwise: checkpoints are not part of a job's identity)."""
    steps, thresholds, final = plan(cfg)
    if not (steps or thresholds or final) or record.get("status") in ("failed", "crashed", "timeout"):
        return True
    entries = record.get("checkpoints") or []
    have = {e["step"] for e in entries}
    labels = {e["label"] for e in entries}
    ran = int(record.get("steps") or 0)
    if any(s <= ran and s not in have for s in steps) or (final and "final" not in labels):
        return False
    if thresholds:
        reached = int(np.sum(~np.isnan(np.asarray(record.get("timekeys"), dtype=float))))
        if sum(e.get("threshold") is not None for e in entries) < reached:
            return False
    if cfg.get("CHECKPOINT_OPTIMIZER") and not all(e.get("optimizer") for e in entries):
        return False
    files = [e["file"] for e in entries] + [e["optimizer"] for e in entries if e.get("optimizer")]
    files += [str(Path(e["file"]).parent / SKELETON) for e in entries[:1]]  # 0.3's model.pkl does not count
    try:
        return all(_confined(root, f, record).exists() for f in files)
    except CheckpointError:  # a record naming files outside its store: its checkpoints are written again
        return False


def keep_satisfied(records: dict, jobs, ids, root) -> dict:
    """``records`` ({job id: stored record}) without the jobs whose requested checkpoints are missing."""
    cfg_of = {job_id: cfg for job_id, (_, _, cfg) in zip(ids, jobs)}
    return {j: r for j, r in records.items() if j not in cfg_of or satisfied(r, cfg_of[j], root)}


# --------------------------------------------------------------------------------------------------------
# Disk use, for `modelscape show` and the end of a sweep
# --------------------------------------------------------------------------------------------------------

def human_bytes(n: float) -> str:
    """``12.3 MB``: decimal units, as ``du --si``."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def disk_use(root, store_file: str | None = None) -> tuple[int, int]:
    """``(files, bytes)`` in the checkpoint folder of the store file ``store_file`` (default ``results.db``) in
    ``root`` (0, 0 when there is none)."""
    files = size = 0
    for dirpath, _, names in os.walk(Path(root) / dirname(store_file)):
        for name in names:
            try:
                size += os.path.getsize(os.path.join(dirpath, name))
                files += 1
            except OSError:  # a temporary file renamed meanwhile
                pass
    return files, size


def disk_line(root, store_file: str | None = None) -> str | None:
    """``checkpoints: 48 files, 12.3 MB in results/expt/checkpoints``, or None when there are none."""
    files, size = disk_use(root, store_file)
    if not files:
        return None
    return f"checkpoints: {files} files, {human_bytes(size)} in {Path(root) / dirname(store_file)}"


def record_cell(record) -> str:
    """A job's checkpoints in one cell: ``3: 0, 500, final (1.2 MB)`` (the size of their files), or ``-``."""
    entries = (record or {}).get("checkpoints") or []
    if not entries:
        return "-"
    size = sum({e["file"]: e["bytes"] for e in entries}.values())
    steps = ", ".join("final" if e["label"] == "final" else f"t{e['threshold']:g}" if e.get("threshold")
                      is not None else str(e["step"]) for e in entries)
    return f"{len(entries)}: {steps} ({human_bytes(size)})"

