"""Parameterizations (sp, ntp, mup, mfp, ntp-lr, mup-lr), GAMMA richness and the coordinate check.

Placeholder with the interface the job uses; the muP issue fills in every parameterization but ``sp``.
"""
from __future__ import annotations

import torch
from torch import nn

from modelscape.config import PARAMETERIZATIONS


def gamma_lr(lr: float, gamma: float) -> float:
    """The seed's GAMMA rule for the learning rate: lr * gamma (gamma >= 1), lr * gamma**2 (gamma < 1)."""
    return lr * gamma if gamma >= 1 else lr * gamma ** 2


def _divide_output(module, inputs, output):
    return output / module._mup_gamma


def rescale(model: nn.Module, gamma: float) -> None:
    """Divide the model's outputs by ``gamma`` (a picklable forward hook, so deepcopy and pickling work)."""
    if gamma == 1:
        return
    model._mup_gamma = float(gamma)
    if not getattr(model, "_mup_gamma_hooked", False):
        model.register_forward_hook(_divide_output)
        model._mup_gamma_hooked = True


def parameterize(model: nn.Module, param: str, optimizer, lr: float, relu_gain: bool = True,
                 **opt_kwargs) -> torch.optim.Optimizer:
    """Re-initialise ``model`` in place under ``param`` and return ``optimizer`` built with per-layer LRs."""
    if param not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {param!r}; choose one of {list(PARAMETERIZATIONS)}")
    if param != "sp":
        raise NotImplementedError(f"parameterization {param!r} is not implemented yet")
    return optimizer(model.parameters(), lr=lr, **opt_kwargs)
