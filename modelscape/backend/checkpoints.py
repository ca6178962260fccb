"""Checkpoints: a job's weights (and, with CHECKPOINT_OPTIMIZER, its optimizer's state) at chosen steps, at each
threshold crossing and at the end, saved beside the store and loaded back as a built model.

Layout, under the experiment directory ``RESULTS_DIR/EXPT_NAME`` (the directory of the store):

- ``checkpoints/<JOB_ID>/step-<n>.safetensors``: the model after ``n`` updates (the user's model: under CENTER,
  the trained function is ``model - baseline``, the baseline being the model at step 0);
- ``checkpoints/<JOB_ID>/step-<n>.opt.safetensors``: the optimizer's ``state_dict`` at the same step, its
  tensors flattened, its structure (param groups, numbers) as JSON in the file's metadata;
- ``checkpoints/<JOB_ID>/model.pkl``: the built model as ``prepare_job`` built it, without its weights
  (cloudpickle): its class, parameterization multipliers, GAMMA scaling, the centering baseline's weights,
  and the optimizer with its parameter groups. Loading a checkpoint fills it with the saved weights.

The job's store record is the index: its ``checkpoints`` list holds one entry per checkpoint (step, label such
as ``step 500`` / ``threshold 0.1`` / ``final``, file, bytes, optimizer file), written by the job's worker
with the rest of its record, so a record from a Slurm shard file indexes its checkpoints the same way.
Every file is written to a temporary name and renamed, so a reader never sees half a file.

This module is the files: what a config asks for, their layout, writing and reading them, loading one back as a
model, and their disk use. The job's side, the observers that write them while it trains, is ``checkpointer``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import cloudpickle
import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from modelscape.config import ConfigError

__all__ = ["DIRNAME", "plan", "job_dir", "check_sweep", "flatten_model", "flatten_tree", "unflatten_tree",
           "write_tensors", "read_tensors", "load", "describe", "find_entry", "satisfied", "keep_satisfied",
           "human_bytes", "disk_use", "disk_line", "record_cell"]

DIRNAME = "checkpoints"
SKELETON = "model.pkl"
FORMAT = 1  # of the metadata written into each file


# --------------------------------------------------------------------------------------------------------
# What a config asks for
# --------------------------------------------------------------------------------------------------------

def plan(cfg: dict) -> tuple[list[int], bool, bool]:
    """``(steps, thresholds, final)`` that a config's CHECKPOINTS asks for (steps sorted, without repeats)."""
    items = cfg.get("CHECKPOINTS") or []
    steps = sorted({int(i) for i in items if not isinstance(i, str)})
    return steps, "thresholds" in items, "final" in items


def job_dir(cfg: dict) -> Path:
    """Where a job's checkpoints go: ``RESULTS_DIR/EXPT_NAME/checkpoints/<JOB_ID>``."""
    return Path(cfg["RESULTS_DIR"]) / cfg["EXPT_NAME"] / DIRNAME / cfg["JOB_ID"]


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

def load(record: dict, root, step=None, threshold=None, optimizer: bool = False, device="cpu"):
    """The model of one checkpoint of a stored job, built as ``prepare_job`` built it and loaded with the saved
    weights; with ``optimizer`` the pair ``(model, optimizer)``, the optimizer holding its saved state.

    ``root`` is the experiment directory (the store's). ``step``: a step number or ``"final"``; or
    ``threshold``: a value of LOSS_CHECKPOINTS (the model at its timekey). Under CENTER the model is the
    ``Centered`` wrapper (what was trained: ``.model`` minus ``.baseline``, the model at init).
    """
    entry = find_entry(record, step, threshold)
    if optimizer and not entry.get("optimizer"):
        raise ValueError(f"job {_axes(record)}: the checkpoint at {entry['label']} holds no optimizer state (the "
                         "sweep ran without CHECKPOINT_OPTIMIZER)")
    root = Path(root)
    skeleton_path = root / Path(entry["file"]).parent / SKELETON
    net, opt, centered = _rebuild(skeleton_path, record)
    model = net.model if centered else net
    tensors, meta = read_tensors(_existing(root / entry["file"], record))
    for name, target in meta.get("aliases", {}).items():
        tensors[name] = tensors[target]
    _fill(model, tensors, root / entry["file"])
    net.to(device)
    if not optimizer:
        return net
    opt.load_state_dict(unflatten_tree(*read_tensors(_existing(root / entry["optimizer"], record))))
    return net, opt


def _rebuild(path: Path, record):
    try:
        with open(_existing(path, record), "rb") as f:
            blob = cloudpickle.load(f)
    except (ImportError, AttributeError) as e:
        raise RuntimeError(f"cannot rebuild the model of job {_axes(record)} from {path}: {type(e).__name__}: {e}. "
                           "The model's class (or a function it uses) is pickled by reference to its module "
                           "(classes defined in a notebook or in __main__ are pickled whole); make that module "
                           "importable here") from e
    return blob["net"], blob["opt"], blob["centered"]


def _fill(model, tensors: dict, path: Path) -> None:
    """Put saved tensors into the (emptied) tensors of ``model`` in place, so the optimizer's references to its
    parameters stay valid."""
    targets = model.state_dict(keep_vars=True)
    missing, unexpected = sorted(set(targets) - set(tensors)), sorted(set(tensors) - set(targets))
    if missing or unexpected:
        raise RuntimeError(f"{path} does not fit the job's model: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, t in targets.items():
            t.data = tensors[name].to(t.dtype)


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
    root = Path(root)
    files = [e["file"] for e in entries] + [e["optimizer"] for e in entries if e.get("optimizer")]
    files += [str(Path(e["file"]).parent / SKELETON) for e in entries[:1]]
    return all((root / f).exists() for f in files)


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


def disk_use(root) -> tuple[int, int]:
    """``(files, bytes)`` under ``root/checkpoints`` (0, 0 when there is none)."""
    files = size = 0
    for dirpath, _, names in os.walk(Path(root) / DIRNAME):
        for name in names:
            try:
                size += os.path.getsize(os.path.join(dirpath, name))
                files += 1
            except OSError:  # a temporary file renamed meanwhile
                pass
    return files, size


def disk_line(root) -> str | None:
    """``checkpoints: 48 files, 12.3 MB in results/expt/checkpoints``, or None when there are none."""
    files, size = disk_use(root)
    if not files:
        return None
    return f"checkpoints: {files} files, {human_bytes(size)} in {Path(root) / DIRNAME}"


def record_cell(record) -> str:
    """A job's checkpoints in one cell: ``3: 0, 500, final (1.2 MB)`` (the size of their files), or ``-``."""
    entries = (record or {}).get("checkpoints") or []
    if not entries:
        return "-"
    size = sum({e["file"]: e["bytes"] for e in entries}.values())
    steps = ", ".join("final" if e["label"] == "final" else f"t{e['threshold']:g}" if e.get("threshold")
                      is not None else str(e["step"]) for e in entries)
    return f"{len(entries)}: {steps} ({human_bytes(size)})"

