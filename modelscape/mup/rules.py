"""The muP rules as numbers: per layer role, its multiplier, init std and learning-rate factor; GAMMA's learning rate.

Pure arithmetic on (parameterization, role, fan-in, width, update rule); the tables and their derivations are in
``modelscape.mup``'s docstring and the README. Two sets of rules:

- absolute (``effective_scales``, ``layer_scales``, ``vector_scale``): mupify's, from the width ``n`` and each
  layer's fan-in, with no reference model; the default (``BASE_WIDTH`` unset).
- relative to a base width (``relative_scales``, ``relative_mult``): what muP changes in the model as built (sp)
  when its width grows by ``m`` from the base width, as Microsoft's ``mup`` does; at ``m = 1`` nothing changes.

``assign`` puts these numbers on a model's anatomy and ``apply`` on the model.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from modelscape.config import PARAMETERIZATIONS

__all__ = ["MUP_FAMILY", "WEIGHT_LAYERS", "EMBEDDINGS", "NORMS", "ADAPTIVE_OPTIMIZERS", "SIGN_OPTIMIZERS",
           "UPDATE_RULES", "ROLES", "KINDS", "gamma_lr", "update_rule_of", "effective_scales", "layer_scales",
           "vector_scale", "relative_scales", "relative_mult", "tied_readout_mult", "attention_scale"]

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
# Optimizers known by class name (not in torch) whose step is the sign of a momentum: every entry moves by
# exactly lr, so they follow Adam's rule (Everett et al. 2024 treat Adam and sign methods alike).
SIGN_OPTIMIZERS = ("Lion",)
UPDATE_RULES = ("sgd", "adam")
ROLES = ("readin", "hidden", "readout")
# What the relative rules tell apart, by which dimensions of a weight grow with width: fan-out only (read-in,
# embeddings and every vector-like parameter), both (hidden), fan-in only (read-out, or a bottleneck in the
# middle), neither (a fixed-size part).
KINDS = ("readin", "hidden", "readout", "fixed")


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
    """The muP learning-rate rule of an optimizer class: ``'sgd'`` for torch.optim.SGD and subclasses;
    ``'adam'`` for the adaptive optimizers (Adam, AdamW, Adamax, NAdam, RAdam, Adagrad, RMSprop and subclasses)
    and for sign-based ones known by class name (``Lion``: modelscape.mup.Lion or anyone's); the class's own
    ``mup_update_rule`` attribute ('sgd' or 'adam') if it declares one. ``ValueError`` naming the class for
    anything else: a wrong rule silently mis-scales every layer, so modelscape never guesses."""
    if not isinstance(optimizer, type):
        raise TypeError(f"optimizer must be an optimizer class such as torch.optim.SGD, got {optimizer!r}")
    declared = getattr(optimizer, "mup_update_rule", None)
    if declared is not None:
        if declared not in UPDATE_RULES:
            raise ValueError(f"{optimizer.__qualname__}.mup_update_rule is {declared!r}; use one of {UPDATE_RULES}")
        return declared
    if issubclass(optimizer, torch.optim.SGD):
        return "sgd"
    if issubclass(optimizer, ADAPTIVE_OPTIMIZERS) or any(c.__name__ in SIGN_OPTIMIZERS for c in optimizer.__mro__):
        return "adam"
    known = ["SGD"] + [o.__name__ for o in ADAPTIVE_OPTIMIZERS] + list(SIGN_OPTIMIZERS)
    raise ValueError(f"no muP learning-rate rule for optimizer {optimizer.__module__}.{optimizer.__qualname__}: "
                     f"modelscape knows {', '.join(known)} and their subclasses. Declare its rule if its step "
                     "behaves like one of them: update_rule='sgd' (the rule mupify applies to every optimizer) or "
                     "'adam' (steps normalised entry by entry, or sign-based) in parameterize / mupify, "
                     "UPDATE_RULE in a config, or a class attribute mup_update_rule; or use "
                     "PARAMETERIZATION='sp'.")


def _check_rule_args(param, role, update_rule, roles=ROLES):
    if param not in PARAMETERIZATIONS or param == "sp":
        raise ValueError(f"param must be one of {[p for p in PARAMETERIZATIONS if p != 'sp']}, got {param!r}")
    if role not in roles:
        raise ValueError(f"role must be one of {roles}, got {role!r}")
    if update_rule not in UPDATE_RULES:
        raise ValueError(f"update_rule must be one of {UPDATE_RULES}, got {update_rule!r}")


# --------------------------------------------------------------------------------------------------------
# absolute rules (no base width): mupify's
# --------------------------------------------------------------------------------------------------------

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

    Embeddings are read-ins with ``fan_in=1``; so are biases and norm parameters (``vector_scale``).
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


def vector_scale(param: str, role: str, width: int, update_rule: str = "sgd", d_in: int = 1) -> float:
    """Effective learning rate of a vector-like parameter (bias, norm gain or bias; ``role`` 'readout' for the
    read-out's bias, else 'readin'), in the absolute rules. A bias is a weight on a constant input coordinate
    (Tensor Programs V, Table 3: biases scale like input weights):

    - Adam and sign-based steps: a read-in of fan-in 1 (read-out of fan-in 1 at the read-out): rate 1 under the
      mup family, ``1/sqrt(width)`` under ntp, 1 at the read-out. A step then moves what the bias adds to a
      layer's output by about ``lr``, as a weight layer's step moves its output, whatever the width and the
      data's input dimension ``d_in``.
    - SGD: one more input coordinate of the read-in, rate ``a**2 / d_in`` (``1 / d_in`` at the read-out). An
      SGD step on a weight moves its layer's output by ``rate * |x|**2``; with inputs of norm ~1 (modelscape's
      data) the bias, whose input is 1, keeps pace at the read-in's rate. The width scaling is TP5's either way;
      only this constant depends on how the data are normalised (VECTOR_LR_MULT tunes it), and it is
      mupify-era modelscape's, so SGD sweeps keep their numbers.
    """
    _check_rule_args(param, role, update_rule, ("readin", "hidden", "readout"))
    fan_in = d_in if update_rule == "sgd" else 1
    return effective_scales(param, "readout" if role == "readout" else "readin", fan_in, width, update_rule)[1]


def tied_readout_mult(param: str, width: float) -> float:
    """The read-out multiplier of a read-out that shares its weight with the embedding, which sets that weight's
    init and learning rate as a read-in: ``1/width`` under the mup family, ``1/sqrt(width)`` under ntp (with a
    base width, ``width`` is the ratio to it). Then the read-out's effective init, SGD and Adam rates are the
    untied read-out's (``effective_scales``) scaled alike: (init, Adam) * mult and SGD * mult**2 of the
    embedding's, which is what muP asks of a read-out (TP5; Microsoft's ``MuSharedReadout`` does the same)."""
    return 1.0 / float(width) if param in MUP_FAMILY else 1.0 / math.sqrt(float(width))


def attention_scale(param: str, d_head: int, base_d_head: int | None = None) -> float:
    """The scale of the attention logits ``q.k`` (before the user's ``attn_mult``): ``1/sqrt(d_head)`` under
    sp and the ntp family; under the mup family ``1/d_head`` (trained q and k are correlated, so q.k grows like
    d_head, not sqrt(d_head); TP5), or with a base width ``sqrt(base_d_head)/d_head``: sp's at the base width
    and 1/d_head from there (Microsoft's ``8/d_head`` is this at ``base_d_head = 64``)."""
    if param not in MUP_FAMILY:
        return 1.0 / math.sqrt(d_head)
    if base_d_head is None:
        return 1.0 / d_head
    # written so that at the base width it is sp's 1/sqrt(d_head) to the bit
    return (1.0 / math.sqrt(base_d_head)) * (base_d_head / d_head)


# --------------------------------------------------------------------------------------------------------
# rules relative to a base width: Microsoft's mup (set_base_shapes + MuReadout + MuAdam / MuSGD)
# --------------------------------------------------------------------------------------------------------

def relative_scales(param: str, kind: str, m_in: float, m_out: float, update_rule: str = "sgd"):
    """``(init_factor, lr_factor)`` of an effective parameter relative to the model as built (sp) and the base
    learning rate, when its fan-in grew ``m_in`` and its fan-out ``m_out`` times from the base width.

    mup family (TP5 Table 3 relative to sp at the base; Microsoft's ``mup``):
      read-in / vector-like (fan-out grows): init 1, SGD ``m_out``, Adam 1
      hidden (both grow):                    init 1, SGD ``m_out / m_in``, Adam ``1 / m_in``
      read-out (fan-in grows):               init ``1 / sqrt(m_in)``, SGD and Adam ``1 / m_in``
      fixed:                                 1, 1, 1
    sp's init already scales like ``1/sqrt(fan_in)``, which muP keeps except at the read-out, whose output
    must not grow with width: ``1/fan_in`` there. ntp family (NTK relative to sp at the base): the same
    read-out rates, init 1 everywhere, and behind the read-out rates ``1/m_out`` (SGD) and ``1/sqrt(m_out)``
    (Adam) times muP's: features move ``sqrt(width)`` times slower, the kernel regime.
    """
    _check_rule_args(param, kind, update_rule, KINDS)
    if kind == "fixed":
        return 1.0, 1.0
    sgd = update_rule == "sgd"
    if kind == "readout":
        return (1.0 / math.sqrt(m_in) if param in MUP_FAMILY else 1.0), 1.0 / m_in
    lr = (m_out if sgd else 1.0) / (m_in if kind == "hidden" else 1.0)
    if param not in MUP_FAMILY:
        lr /= m_out if sgd else math.sqrt(m_out)
    return 1.0, lr


def relative_mult(param: str, kind: str, init_factor: float, m_in: float) -> float:
    """Where a parameterization puts the relative rules: the layer multiplier (the init and learning rate then
    take the rest, ``init / mult`` and SGD ``lr / mult**2``, Adam ``lr / mult``, so all choices are one
    network). ``mup``: ``1 / m_in`` at read-out-like layers and 1 elsewhere, Microsoft's ``MuReadout``;
    ``mfp`` and ``ntp``: the init factor, so the raw init stays the model's own at every width; ``mup-lr``,
    ``ntp-lr``: 1, no multipliers. (ntp's init factor is 1, so with a base width ntp and ntp-lr coincide.)"""
    if param in ("mup-lr", "ntp-lr"):
        return 1.0
    if param == "mup":
        return 1.0 / m_in if kind == "readout" else 1.0
    return init_factor
