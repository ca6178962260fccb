"""The original modelscape's ``backend.utils``: tensor/array conversion, config files and seeding, with the
original's signatures and defaults (``ensure_torch`` casts to float32 and picks the accelerator when no
device is given, as there)."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from modelscape.config import load_json


def default_device() -> torch.device:
    """CUDA (the current device) if available, else Apple's MPS if available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def ensure_torch(x, dtype=torch.float32, device=None, clone=False) -> torch.Tensor:
    """``x`` as a tensor of ``dtype`` (float32 by default, labels included) on ``device``: an int is a CUDA
    id, ``None`` is ``default_device()``. A tensor already right is returned as it is unless ``clone``."""
    if device is None:
        device = default_device()
    elif isinstance(device, int):
        device = torch.device(f"cuda:{device}")
    else:
        device = torch.device(device)
    if not isinstance(x, torch.Tensor):
        return torch.as_tensor(np.asarray(x), dtype=dtype, device=device)
    if x.device != device or x.dtype != dtype:
        return x.to(device=device, dtype=dtype)
    return x.clone() if clone else x


def ensure_numpy(x, dtype=np.float64, clone=False) -> np.ndarray:
    """``x`` as a numpy array: a tensor is detached and moved to the CPU keeping its dtype; anything else is
    converted to ``dtype`` (a copy if ``clone`` and ``x`` already was such an array)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    out = np.asarray(x, dtype=dtype)
    return out.copy() if clone and out is x else out


def tuple_to_numpy(x, dtype=np.float64, clone=False):
    """Tensors and array-likes inside tuples, lists, dicts and sets -> numpy arrays, containers kept (a
    namedtuple keeps its type, a set becomes a tuple); strings, scalars and None are left alone, and so is
    anything numpy cannot hold."""
    if x is None or isinstance(x, (str, bytes, bytearray)) or np.isscalar(x):
        return x
    if isinstance(x, dict):
        return {k: tuple_to_numpy(v, dtype, clone) for k, v in x.items()}
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(tuple_to_numpy(v, dtype, clone) for v in x))
    if isinstance(x, (tuple, set)):
        return tuple(tuple_to_numpy(v, dtype, clone) for v in x)
    if isinstance(x, list):
        return [tuple_to_numpy(v, dtype, clone) for v in x]
    try:
        return ensure_numpy(x, dtype=dtype, clone=clone)
    except (TypeError, ValueError):
        return x


def load_config(path):
    """A config dict from a ``.json`` or ``.yaml``/``.yml`` file (YAML needs PyYAML)."""
    ext = os.path.splitext(str(path))[1].lower()
    if ext == ".json":
        return load_json(path)
    if ext in (".yaml", ".yml"):
        import yaml  # optional: PyYAML, only for a .yaml config file
        with open(path) as f:
            return yaml.safe_load(f)
    raise ValueError(f"unsupported config file extension {ext!r} ({path}); use .json, .yaml or .yml")


def derive_seed(master_seed, device_id=0) -> int:
    """A 32-bit seed from ``(master_seed, device_id)``, stable across runs and machines; with
    ``master_seed=None`` a fresh one from the OS each call."""
    if master_seed is None:
        return int.from_bytes(os.urandom(4), "little")
    digest = hashlib.sha256(f"{int(master_seed)}|{int(device_id)}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def seed_everything(seed_int, device_id=0, make_generators=True, deterministic=False):
    """Seed numpy's and torch's global RNGs (CUDA included) with ``seed_int``; ``deterministic`` also makes
    cuDNN deterministic. Returns ``(torch.Generator on cuda:device_id or the CPU, numpy Generator)`` seeded
    alike, or None if not ``make_generators``."""
    seed_int = int(seed_int)
    np.random.seed(seed_int % 2**32)
    torch.manual_seed(seed_int)  # seeds every CUDA device too
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    if not make_generators:
        return None
    device = f"cuda:{device_id}" if torch.cuda.is_available() else "cpu"
    return torch.Generator(device=device).manual_seed(seed_int), np.random.default_rng(seed_int)


__all__ = ["ensure_torch", "ensure_numpy", "tuple_to_numpy", "load_json", "load_config", "derive_seed",
           "seed_everything", "default_device"]
