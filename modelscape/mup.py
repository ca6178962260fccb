"""Parameterizations (sp, ntp, mup, mfp, ntp-lr, mup-lr), GAMMA richness and the coordinate check.

The semantics are those of D. Karkada's ``mupify`` (not on the package registry, so written here from its
math). A layer computes ``mult * (W x + b)``; ``parameterize`` sets, per layer, the output multiplier
``mult``, the init std of ``W`` and ``b``, and the learning-rate factor of its optimizer parameter group.
Layers are the modules holding weights (``nn.Linear``, ``nn.Conv1d/2d/3d``) in module order: the first is the
read-in, the last the read-out, the others hidden. The model width ``n`` is the largest out-dim of every layer
but the read-out, and a layer's fan-in is ``prod(weight.shape[1:])``. With ``a = sqrt(n)`` for mup, mfp,
mup-lr and ``a = 1`` for ntp, ntp-lr, and ``q = a**2 / fan_in`` (read-in, hidden) or ``q = 1 / fan_in``
(read-out):

==============  ============  ==============  ==============
param           multiplier    init std        SGD lr factor
==============  ============  ==============  ==============
mup-lr, ntp-lr  1             sqrt(q) / a     q
mup             sqrt(q)       1 / a           1
mfp, ntp        sqrt(q) / a   1               a**2
==============  ============  ==============  ==============

Within a family the three choices are the same network: the effective weight ``mult * W`` starts with std
``sqrt(q) / a`` and SGD moves it with learning rate ``lr * q`` (``lr_factor * mult**2 = q``). ntp and mup
differ only at the read-out, whose effective init is ``1/sqrt(n)`` times smaller under mup. Adaptive
optimizers (Adam and friends) get their own learning-rate factors; see ``layer_scales``. Every ``nn.ReLU``
gets the multiplier sqrt(2) (``relu_gain``), and attention modules with ``attn_mult`` and ``d_head``
(``modelscape.models.SelfAttention``) get muP's ``1/d_head`` attention scale under the mup family.

Multipliers live in module attributes read by one module-level forward hook, so a deepcopy or a pickled copy
of the model (``Centered``'s frozen baseline, worker processes) carries them and uses its own weights.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from modelscape.backend.trainloop import match_shapes
from modelscape.config import PARAMETERIZATIONS

__all__ = ["gamma_lr", "rescale", "mupify", "parameterize", "anatomy", "Anatomy", "Layer", "layer_scales", "update_rule_of",
           "coord_check", "plot_coord_check"]

MUP_FAMILY = ("mup", "mfp", "mup-lr")  # a = sqrt(width); ntp and ntp-lr have a = 1
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Optimizers whose step is (roughly) the gradient normalised entry by entry, so a step's size is set by the
# learning rate alone and not by the gradient's scale.
ADAPTIVE_OPTIMIZERS = tuple(getattr(torch.optim, name) for name in
                            ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad", "RMSprop")
                            if hasattr(torch.optim, name))
UPDATE_RULES = ("sgd", "adam")
ROLES = ("readin", "hidden", "readout")


# --------------------------------------------------------------------------------------------------------
# GAMMA richness
# --------------------------------------------------------------------------------------------------------

def gamma_lr(lr: float, gamma: float) -> float:
    """The seed's GAMMA rule for the learning rate: lr * gamma (gamma >= 1), lr * gamma**2 (gamma < 1)."""
    return lr * gamma if gamma >= 1 else lr * gamma ** 2


def _scale_output(module, inputs, output):
    # Module-level and reading the module it is called with: copies and unpickled models use their own state.
    scale = module._mup_mult / module._mup_gamma
    if scale == 1:
        return None
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"cannot scale the output of {type(module).__name__}: it returned "
                        f"{type(output).__name__}, not a tensor")
    return output * scale


def _ensure_hook(module: nn.Module) -> None:
    if not hasattr(module, "_mup_mult"):
        module._mup_mult = 1.0
    if not hasattr(module, "_mup_gamma"):
        module._mup_gamma = 1.0
    if _scale_output not in module._forward_hooks.values():
        module.register_forward_hook(_scale_output)


def rescale(model: nn.Module, gamma: float) -> None:
    """Divide the model's outputs by ``gamma`` (GAMMA richness: ``gamma > 1`` is richer, ``< 1`` lazier).

    As in ``mupify`` the division happens at the read-out layer, on top of its multiplier (read-out output *
    multiplier / gamma); a model whose layers cannot be classified has its final output divided instead.
    Calling it again replaces gamma rather than compounding it, and ``rescale(model, 1)`` undoes it. Pair it
    with ``gamma_lr`` for the learning rate.
    """
    gamma = float(gamma)
    if not math.isfinite(gamma) or gamma <= 0:
        raise ValueError(f"gamma must be a positive finite number, got {gamma}")
    try:
        target = anatomy(model).layers[-1].module
    except ValueError:
        target = model
    if gamma == 1 and not hasattr(target, "_mup_gamma"):
        return
    _ensure_hook(target)
    target._mup_gamma = gamma


def mupify(model: nn.Module, optimizer: torch.optim.Optimizer, param: str, verbose: bool = False) -> None:
    """mupify's entry point: re-initialise ``model`` and re-group ``optimizer`` in place under ``param``.

    ``param`` is one of ntp, mup, mfp, ntp-lr, mup-lr (``parameterize``'s rules: per-layer multipliers and
    init, ReLU gain sqrt(2), per-layer learning rates). The optimizer's parameter groups are replaced by one
    group per layer with learning rate ``base_lr * lr_factor``, ``base_lr`` being the learning rate it was
    built with (remembered, so calling mupify again does not compound it); its other settings (momentum,
    weight decay, betas ...) carry over. Optimizers that are neither SGD nor Adam-like get SGD's rules, as
    in mupify. Returns None, like mupify; pair it with ``rescale(model, gamma)``.
    """
    if param not in PARAMETERIZATIONS or param == "sp":
        raise ValueError(f"mupify takes one of {[p for p in PARAMETERIZATIONS if p != 'sp']}, got {param!r}")
    if not hasattr(optimizer, "_mupify_base"):
        if len(optimizer.param_groups) != 1:
            raise ValueError(f"mupify needs an optimizer with one parameter group (as built from "
                             f"model.parameters()), got {len(optimizer.param_groups)}")
        optimizer._mupify_base = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    base = optimizer._mupify_base
    try:
        rule = update_rule_of(type(optimizer))
    except ValueError:
        rule = "sgd"
    groups = parameterize(model, param, lambda groups, lr: groups, base["lr"], update_rule=rule)
    optimizer.param_groups = []
    for group in groups:
        optimizer.add_param_group({**base, **group})
    if verbose:
        print(anatomy(model))


# --------------------------------------------------------------------------------------------------------
# Anatomy: which layers are read-in, hidden, read-out, and the model width
# --------------------------------------------------------------------------------------------------------

@dataclass
class Layer:
    """One weight layer as ``parameterize`` sees it."""
    path: str
    module: nn.Module
    role: str
    fan_in: int
    fan_out: int


@dataclass
class Anatomy:
    """The weight layers of a model in module order, and its width (largest fan-out but the read-out's)."""
    layers: list = field(default_factory=list)
    width: int = 0

    def __str__(self):
        rows = [f"  {layer.role:8s} {layer.path or '<model>'}: {type(layer.module).__name__} "
                f"fan_in={layer.fan_in} fan_out={layer.fan_out}" for layer in self.layers]
        return "\n".join([f"model width {self.width}; layers:"] + rows)


def _weight_layers(model: nn.Module) -> list:
    """(path, module) of every Linear/Conv layer, in module order, without judging the rest of the model."""
    return [(path, mod) for path, mod in model.named_modules() if isinstance(mod, WEIGHT_LAYERS)]


def anatomy(model: nn.Module) -> Anatomy:
    """Classify the weight layers of ``model`` (first = read-in, last = read-out, others hidden).

    Raises ``ValueError`` naming the module for a module with weights it cannot classify (LayerNorm,
    Embedding, nn.MultiheadAttention, ...), for weights shared between layers, and for a model with fewer
    than two weight layers.
    """
    found = []
    seen = {}
    for path, mod in model.named_modules():
        where = f"{path or '<model>'!r} ({type(mod).__name__})"
        own = dict(mod.named_parameters(recurse=False))
        if isinstance(mod, WEIGHT_LAYERS):
            w = mod.weight
            if isinstance(w, nn.parameter.UninitializedParameter):
                raise ValueError(f"module {where} is a lazy layer whose weight is not materialised yet; run one "
                                 "forward pass before parameterize")
            if id(w) in seen:
                raise ValueError(f"module {where} shares its weight with {seen[id(w)]!r}; tied weights have no "
                                 "single role (read-in/hidden/read-out), so muP cannot parameterize them")
            seen[id(w)] = path
            found.append((path, mod))
        elif "weight" in own or any(p.ndim >= 2 for p in own.values()):
            names = ", ".join(sorted(own))
            raise ValueError(f"module {where} has parameters ({names}) that muP cannot classify: parameterize "
                             "handles nn.Linear and nn.Conv1d/2d/3d only (for attention use "
                             "modelscape.models.SelfAttention, built from Linear layers). Use "
                             "PARAMETERIZATION='sp' for this model, or remove the module.")
    if len(found) < 2:
        names = [p or "<model>" for p, _ in found]
        raise ValueError(f"muP needs at least two weight layers (a read-in and a read-out); this model has "
                         f"{len(found)}: {names}")
    layers = []
    for i, (path, mod) in enumerate(found):
        role = "readin" if i == 0 else "readout" if i == len(found) - 1 else "hidden"
        shape = mod.weight.shape
        layers.append(Layer(path, mod, role, int(np.prod(shape[1:])), int(shape[0])))
    return Anatomy(layers, max(layer.fan_out for layer in layers[:-1]))


# --------------------------------------------------------------------------------------------------------
# The rules
# --------------------------------------------------------------------------------------------------------

def update_rule_of(optimizer) -> str:
    """``'sgd'`` for torch.optim.SGD and subclasses, ``'adam'`` for adaptive optimizers (Adam, AdamW, Adamax,
    NAdam, RAdam, Adagrad, RMSprop and subclasses); ``ValueError`` for anything else."""
    if not isinstance(optimizer, type):
        raise TypeError(f"optimizer must be an optimizer class such as torch.optim.SGD, got {optimizer!r}")
    if issubclass(optimizer, torch.optim.SGD):
        return "sgd"
    if issubclass(optimizer, ADAPTIVE_OPTIMIZERS):
        return "adam"
    known = ["SGD"] + [o.__name__ for o in ADAPTIVE_OPTIMIZERS]
    raise ValueError(f"no muP learning-rate rule for optimizer {optimizer.__module__}.{optimizer.__qualname__}: "
                     f"parameterize knows {', '.join(known)} and their subclasses. Pass update_rule='sgd' or "
                     "'adam' if its step behaves like one of them, or use PARAMETERIZATION='sp'.")


def layer_scales(param: str, role: str, fan_in: int, width: int, update_rule: str = "sgd"):
    """``(multiplier, lr_factor, init_std)`` of one layer under ``param`` (not ``sp``).

    SGD follows the table in the module docstring. For adaptive optimizers the learning-rate factor is
    derived so that every parameterization of a family trains the same network, with muP's Adam scaling:

    Adam's step is the gradient normalised entry by entry, so the effective weight ``mult * W`` moves by about
    ``lr * lr_factor * mult`` per entry whatever the gradient's scale, and its step is aligned with the layer's
    input ``x`` (Theta(1) entries). A layer's output therefore moves by ``lr * lr_factor * mult * fan_in``.
    - mup family: every layer's output must move by Theta(lr) (feature learning), so
      ``lr_factor * mult = 1 / fan_in``: 1/width for hidden layers and the read-out, width-independent
      1/d_in for the read-in. This is the muP table for Adam (Tensor Programs V, Table 3; Microsoft's
      ``MuAdam``) expressed on the effective weights.
    - ntp family (kernel regime): the output still moves by Theta(lr) but features only by lr/sqrt(width),
      so ``lr_factor * mult = 1 / (fan_in * sqrt(width))`` for read-in and hidden layers and ``1 / fan_in``
      for the read-out.
    Both are ``q * delta``: the SGD effective rate ``q`` times the typical size of the gradient entry that
    Adam's normalisation removes (``1 / (a * sqrt(width))`` behind the read-out, 1 at it). The raw factor is
    that product divided by the multiplier, so e.g. under ``mup`` the read-in's raw factor
    ``1/sqrt(width * d_in)`` offsets its sqrt(width / d_in) multiplier.

    In these units a layer's output moves by about ``lr`` per Adam step, so useful Adam learning rates under
    the mup family are larger than under sp (0.03 to 1 rather than 1e-3). Two caveats shared with
    Microsoft's ``mup``: a tiny multiplier (mfp, ntp) shrinks the raw gradients towards Adam's ``eps``, and
    decoupled weight decay (AdamW) is scaled by each group's learning rate.
    """
    if param not in PARAMETERIZATIONS or param == "sp":
        raise ValueError(f"layer_scales takes one of {[p for p in PARAMETERIZATIONS if p != 'sp']}, got {param!r}")
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if update_rule not in UPDATE_RULES:
        raise ValueError(f"update_rule must be one of {UPDATE_RULES}, got {update_rule!r}")
    a2 = float(width) if param in MUP_FAMILY else 1.0
    a = math.sqrt(a2)
    q = a2 / fan_in if role != "readout" else 1.0 / fan_in
    if param in ("mup-lr", "ntp-lr"):
        mult, lr_factor, std = 1.0, q, math.sqrt(q) / a
    elif param == "mup":
        mult, lr_factor, std = math.sqrt(q), 1.0, 1.0 / a
    else:  # mfp, ntp
        mult, lr_factor, std = math.sqrt(q) / a, a2, 1.0
    if update_rule == "adam":
        effective = q if role == "readout" else q / (a * math.sqrt(width))
        lr_factor = effective / mult
    return mult, lr_factor, std


def parameterize(model: nn.Module, param: str, optimizer, lr: float, relu_gain: bool = True,
                 update_rule: str | None = None, **opt_kwargs) -> torch.optim.Optimizer:
    """Re-initialise ``model`` in place under ``param`` and return ``optimizer(...)`` with per-layer LRs.

    ``param``: one of sp, ntp, mup, mfp, ntp-lr, mup-lr (see the module docstring). ``sp`` leaves the model
    alone and returns ``optimizer(model.parameters(), lr=lr, **opt_kwargs)``. Otherwise each weight layer gets
    its multiplier (a forward hook), a fresh normal init of weight and bias, and its own parameter group with
    learning rate ``lr * lr_factor`` (named by the layer's path); parameters outside weight layers keep
    ``lr``. ``opt_kwargs`` (momentum, weight_decay, betas, ...) apply to every group. ReLU modules get the
    multiplier sqrt(2) when ``relu_gain``. ``optimizer`` is a class; its learning-rate rule (SGD or adaptive)
    is read from it, or given by ``update_rule`` ('sgd' or 'adam') for an optimizer parameterize does not know.
    Initialisation draws from torch's global RNG, so seed it first for reproducible weights.
    """
    if param not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {param!r}; choose one of {list(PARAMETERIZATIONS)}")
    if "lr" in opt_kwargs:
        raise ValueError("give the learning rate as parameterize's lr argument, not in the optimizer kwargs")
    if param == "sp":
        if not callable(optimizer):
            raise TypeError(f"optimizer must be an optimizer class such as torch.optim.SGD, got {optimizer!r}")
        return optimizer(model.parameters(), lr=lr, **opt_kwargs)
    if update_rule is None:
        update_rule = update_rule_of(optimizer)
    elif update_rule not in UPDATE_RULES:
        raise ValueError(f"update_rule must be one of {UPDATE_RULES} or None, got {update_rule!r}")
    anat = anatomy(model)
    groups, in_layers = [], set()
    for layer in anat.layers:
        mult, lr_factor, std = layer_scales(param, layer.role, layer.fan_in, anat.width, update_rule)
        params = list(layer.module.parameters(recurse=False))
        with torch.no_grad():
            for p in params:  # weight and bias
                p.normal_(0.0, std)
        _ensure_hook(layer.module)
        layer.module._mup_mult = float(mult)
        groups.append({"params": params, "lr": lr * lr_factor, "name": layer.path})
        in_layers.update(id(p) for p in params)
    rest = [p for p in model.parameters() if id(p) not in in_layers]
    if rest:
        groups.append({"params": rest, "lr": lr, "name": "other"})
    for mod in model.modules():
        if isinstance(mod, nn.ReLU):
            _ensure_hook(mod)
            mod._mup_mult = math.sqrt(2.0) if relu_gain else 1.0
        if hasattr(mod, "attn_mult") and hasattr(mod, "d_head"):
            # q.k of trained, correlated q and k grows like d_head, not sqrt(d_head): muP divides by d_head.
            mod.attn_mult = 1.0 / mod.d_head if param in MUP_FAMILY else 1.0 / math.sqrt(mod.d_head)
    return optimizer(groups, lr=lr, **opt_kwargs)


# --------------------------------------------------------------------------------------------------------
# Coordinate check
# --------------------------------------------------------------------------------------------------------

def _recorder(store: dict, path: str):
    # A closure is fine here: these hooks live only for the duration of coord_check and are never copied.
    def hook(module, inputs, output):
        store.setdefault(path, []).append(output.detach().float().flatten())
    return hook


def _record(model: nn.Module, names: list, X) -> tuple:
    layers = dict(_weight_layers(model))
    store: dict = {}
    handles = [layers[p].register_forward_hook(_recorder(store, p)) for p in names]
    try:
        out = model(X)
    finally:
        for h in handles:
            h.remove()
    return out, store


def coord_check(model_fn: Callable[[int], nn.Module], widths: Sequence[int], batch_fn: Callable, steps: int = 5,
                param: str = "mup", optimizer=torch.optim.SGD, lr: float | None = None,
                loss_fn: Callable | None = None, seed: int = 0, measure: str = "rms", relu_gain: bool = True,
                device=None, **opt_kwargs):
    """Train ``model_fn(width)`` for ``steps`` steps at each width and record the size of every layer's output.

    Each model is built after ``torch.manual_seed(seed)``, parameterized with ``param`` and ``optimizer`` (lr
    defaults to 0.1 for SGD, 0.01 otherwise; ``opt_kwargs`` go to the optimizer) and trained on
    ``batch_fn(0..steps-1)`` with ``loss_fn`` (MSE by default). The batches are drawn once, so every width
    sees the same data. Step ``s`` is the forward pass on ``batch_fn(s)`` after ``s`` updates, ``s`` in
    ``0..steps``; for each Linear/Conv layer it records, over batch and features, ``measure``:
    ``'rms'``, the RMS of the layer's output (multiplier included), or ``'delta'``, the RMS of its change
    from the initial model on the same batch (zero at step 0; more sensitive, since init dominates 'rms').

    Returns an ``xarray.DataArray`` named ``measure`` with dims ``(width, step, layer)`` (layer = module path)
    and attrs param, optimizer, lr, measure. Under muP the curves are flat in width; under sp they grow.
    """
    import xarray as xr

    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if measure not in ("rms", "delta"):
        raise ValueError(f"measure must be 'rms' or 'delta', got {measure!r}")
    widths = [int(w) for w in widths]
    if lr is None:
        lr = 0.1 if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.SGD) else 0.01
    loss_fn = nn.MSELoss() if loss_fn is None else loss_fn
    batches = [batch_fn(s) for s in range(steps + 1)]
    if device is not None:
        batches = [tuple(t.to(device) for t in b) for b in batches]
    names, values = None, []
    for width in widths:
        torch.manual_seed(seed)
        model = model_fn(width)
        if device is not None:
            model = model.to(device)
        opt = parameterize(model, param, optimizer, lr, relu_gain=relu_gain, **opt_kwargs)
        paths = [p for p, _ in _weight_layers(model)]
        if names is None:
            names = paths
        elif paths != names:
            raise ValueError(f"model_fn({width}) has layers {paths}, but model_fn({widths[0]}) had {names}; "
                             "a coordinate check compares the same layers across widths")
        initial = copy.deepcopy(model) if measure == "delta" else None
        model.train()
        rows = []
        for s, (X, y) in enumerate(batches):
            out, now = _record(model, names, X)
            if initial is not None:
                with torch.no_grad():
                    _, then = _record(initial, names, X)
            row = []
            for p in names:
                h = torch.cat(now[p]) if p in now else torch.full((1,), float("nan"))
                if initial is not None and p in then:
                    h = h - torch.cat(then[p])
                row.append(h.pow(2).mean().sqrt())
            rows.append(torch.stack(row))
            if s == steps:
                break
            loss = loss_fn(match_shapes(out, y), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        values.append(torch.stack(rows).cpu().numpy())
    opt_name = getattr(optimizer, "__name__", str(optimizer))
    return xr.DataArray(np.stack(values).astype(np.float64), dims=("width", "step", "layer"),
                        coords={"width": widths, "step": np.arange(steps + 1), "layer": list(names)},
                        name=measure, attrs={"param": param, "optimizer": opt_name, "lr": float(lr),
                                             "measure": measure})


def plot_coord_check(da, path=None, title: str | None = None, max_cols: int = 6):
    """The coordinate-check figure: one panel per step, RMS of each layer's output vs width, log-log.

    ``da`` is ``coord_check``'s DataArray. Returns a ``matplotlib.figure.Figure`` (made without pyplot, so it
    neither needs a display nor changes the session's backend) and saves it to ``path`` (PNG, PDF, ...) if
    given.
    """
    from matplotlib.figure import Figure

    delta = da.attrs.get("measure") == "delta"
    ylabel = "RMS of change in layer output" if delta else "RMS of layer output"
    # A change from init is zero at step 0, which a log axis cannot show.
    steps = [s for s in da["step"].values if not (delta and s == 0)]
    if not steps:
        raise ValueError("nothing to plot: the coordinate check has no step with a nonzero measure")
    widths = np.asarray(da["width"].values)
    ncols = min(len(steps), max_cols)
    nrows = -(-len(steps) // ncols)
    fig = Figure(figsize=(2.8 * ncols + 1.6, 2.6 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    for ax, step in zip(axes, steps):
        for layer in da["layer"].values:
            ax.plot(widths, da.sel(step=step, layer=layer).values, marker="o", ms=3, label=str(layer))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"step {step}")
        ax.grid(True, which="major", alpha=0.3)
    for ax in axes[len(steps):]:
        ax.set_visible(False)
    for ax in axes[max(0, len(steps) - ncols):len(steps)]:  # the lowest panel of each column
        ax.set_xlabel("width")
    for ax in axes[::ncols]:
        ax.set_ylabel(ylabel)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", title="layer", fontsize="small")
    if title is None:
        attrs = da.attrs
        title = "coordinate check"
        if "param" in attrs:
            title += f": {attrs['param']}, {attrs.get('optimizer', '?')}, lr={attrs.get('lr', '?')}"
    fig.suptitle(title)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
