"""Names to objects: the model class, the batch function, the optimizer and the loss a config names, and the
original's ``post_init_fn`` call.

A config names these by string (``MODEL="GPT"``, ``OPTIMIZER="adam"``, ``LOSS="mse"``), by file
(``MODEL_FILE`` + ``MODEL_NAME``, ``bfn_file`` + ``bfn_name``) or gives the object itself. The driver resolves
them once before a sweep runs (``resolve_names``: a bad name is a ConfigError naming the key and the choices);
the job resolves them again to build what it trains.
"""
from __future__ import annotations

import inspect
import warnings

import torch
from torch import nn

from modelscape.config import BY_NAME, SILENT_ALIASES, ConfigError, canonicalize, signature_names
from modelscape.model import MLP
from modelscape.models import BUILTIN_MODELS
from modelscape.mup.optim import Lion
from modelscape.utils import load_from_file

__all__ = ["BFN_KEYS", "get_base_bfn", "get_model_class", "resolve_optimizer", "resolve_loss_class", "resolve_loss",
           "ctor_kwargs", "optimizer_names", "resolve_names", "consumers", "call_post_init"]

BFN_KEYS = ("base_bfn", "bfn_file", "bfn_name")
_LOSSES = {"mse": nn.MSELoss, "cross_entropy": nn.CrossEntropyLoss, "ce": nn.CrossEntropyLoss,
           "crossentropy": nn.CrossEntropyLoss}


def get_base_bfn(bfn_config: dict):
    """The base batch function: ``bfn_config['base_bfn']``, or ``bfn_name`` loaded from ``bfn_file``."""
    if bfn_config.get("base_bfn") is not None:
        return bfn_config["base_bfn"]
    if "bfn_file" in bfn_config and "bfn_name" in bfn_config:
        return load_from_file(bfn_config["bfn_file"], bfn_config["bfn_name"])
    raise ValueError("bfn_config names no batch function: give 'base_bfn' (a function) or 'bfn_file' and "
                     f"'bfn_name'; its keys are {sorted(bfn_config)}")


def get_model_class(cfg: dict, mlp=MLP):
    """MODEL as a class, a built-in name (MLP, CNN, Transformer, GPT), or MODEL_FILE + MODEL_NAME. ``mlp`` is
    the class ``"MLP"`` names (the original's MLP; its run_job reads it from its module at call time)."""
    if cfg.get("MODEL_FILE"):
        if not cfg.get("MODEL_NAME"):
            raise ValueError(f"MODEL_FILE={cfg['MODEL_FILE']!r} is set but MODEL_NAME is not")
        return load_from_file(cfg["MODEL_FILE"], cfg["MODEL_NAME"])
    model = cfg["MODEL"]
    if model == "MLP":
        return mlp
    if isinstance(model, str):
        try:
            return BUILTIN_MODELS[model]
        except KeyError:
            raise ValueError(f"MODEL={model!r} is not a built-in model ({sorted(BUILTIN_MODELS)}); pass the "
                             "class itself, or MODEL_FILE and MODEL_NAME") from None
    if not callable(model):
        raise TypeError(f"MODEL must be a class or a name, got {model!r}")
    return model


def resolve_optimizer(spec):
    """'SGD', 'adam', 'AdamW' ... (any torch.optim name, any case), 'Lion' (``modelscape.mup.Lion``; torch has
    none) or an optimizer class -> class."""
    if not isinstance(spec, str):
        return spec
    for name in dir(torch.optim):
        if name.lower() == spec.lower() and isinstance(getattr(torch.optim, name), type):
            return getattr(torch.optim, name)
    if spec.lower() == "lion":
        return Lion
    raise ValueError(f"OPTIMIZER={spec!r} is not in torch.optim (nor Lion); pass the class itself for another "
                     "optimizer")


def resolve_loss_class(spec):
    """'mse', 'cross_entropy', any torch.nn loss name (``'CrossEntropyLoss'``), a loss class, or a callable
    ``loss(out, y)`` -> that class or callable."""
    if isinstance(spec, str):
        cls = _LOSSES.get(spec.lower()) or getattr(nn, spec, None)
        if cls is None:
            raise ValueError(f"LOSS={spec!r} is unknown; use mse, cross_entropy, a torch.nn loss name, or a "
                             "callable")
        return cls
    return spec


def ctor_kwargs(cls, cfg: dict, skip=()) -> dict:
    """The config keys that ``cls``'s constructor names (as the original forwarded ``nesterov``,
    ``label_smoothing``, ``betas`` ...), but the ones in ``skip``."""
    if not isinstance(cls, type):
        return {}
    return {k: cfg[k] for k in signature_names(cls) - set(skip) if k in cfg}


def resolve_loss(spec, cfg: dict | None = None):
    """The loss function for LOSS=``spec``: a class is instantiated with the config keys its constructor
    names; a callable is used as it is."""
    cls = resolve_loss_class(spec)
    return cls(**ctor_kwargs(cls, cfg or {})) if isinstance(cls, type) else cls


def optimizer_names() -> list[str]:
    """The optimizer classes of torch.optim, by name."""
    return sorted([n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type)
                   and issubclass(getattr(torch.optim, n), torch.optim.Optimizer) and n != "Optimizer"] + ["Lion"])


def resolve_names(cfg: dict) -> None:
    """Resolve a job's OPTIMIZER, LOSS and MODEL as the job will; a name that resolves to nothing is a
    ConfigError naming the key, the value and the choices (run before the first job, not in every job)."""
    checks = (("OPTIMIZER", resolve_optimizer, lambda: optimizer_names()),
              ("LOSS", resolve_loss, lambda: sorted(_LOSSES) + ["any torch.nn loss class name"]),
              ("MODEL", get_model_class, lambda: sorted(BUILTIN_MODELS)))
    for key, resolve, choices in checks:
        if key == "MODEL" and cfg.get("MODEL_FILE"):
            continue  # loaded from the user's file by the job (and already by the driver, for its signature)
        value = cfg.get(key)
        try:
            resolve(cfg if key == "MODEL" else value)
        except (ValueError, TypeError, AttributeError) as e:
            raise ConfigError(f"{e} (the names {key} takes: {', '.join(choices())})") from None


def consumers(cfg: dict, bfn_config: dict) -> list:
    """The callables whose signatures decide which non-schema config keys are user data: grabs, step hooks,
    the batch function, the model class, optimizer and loss classes (which take their constructor arguments
    from the config, as in the original) and the post-init hook. ``cfg`` may be raw (aliases, missing keys)."""
    hooks = cfg.get("step_hooks")
    fns = list((cfg.get("otherreturns") or {}).values()) + (list(hooks.values()) if isinstance(hooks, dict) else [])
    try:
        fns.append(get_base_bfn(bfn_config))
    except (ValueError, FileNotFoundError, AttributeError):
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            names = canonicalize({k: v for k, v in cfg.items() if k in BY_NAME or k in SILENT_ALIASES})
        fns.append(get_model_class(names))
        fns += [c for c in (resolve_optimizer(names["OPTIMIZER"]), resolve_loss_class(names["LOSS"]))
                if isinstance(c, type)]
    except Exception:  # a bad name: resolve_names reports it, naming the key
        pass
    hook = cfg.get("post_init_fn", cfg.get("POST_INIT_FN"))
    if hook is not None:
        fns.append(hook)
    return fns


def call_post_init(hook, model, opt, inputs: dict):
    """Call ``hook`` with ``model``, ``opt`` and the ``inputs`` its signature names (all of them if it takes
    ``**kwargs``), as the original did; returns ``(model, opt)``: the hook's pair if it returns one, else the
    ones it changed in place."""
    inputs = {**inputs, "model": model, "opt": opt}
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(hook).parameters.values())
    names = signature_names(hook)
    ret = hook(**(inputs if takes_all else {k: v for k, v in inputs.items() if k in names}))
    if isinstance(ret, tuple) and len(ret) == 2:
        return ret
    return model, opt
