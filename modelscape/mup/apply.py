"""Putting the rules on a model: ``parameterize`` (init, multipliers, per-parameter learning rates), GAMMA's
``rescale``, and mupify's in-place entry point ``mupify``.

Multipliers live in module attributes read by one module-level forward hook (``scale_output``), so a deepcopy or
a pickled copy of the model (``Centered``'s frozen baseline, worker processes) carries them and uses its own
weights.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from modelscape.config import PARAMETERIZATIONS
from modelscape.mup.layers import anatomy
from modelscape.mup.rules import (EMBEDDINGS, MUP_FAMILY, UPDATE_RULES, effective_scales, layer_scales,
                                  update_rule_of, vector_lr_factor)

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



def parameterize(model: nn.Module, param: str, optimizer, lr: float, relu_gain: bool = True,
                 update_rule: str | None = None, input_layer=None, output_layer=None, example_input=None,
                 **opt_kwargs) -> torch.optim.Optimizer:
    """Re-initialise ``model`` in place under ``param`` and return ``optimizer(...)`` with per-parameter LRs.

    ``param``: one of sp, ntp, mup, mfp, ntp-lr, mup-lr (see the module docstring). ``sp`` leaves the model
    alone and returns ``optimizer(model.parameters(), lr=lr, **opt_kwargs)``. Otherwise each Linear/Conv layer
    gets its multiplier (a forward hook) and a fresh normal init of its weight (biases start at 0), embeddings
    a fresh N(0, 1) init, norm layers their default init (gain 1, bias 0), and every parameter a learning rate
    ``lr * lr_factor`` (parameters with the same factor share a group, named by their paths); parameters
    outside these layers keep ``lr``. ``opt_kwargs`` (momentum, betas, ...) apply to every group, except
    ``weight_decay``, which is divided by each group's factor so that ``lr x weight_decay`` is the same for
    every parameter and width. ReLU modules get the multiplier sqrt(2) when ``relu_gain``. ``optimizer`` is a
    class; its learning-rate rule (SGD or adaptive) is read from it, or given by ``update_rule`` ('sgd' or
    'adam') for an optimizer parameterize does not know. ``input_layer``, ``output_layer`` and
    ``example_input`` are ``anatomy``'s: the read-in / read-out, and a batch whose forward pass checks them.
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
    anat = anatomy(model, input_layer, output_layer, example_input)
    width = anat.width
    readin_fan_in = next(layer.fan_in for layer in anat.layers if layer.path == anat.readin_path)
    factors = []  # (parameter, its path, lr factor)
    with torch.no_grad():
        for layer in anat.layers:
            mod = layer.module
            if isinstance(mod, EMBEDDINGS):
                std, lr_factor = effective_scales(param, "readin", 1, width, update_rule)
                mod.weight.normal_(0.0, std)
                if mod.padding_idx is not None:
                    mod.weight[mod.padding_idx].zero_()
                factors.append((mod.weight, f"{layer.path}.weight", lr_factor))
                continue
            mult, lr_factor, std = layer_scales(param, layer.role, layer.fan_in, width, update_rule)
            mod.weight.normal_(0.0, std)
            factors.append((mod.weight, f"{layer.path}.weight", lr_factor))
            if mod.bias is not None:
                mod.bias.zero_()
                factors.append((mod.bias, f"{layer.path}.bias",
                                vector_lr_factor(param, layer.role, width, update_rule, readin_fan_in, mult)))
            _ensure_hook(mod)
            mod._mup_mult = float(mult)
        norm_factor = vector_lr_factor(param, "hidden", width, update_rule, readin_fan_in)
        for path, mod in anat.norms:
            mod.reset_parameters()
            factors.extend((p, f"{path}.{name}", norm_factor) for name, p in mod.named_parameters(recurse=False))
    model._mup_readout = anat.readout.path
    covered = {id(p) for p, _, _ in factors}
    factors.extend((p, name, 1.0) for name, p in model.named_parameters() if id(p) not in covered)
    groups = {}
    for p, name, f in factors:
        group = groups.setdefault(f, {"params": [], "lr": lr * f, "param_names": []})
        group["params"].append(p)
        group["param_names"].append(name)
    if opt_kwargs.get("weight_decay"):
        for f, group in groups.items():
            group["weight_decay"] = opt_kwargs["weight_decay"] / f
    for mod in model.modules():
        if isinstance(mod, nn.ReLU):
            _ensure_hook(mod)
            mod._mup_mult = math.sqrt(2.0) if relu_gain else 1.0
        if hasattr(mod, "attn_mult") and hasattr(mod, "d_head"):
            # q.k of trained, correlated q and k grows like d_head, not sqrt(d_head): muP divides by d_head.
            mod.attn_mult = 1.0 / mod.d_head if param in MUP_FAMILY else 1.0 / math.sqrt(mod.d_head)
    return optimizer(list(groups.values()), lr=lr, **opt_kwargs)

