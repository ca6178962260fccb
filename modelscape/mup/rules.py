"""The muP rules as numbers: per layer role, its multiplier, init std and learning-rate factor; GAMMA's learning rate.

Pure arithmetic on (parameterization, role, fan-in, width, update rule); the table and its derivation are in
``modelscape.mup``'s docstring. ``apply`` puts these numbers on a model.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from modelscape.config import PARAMETERIZATIONS

__all__ = ["MUP_FAMILY", "WEIGHT_LAYERS", "EMBEDDINGS", "NORMS", "ADAPTIVE_OPTIMIZERS", "UPDATE_RULES", "ROLES",
           "gamma_lr", "update_rule_of", "effective_scales", "layer_scales", "vector_lr_factor"]

MUP_FAMILY = ("mup", "mfp", "mup-lr")  # a = sqrt(width); ntp and ntp-lr have a = 1
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Layers whose weight is read by a one-hot input: a read-in with fan-in 1 whatever the vocabulary size.
EMBEDDINGS = (nn.Embedding,)
# Normalisation layers: their gain and bias are vector-like, multiplying / shifting width-sized activations.
NORMS = tuple(getattr(nn, name) for name in ("LayerNorm", "RMSNorm", "GroupNorm") if hasattr(nn, name))
# Optimizers whose step is (roughly) the gradient normalised entry by entry, so a step's size is set by the
# learning rate alone and not by the gradient's scale.
ADAPTIVE_OPTIMIZERS = tuple(getattr(torch.optim, name) for name in
                            ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Adagrad", "RMSprop")
                            if hasattr(torch.optim, name))
UPDATE_RULES = ("sgd", "adam")
ROLES = ("readin", "hidden", "readout")

def gamma_lr(lr: float, gamma: float, update_rule="sgd") -> float:
    """The learning rate that goes with GAMMA under ``update_rule`` ('sgd', 'adam', or an optimizer class).

    The seed's rule, under SGD: lr * gamma (gamma >= 1), lr * gamma**2 (gamma < 1). With the output divided by
    gamma, one SGD step then changes the output by ``1 / gamma`` (gamma >= 1) or 1 (gamma < 1) times what it
    does at gamma 1, and the features by 1 (gamma >= 1) or ``gamma`` (gamma < 1): richer or lazier at a fixed
    output speed. Adam's step does not depend on the gradient's scale, so the ``1/gamma`` the output
    multiplier puts on every gradient does not slow it down as it slows SGD: the same two ratios need a
    learning rate ``gamma`` times smaller, lr * 1 (gamma >= 1), lr * gamma (gamma < 1). The README derives both.
    """
    gamma = float(gamma)
    if gamma == 1:
        return lr
    if not math.isfinite(gamma) or gamma <= 0:
        raise ValueError(f"gamma must be a positive finite number, got {gamma}")
    if isinstance(update_rule, type):
        update_rule = update_rule_of(update_rule)
    if update_rule not in UPDATE_RULES:
        raise ValueError(f"update_rule must be one of {UPDATE_RULES} or an optimizer class, got {update_rule!r}")
    sgd_factor = gamma if gamma >= 1 else gamma ** 2
    return lr * (sgd_factor if update_rule == "sgd" else sgd_factor / gamma)


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


def _check_rule_args(param, role, update_rule):
    if param not in PARAMETERIZATIONS or param == "sp":
        raise ValueError(f"param must be one of {[p for p in PARAMETERIZATIONS if p != 'sp']}, got {param!r}")
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if update_rule not in UPDATE_RULES:
        raise ValueError(f"update_rule must be one of {UPDATE_RULES}, got {update_rule!r}")


def effective_scales(param: str, role: str, fan_in: int, width: int, update_rule: str = "sgd"):
    """``(init_std, lr)`` of the effective weight ``mult * W`` of one layer under ``param`` (not ``sp``).

    ``init_std = sqrt(q) / a``; under SGD ``lr = q`` (the effective weight moves by ``lr * q * gradient``).
    Adam's step is the gradient normalised entry by entry, so the effective weight moves by ``lr`` times the
    effective rate per entry whatever the gradient's scale, along the layer's input ``x`` (Theta(1) entries):
    the layer's output moves by ``lr * rate * fan_in``.
    - mup family: every layer's output must move by Theta(lr) (feature learning), so ``rate = 1 / fan_in``:
      1/width for hidden layers and the read-out, width-independent 1/d_in for the read-in. This is the muP
      table for Adam (Tensor Programs V, Table 3; Microsoft's ``MuAdam``).
    - ntp family (kernel regime): the output still moves by Theta(lr) but features only by lr/sqrt(width), so
      ``rate = 1 / (fan_in * sqrt(width))`` for read-in and hidden layers and ``1 / fan_in`` for the read-out.
    Both are ``q * delta``: the SGD rate times the typical size of the gradient entry that Adam's
    normalisation removes (``1 / (a * sqrt(width))`` behind the read-out, 1 at it). In these units a layer's
    output moves by about ``lr`` per Adam step, so useful Adam learning rates under the mup family are larger
    than under sp (0.03 to 1 rather than 1e-3).

    Embeddings are read-ins with ``fan_in=1``; biases and norm parameters take the read-in's fan-in (they
    learn like one read-in weight; see the module docstring).
    """
    _check_rule_args(param, role, update_rule)
    a2 = float(width) if param in MUP_FAMILY else 1.0
    a = math.sqrt(a2)
    q = a2 / fan_in if role != "readout" else 1.0 / fan_in
    std = math.sqrt(q) / a
    if update_rule == "sgd":
        return std, q
    return std, (q if role == "readout" else q / (a * math.sqrt(width)))


def layer_scales(param: str, role: str, fan_in: int, width: int, update_rule: str = "sgd"):
    """``(multiplier, lr_factor, init_std)`` of one layer's weight under ``param`` (not ``sp``).

    The multiplier is the parameterization's choice (module docstring); init std and lr factor follow from
    ``effective_scales`` divided by it (``mult`` for init and Adam, ``mult**2`` for SGD), which makes the three
    parameterizations of a family one network under every optimizer.
    """
    _check_rule_args(param, role, update_rule)
    a = math.sqrt(float(width)) if param in MUP_FAMILY else 1.0
    q = a * a / fan_in if role != "readout" else 1.0 / fan_in
    mult = {"mup-lr": 1.0, "ntp-lr": 1.0, "mup": math.sqrt(q)}.get(param, math.sqrt(q) / a)
    std, lr = effective_scales(param, role, fan_in, width, update_rule)
    return mult, lr / (mult ** 2 if update_rule == "sgd" else mult), std / mult


def vector_lr_factor(param, role, width, update_rule, readin_fan_in, mult=1.0):
    """Learning-rate factor of a vector-like parameter seen through ``mult``: it learns like one weight of the
    read-in (a bias is a weight on a constant input coordinate), so its effective rate is the read-in's."""
    _, lr = effective_scales(param, role, readin_fan_in, width, update_rule)
    return lr / (mult ** 2 if update_rule == "sgd" else mult)

