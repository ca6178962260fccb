"""Small helpers shared by the job, the executors and the store."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys

import numpy as np
import torch

from modelscape.config import ConfigError

__all__ = ["derive_seed", "to_numpy", "ensure_torch", "load_from_file", "resolve_device", "qualname", "as_list",
           "match_shapes", "require", "Labelled", "labels_of", "check_path_name", "check_paths", "PATH_NAME_KEYS"]

# Config keys whose value becomes one component of a path (RESULTS_DIR/EXPT_NAME/..., checkpoints/<JOB_ID>/...)
PATH_NAME_KEYS = ("EXPT_NAME", "JOB_ID")


def derive_seed(*parts) -> int:
    """A 63-bit seed from any printable parts; stable across processes and machines (unlike ``hash``)."""
    h = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def to_numpy(x):
    """Tensor, array, number or nested list -> numpy array (on the CPU, detached)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def ensure_torch(x, device=None, dtype=None):
    """Array-like -> tensor on ``device``; floating numpy arrays become float32 unless ``dtype`` says."""
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
        if dtype is None and x.is_floating_point():
            dtype = torch.float32
    return x.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else x


USER_MODULE_PREFIX = "_modelscape_user_"  # the names of the modules load_from_file makes


def load_from_file(path: str, name: str):
    """Load ``name`` (a function or class) from the Python file at ``path``; errors name both."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"cannot load {name!r}: file {path!r} does not exist")
    mod_name = USER_MODULE_PREFIX + hashlib.sha1(path.encode()).hexdigest()[:12]
    mod = sys.modules.get(mod_name)
    if mod is None:
        spec = importlib.util.spec_from_file_location(mod_name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = mod
        spec.loader.exec_module(mod)
    try:
        return getattr(mod, name)
    except AttributeError:
        raise AttributeError(f"file {path!r} defines no {name!r}") from None


def resolve_device(device) -> torch.device:
    """'cpu', 'cuda', 'cuda:1', an int GPU id or a torch.device -> torch.device."""
    if isinstance(device, torch.device):
        return device
    if isinstance(device, int):
        return torch.device(f"cuda:{device}")
    return torch.device(device or "cpu")


def qualname(obj) -> str | None:
    """``module.qualname`` of a function or class, for job identities and messages."""
    if obj is None:
        return None
    if isinstance(obj, str):
        return obj
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def as_list(v) -> list:
    """A sweepable value as a list of axis values: ``[64, 256]`` stays, ``64`` becomes ``[64]``."""
    return list(v) if isinstance(v, (list, tuple)) else [v]


def match_shapes(out, y):
    """``out`` reshaped to ``y``'s shape for a float target of the same size (MSE on (N,) vs (N, 1)), or
    sequence logits ``(N, T, C)`` with the classes moved to dim 1 for integer targets ``(N, T)``."""
    # MSE against y of shape (N,) or (N, 1): the seed squeezed both; reshaping keeps a batch of one intact.
    if out.shape != y.shape and out.numel() == y.numel() and y.dtype.is_floating_point:
        return out.reshape(y.shape)
    # Sequence logits (N, T, C) against class targets (N, T): cross-entropy wants the classes at dim 1.
    if out.ndim >= 3 and out.shape[:-1] == y.shape and not y.dtype.is_floating_point:
        return out.movedim(-1, 1)
    return out


def require(module: str, extra: str, executor: str | None = None, needed_by: str | None = None):
    """Import the optional package ``module`` (Ray, submitit, tensorboard), or raise ConfigError saying which
    extra of modelscape provides it; the message names what needs it: ``EXECUTOR=executor``, or ``needed_by``
    (e.g. ``"TENSORBOARD=True"``)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        who = needed_by or f"EXECUTOR={executor!r}"
        # modelscape is installed from its folder, not from a package index: its extra is named that way
        raise ConfigError(f"{who} needs the package {module!r}, which is not installed: "
                          f"pip install -e '.[{extra}]' in modelscape's folder") from None


class Labelled:
    """An array whose dimensions have names and whose entries have labels, as a grab may return it.

    ``Labelled(values, dims=("layer", "measure"), coords={"layer": ["fc1", "fc2"], "measure": ["norm"]})``: the
    results keep the names and labels (``res.to_xarray()["grab_<name>"]`` has those dimensions, not
    ``<name>_dim0``). A grab may also return an ``xarray.DataArray``; it is read the same way.
    """

    def __init__(self, values, dims, coords: dict | None = None):
        self.values = to_numpy(values)
        self.dims = tuple(str(d) for d in dims)
        if self.values.ndim != len(self.dims):
            raise ValueError(f"Labelled: {self.values.ndim}-dimensional values but {len(self.dims)} dims {self.dims}")
        coords = {str(d): [_label(v) for v in c] for d, c in dict(coords or {}).items()}
        for d, c in coords.items():
            if d not in self.dims or len(c) != self.values.shape[self.dims.index(d)]:
                raise ValueError(f"Labelled: coordinate {d!r} has {len(c)} labels but the values' dims are "
                                 f"{dict(zip(self.dims, self.values.shape))}")
        # a dimension given no labels is labelled by position
        self.coords = {d: coords.get(d, list(range(n))) for d, n in zip(self.dims, self.values.shape)}

    def __repr__(self):
        return f"Labelled(dims={self.dims}, shape={self.values.shape})"


def _label(v):
    v = v.item() if isinstance(v, np.generic) else v
    return v if isinstance(v, (bool, int, float, str)) else str(v)


def labels_of(v):
    """``(values, {"dims": [...], "coords": {...}})`` of a ``Labelled`` value or an ``xarray.DataArray`` (read
    through its attributes: no xarray import), else ``(v, None)``."""
    if isinstance(v, Labelled):
        return v.values, {"dims": list(v.dims), "coords": v.coords}
    if all(hasattr(v, a) for a in ("dims", "coords", "values")) and not isinstance(v, (np.ndarray, torch.Tensor)):
        lab = Labelled(np.asarray(v.values), v.dims, {d: list(np.asarray(v.coords[d].values)) for d in v.dims
                                                      if d in v.coords})
        return lab.values, {"dims": list(lab.dims), "coords": lab.coords}
    return v, None


def check_path_name(key: str, value, empty_ok: bool = False) -> None:
    """ConfigError unless ``value`` (of config key ``key``) is one plain component of a path: a non-empty
    string with no separator (``/`` or ``\\``, whatever the OS: stores travel), not ``.`` or ``..``, no NUL,
    newline or other control character, at most 255 bytes. So a name cannot write, or delete, outside the
    folder it is joined to."""
    if empty_ok and value == "":
        return
    why = None
    if not isinstance(value, str):
        why = f"it is a {type(value).__name__}, not a string"
    elif value == "":
        why = "it is empty"
    elif value in (".", ".."):
        why = "it names a folder itself, not one inside it"
    elif "/" in value or "\\" in value or (os.altsep and os.altsep in value):
        why = "it holds a path separator"
    elif any(ord(c) < 32 or ord(c) == 127 for c in value):
        why = "it holds a control character (a newline, a NUL ...)"
    elif len(value.encode("utf-8", "surrogatepass")) > 255:
        why = "it is longer than a file name may be (255 bytes)"
    if why:
        raise ConfigError(f"{key}={value!r} cannot be used: {why}. It names one folder (RESULTS_DIR/EXPT_NAME, "
                          f"checkpoints/JOB_ID): use letters, digits, '-', '_' or '.'")


def check_paths(cfg: dict) -> None:
    """The path checks of a resolved config: EXPT_NAME and JOB_ID are plain names (``check_path_name``;
    JOB_ID may be empty: outside a sweep), RESULTS_DIR holds no NUL or newline."""
    check_path_name("EXPT_NAME", cfg.get("EXPT_NAME", "default"))
    check_path_name("JOB_ID", cfg.get("JOB_ID", ""), empty_ok=True)
    root = cfg.get("RESULTS_DIR", "")
    if not isinstance(root, (str, os.PathLike)) or any(c in os.fspath(root) for c in "\x00\n\r"):
        raise ConfigError(f"RESULTS_DIR={root!r} cannot be used: it must be a path without NUL or line breaks")
