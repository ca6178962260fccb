"""Putting the rules on a model: ``parameterize`` (init, multipliers, per-parameter learning rates), GAMMA's
``rescale``, and mupify's in-place entry point ``mupify``.

Multipliers live in module attributes read by one module-level forward hook (``scale_output``), so a deepcopy or
a pickled copy of the model (``Centered``'s frozen baseline, worker processes) carries them and uses its own
weights.
"""
from __future__ import annotations

import inspect
import math

import torch
from torch import nn

from modelscape.config import PARAMETERIZATIONS
from modelscape.mup.assign import Knobs, assign
from modelscape.mup.depth import apply_depth
from modelscape.mup.layers import anatomy
from modelscape.mup.rules import UPDATE_RULES, update_rule_of
from modelscape.mup.shapes import base_shapes

__all__ = ["scale_output", "rescale", "mupify", "parameterize"]


def scale_output(module, inputs, output):
    """The forward hook of every module ``parameterize`` or ``rescale`` scales: its output times the module's
    ``_mup_mult / _mup_gamma``."""
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
    if scale_output not in module._forward_hooks.values():
        module.register_forward_hook(scale_output)


def _readout_module(model: nn.Module):
    """The read-out that ``parameterize`` used or the model names, else None."""
    path = getattr(model, "_mup_readout", None)
    if path is not None:
        return model.get_submodule(path)
    named = getattr(model, "output_layer", None)
    return named if isinstance(named, nn.Module) else None


def rescale(model: nn.Module, gamma: float) -> None:
    """Divide the model's outputs by ``gamma`` (GAMMA richness: ``gamma > 1`` is richer, ``< 1`` lazier).

    As in ``mupify`` the division happens at the read-out layer, on top of its multiplier (read-out output *
    multiplier / gamma); a model that names no read-out (``output_layer``) and was not parameterized has its
    final output divided instead. Calling it again replaces gamma rather than compounding it, and
    ``rescale(model, 1)`` undoes it. Pair it with ``gamma_lr`` for the learning rate.
    """
    gamma = float(gamma)
    if not math.isfinite(gamma) or gamma <= 0:
        raise ValueError(f"gamma must be a positive finite number, got {gamma}")
    target = _readout_module(model) or model
    if gamma == 1 and not hasattr(target, "_mup_gamma"):
        return
    _ensure_hook(target)
    target._mup_gamma = gamma


def mupify(model: nn.Module, optimizer: torch.optim.Optimizer, param: str, verbose: bool = False,
           update_rule: str | None = None) -> None:
    """mupify's entry point: re-initialise ``model`` and re-group ``optimizer`` in place under ``param``.

    ``param`` is one of ntp, mup, mfp, ntp-lr, mup-lr (``parameterize``'s absolute rules: per-layer
    multipliers and init, ReLU gain sqrt(2), per-layer learning rates), with mupify's width: the largest
    fan-out but the read-out's (``parameterize`` prefers the model's ``width`` attribute). The optimizer's parameter groups are
    replaced by one group per learning-rate factor with learning rate ``base_lr * lr_factor``, ``base_lr``
    being the learning rate it was built with (remembered, so calling mupify again does not compound it); its
    other settings (momentum, weight decay, betas ...) carry over. The rule comes from the optimizer's class
    (``update_rule_of``); an optimizer with no known rule is an error unless ``update_rule`` declares one
    (``'sgd'`` is what mupify applied to every optimizer). Returns None, like mupify; pair it with
    ``rescale(model, gamma)``.
    """
    if param not in PARAMETERIZATIONS or param == "sp":
        raise ValueError(f"mupify takes one of {[p for p in PARAMETERIZATIONS if p != 'sp']}, got {param!r}")
    if not hasattr(optimizer, "_mupify_base"):
        if len(optimizer.param_groups) != 1:
            raise ValueError(f"mupify needs an optimizer with one parameter group (as built from "
                             f"model.parameters()), got {len(optimizer.param_groups)}")
        optimizer._mupify_base = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    base = optimizer._mupify_base
    rule = update_rule if update_rule is not None else update_rule_of(type(optimizer))
    # mupify's width: the largest fan-out but the read-out's, whatever the model's width attribute says
    anat = anatomy(model)
    width = max(layer.fan_out for layer in anat.layers if layer.path != anat.readout_path)
    groups = parameterize(model, param, lambda groups, lr: groups, base["lr"], update_rule=rule, width=width)
    optimizer.param_groups = []
    for group in groups:
        optimizer.add_param_group({**base, **group})
    if verbose:
        print(anatomy(model))


def _default_eps(optimizer, opt_kwargs):
    if "eps" in opt_kwargs:
        return float(opt_kwargs["eps"])
    try:
        default = inspect.signature(optimizer).parameters["eps"].default
    except (TypeError, ValueError, KeyError):
        default = inspect.Parameter.empty
    if default is inspect.Parameter.empty or not isinstance(default, (int, float)):
        raise ValueError(f"eps_scaling (EPS_SCALING) scales the optimizer's eps, but "
                         f"{getattr(optimizer, '__name__', optimizer)} takes no numeric eps")
    return float(default)


def parameterize(model: nn.Module, param: str, optimizer, lr: float, relu_gain: bool = True,
                 update_rule: str | None = None, input_layer=None, output_layer=None, example_input=None, *,
                 base=None, probe=None, width: int | None = None, output_mult: float = 1.0,
                 emb_mult: float = 1.0, lr_mults: dict | None = None, readout_zero_init: bool = False,
                 query_zero_init: bool = False, eps_scaling: bool = False, gamma: float = 1.0,
                 depth_alpha: float = 0.0, base_depth: int | None = None, **opt_kwargs) -> torch.optim.Optimizer:
    """Parameterize ``model`` in place under ``param`` and return ``optimizer(...)`` with per-parameter LRs.

    ``param``: one of sp, ntp, mup, mfp, ntp-lr, mup-lr (see the module docstring). ``sp`` leaves the model
    alone and returns ``optimizer(model.parameters(), lr=lr, **opt_kwargs)`` (unless a multiplier below is
    set). ``optimizer`` is a class; its learning-rate rule ('sgd' or 'adam') is read from it
    (``update_rule_of``), or declared by ``update_rule``.

    Without ``base`` (the default), the absolute rules (mupify's): each Linear/Conv layer gets its multiplier (a
    forward hook) and a fresh normal init of its weight, biases start at 0, embeddings a fresh init, norm
    layers their default init, ReLUs the multiplier sqrt(2) when ``relu_gain``. With ``base`` (the same model
    at the base width: a module, meta device welcome, a ``{name: shape}`` dict or ``base_shapes(...)``), the
    rules relative to it (muTransfer, as Microsoft's mup): the model's own init, multipliers and learning rate
    are sp's at the base width and scale from there by the rule. ``probe`` (the model at any other width)
    only tells which dimensions grow, for the absolute rules. ``width``: the absolute rules' width (default
    the model's ``width`` attribute). ``input_layer``, ``output_layer`` and ``example_input`` are
    ``anatomy``'s: the read-in / read-out, and a batch whose forward pass checks them.

    Tunable multipliers (``Knobs``; all off by default): ``output_mult``, ``emb_mult`` (forward multipliers
    of the read-out and of the embeddings / input layer), ``lr_mults`` (``{group: factor}``, groups
    'embedding', 'hidden', 'readout', 'vector'), ``readout_zero_init``, ``query_zero_init``. ``eps_scaling``:
    each group's Adam eps is multiplied by how its gradient entries scale with width (relative to the base
    width, else to width 1) and divided by ``gamma`` (the GAMMA the model will be ``rescale``d by, which
    divides every gradient), so eps stays as small next to the gradient as it was.

    Every parameter gets a learning rate ``lr * lr_factor * group multiplier`` (parameters alike share a
    group, named by their paths). ``opt_kwargs`` (momentum, betas, ...) apply to every group, except
    ``weight_decay``, which is divided by each group's factor so that ``lr x weight_decay`` is the same for
    every parameter and width. Initialisation draws from torch's global RNG, so seed it first.
    """
    if param not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {param!r}; choose one of {list(PARAMETERIZATIONS)}")
    if "lr" in opt_kwargs:
        raise ValueError("give the learning rate as parameterize's lr argument, not in the optimizer kwargs")
    if not callable(optimizer):
        raise TypeError(f"optimizer must be an optimizer class such as torch.optim.SGD, got {optimizer!r}")
    knobs = Knobs(output_mult, emb_mult, lr_mults, readout_zero_init, query_zero_init)
    gamma = float(gamma)
    if not math.isfinite(gamma) or gamma <= 0:
        raise ValueError(f"gamma must be a positive finite number, got {gamma}")
    if param == "sp" and knobs.is_default() and not eps_scaling and not depth_alpha:
        return optimizer(model.parameters(), lr=lr, **opt_kwargs)
    if update_rule is not None and update_rule not in UPDATE_RULES:
        raise ValueError(f"update_rule must be one of {UPDATE_RULES} or None, got {update_rule!r}")
    if update_rule is None:
        update_rule = "sgd" if param == "sp" and not isinstance(optimizer, type) else None
    if update_rule is None:
        try:
            update_rule = update_rule_of(optimizer)
        except ValueError:
            if param != "sp":
                raise
            update_rule = "sgd"  # sp has no learning-rate rule: the factors are all 1
    eps = _default_eps(optimizer, opt_kwargs) if eps_scaling else None
    shapes = base_shapes(model, base, probe) if base is not None or probe is not None else None
    anat = anatomy(model, input_layer, output_layer, example_input, shapes, width)
    plan = assign(anat, param, update_rule, knobs, relu_gain)
    if depth_alpha:
        apply_depth(plan, model, depth_alpha, base_depth, update_rule)
    _initialise(plan)
    for path, mult in plan.mults.items():
        mod = model.get_submodule(path)
        _ensure_hook(mod)
        mod._mup_mult = float(mult)
    model._mup_readout = anat.readout_path
    if plan.relu is not None:
        for mod in model.modules():
            if isinstance(mod, nn.ReLU):
                _ensure_hook(mod)
                mod._mup_mult = plan.relu
    for mod, scale in plan.attention:
        mod.attn_scale = scale
    groups = {}
    for rule in plan.rules:
        factor = rule.lr * knobs.lr_mult(rule.group)
        key = (factor, rule.grad if eps_scaling else None)
        group = groups.setdefault(key, {"params": [], "lr": lr * factor, "param_names": []})
        group["params"].append(rule.param)
        group["param_names"].append(rule.name)
    grouped = {id(p) for g in groups.values() for p in g["params"]}
    missing = [n for n, p in model.named_parameters() if id(p) not in grouped]
    if missing:  # the anatomy classifies every parameter; one left out would silently never train
        raise RuntimeError(f"parameterize left parameters {missing} out of the optimizer; please report this")
    for (factor, grad), group in groups.items():
        if opt_kwargs.get("weight_decay") and factor > 0:
            group["weight_decay"] = opt_kwargs["weight_decay"] / factor
        if eps_scaling:
            group["eps"] = eps * grad / gamma
    return optimizer(list(groups.values()), lr=lr, **opt_kwargs)


def _initialise(plan) -> None:
    """Carry out the assignment's inits, in its order (mupify's draw order under the absolute rules)."""
    with torch.no_grad():
        for rule in plan.rules:
            if rule.init is None:
                continue
            kind = rule.init[0]
            if kind == "normal":
                rule.param.normal_(0.0, rule.init[1])
                if rule.padding_idx is not None:
                    rule.param[rule.padding_idx].zero_()
            elif kind == "scale":
                rule.param.mul_(rule.init[1])
            else:
                rule.param.zero_()
        for mod in plan.reset:
            mod.reset_parameters()
