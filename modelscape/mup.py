"""Parameterizations (sp, ntp, mup, mfp, ntp-lr, mup-lr), GAMMA richness and the coordinate check.

The semantics for weight layers are those of D. Karkada's ``mupify`` (not on the package registry, so written
here from its math). A weight layer computes ``mult * (W x + b)``; ``parameterize`` sets, per layer, the
output multiplier ``mult``, the init std of ``W`` and the learning-rate factor of its optimizer parameter
group. Weight layers are ``nn.Linear``, ``nn.Conv1d/2d/3d`` and ``nn.Embedding``. The read-in and the read-out
are the modules the model names (``input_layer`` / ``output_layer`` attributes, or ``parameterize``'s
arguments), checked by a forward pass: they must be the first and the last weight layer the data goes
through. The other Linear/Conv layers are hidden. The model width ``n`` is the largest out-dim of every layer
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
optimizers (Adam and friends) get their own learning-rate factors; see ``effective_scales``.

Vector-like parameters (one dimension that grows with width: biases, LayerNorm / RMSNorm / GroupNorm gains
and biases, Embedding tables) follow Tensor Programs V (Table 3), which treats them like input weights. A bias
is a weight on a constant input coordinate, so it learns like one weight of the read-in: effective SGD rate
``a**2 / d_in`` (``d_in`` the read-in's fan-in; at the read-out ``1 / d_in``), growing like the width under
muP, and the read-in's width-independent effective Adam rate; its effective init is width-independent (biases
0, norm gains 1). An embedding is a read-in whose one-hot input has fan-in 1 (init std 1); when it is the
model's read-in, as in a GPT, d_in is 1. Their updates, and what those updates do to the activations, then do
not change with width, and at width ``d_in`` they learn as they did before this rule. A bias shares its
layer's multiplier (init and lr factor are divided by it); norms and embeddings have none. Every ``nn.ReLU``
gets the multiplier sqrt(2) (``relu_gain``), and attention modules with ``attn_mult`` and ``d_head``
(``modelscape.models.SelfAttention``) get muP's ``1/d_head`` attention scale under the mup family.

Weight decay is divided by each group's learning-rate factor, so that ``lr x weight_decay``, the decay per
step, is the same for every parameter at every width and in every parameterization of a family (as
Microsoft's ``mup`` does in ``MuSGD`` / ``MuAdam``). GAMMA's learning-rate rule depends on the update rule
(``gamma_lr``).

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

__all__ = ["gamma_lr", "rescale", "mupify", "parameterize", "anatomy", "Anatomy", "Layer", "layer_scales",
           "effective_scales", "update_rule_of", "coord_check", "plot_coord_check"]

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


# --------------------------------------------------------------------------------------------------------
# GAMMA richness
# --------------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------------
# Anatomy: which layers are read-in, hidden, read-out, and the model width
# --------------------------------------------------------------------------------------------------------

@dataclass
class Layer:
    """One weight layer as ``parameterize`` sees it (an embedding is a read-in with fan-in 1)."""
    path: str
    module: nn.Module
    role: str
    fan_in: int
    fan_out: int


@dataclass
class Anatomy:
    """The weight layers of a model in module order, its norm layers, and its width (largest fan-out but the
    read-out's)."""
    layers: list = field(default_factory=list)
    width: int = 0
    norms: list = field(default_factory=list)
    readin_path: str = ""

    def __str__(self):
        rows = [f"  {layer.role:8s} {layer.path or '<model>'}: {type(layer.module).__name__} "
                f"fan_in={layer.fan_in} fan_out={layer.fan_out}" for layer in self.layers]
        rows += [f"  {'norm':8s} {path}: {type(mod).__name__}" for path, mod in self.norms]
        return "\n".join([f"model width {self.width}; layers:"] + rows)

    @property
    def readout(self) -> Layer:
        return next(layer for layer in self.layers if layer.role == "readout")


def _describe(path, mod):
    return f"{path or '<model>'!r} ({type(mod).__name__})"


def _resolve_named(model, spec, attr, found):
    """The path of the module named by ``spec`` (a module or a path) or by ``model.<attr>``; None if neither."""
    if spec is None:
        spec = getattr(model, attr, None)
        if not isinstance(spec, nn.Module):
            return None
    paths = {id(mod): path for path, mod in found}
    if isinstance(spec, str):
        if spec not in dict(found):
            raise ValueError(f"{attr}={spec!r} is not a weight layer of the model; its weight layers are "
                             f"{[p for p, _ in found]}")
        return spec
    if id(spec) not in paths:
        raise ValueError(f"the model's {attr} ({type(spec).__name__}) is not one of its weight layers "
                         "(nn.Linear, nn.Conv1d/2d/3d, nn.Embedding); name the layer itself")
    return paths[id(spec)]


def _call_order(model: nn.Module, found: list, example_input) -> list:
    """Paths of the weight layers in the order a forward pass on ``example_input`` calls them (eval mode,
    no grad, so it neither draws random numbers nor changes the model)."""
    order = []
    handles = [mod.register_forward_hook(lambda m, i, o, path=path: order.append(path)) for path, mod in found]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    if not order:
        raise ValueError("the forward pass on the example input called none of the model's weight layers")
    return order


def anatomy(model: nn.Module, input_layer=None, output_layer=None, example_input=None) -> Anatomy:
    """Classify the weight layers of ``model``: read-in, hidden, read-out (and embeddings, norms).

    The read-in and read-out are ``input_layer`` / ``output_layer`` (modules or module paths), else the
    model's attributes of those names. With ``example_input`` (a batch the model takes), one forward pass
    checks that they are the first and the last weight layer the data goes through; a mismatch is an error
    naming both modules. A model that names neither falls back to module registration order, which the forward
    pass must confirm (so it needs ``example_input``). Raises ``ValueError`` naming the module for a module
    with weights it cannot classify (nn.MultiheadAttention, ...), for weights shared between layers, and for
    a model with fewer than two weight layers.
    """
    found, norms, seen = [], [], {}
    for path, mod in model.named_modules():
        own = dict(mod.named_parameters(recurse=False))
        if isinstance(mod, WEIGHT_LAYERS + EMBEDDINGS):
            w = mod.weight
            if isinstance(w, nn.parameter.UninitializedParameter):
                raise ValueError(f"module {_describe(path, mod)} is a lazy layer whose weight is not materialised "
                                 "yet; run one forward pass before parameterize")
            if id(w) in seen:
                raise ValueError(f"module {_describe(path, mod)} shares its weight with {seen[id(w)]!r}; tied "
                                 "weights have no single role (read-in/hidden/read-out), so muP cannot "
                                 "parameterize them")
            seen[id(w)] = path
            found.append((path, mod))
        elif isinstance(mod, NORMS):
            norms.append((path, mod))
        elif isinstance(mod, nn.MultiheadAttention):
            raise ValueError(f"module {_describe(path, mod)} packs its query, key and value projections into "
                             "one in_proj_weight, which muP cannot split into layers; use "
                             "modelscape.models.SelfAttention (causal=True for a decoder), built from nn.Linear "
                             "layers, or PARAMETERIZATION='sp' for this model")
        elif "weight" in own or any(p.ndim >= 2 for p in own.values()):
            # (a module with only small vector or scalar parameters of its own keeps the base lr, unscaled)
            names = ", ".join(sorted(own))
            raise ValueError(f"module {_describe(path, mod)} has parameters ({names}) that muP cannot classify: "
                             "parameterize handles nn.Linear, nn.Conv1d/2d/3d, nn.Embedding and "
                             f"{', '.join(n.__name__ for n in NORMS)}. Use PARAMETERIZATION='sp' for this "
                             "model, or build it from those layers.")
    linear = [(p, m) for p, m in found if isinstance(m, WEIGHT_LAYERS)]
    if len(found) < 2 or not linear:
        raise ValueError(f"muP needs at least two weight layers, the last a Linear/Conv read-out; this model has "
                         f"{len(found)}: {[p or '<model>' for p, _ in found]}")
    readin = _resolve_named(model, input_layer, "input_layer", found)
    readout = _resolve_named(model, output_layer, "output_layer", found)
    order = _call_order(model, found, example_input) if example_input is not None else None
    if readin is None and readout is None:
        if order is None:
            raise ValueError("the model names no read-in and read-out (attributes input_layer / output_layer, "
                             "or parameterize's input_layer= / output_layer=), and without an example input "
                             "modelscape cannot check that module registration order gives them; name them, or "
                             "pass example_input=")
        readin, readout = found[0][0], linear[-1][0]
        what = "the first/last weight layer registered"
    else:
        readin = found[0][0] if readin is None else readin
        readout = linear[-1][0] if readout is None else readout
        what = "the model's named read-in/read-out"
    if order is not None:
        modules = dict(found)
        for role, named, actual in (("read-in", readin, order[0]), ("read-out", readout, order[-1])):
            if named != actual:
                raise ValueError(f"{what}: {role} {_describe(named, modules[named])}, but the forward pass on the "
                                 f"first batch goes through {_describe(actual, modules[actual])} "
                                 f"{'first' if role == 'read-in' else 'last'}; set the model's "
                                 f"{'input_layer' if role == 'read-in' else 'output_layer'} to the right module")
    if not isinstance(dict(found)[readout], WEIGHT_LAYERS):
        raise ValueError(f"the read-out {readout!r} must be an nn.Linear or nn.Conv layer")
    layers = []
    for path, mod in found:
        if isinstance(mod, EMBEDDINGS):
            layers.append(Layer(path, mod, "readin", 1, int(mod.weight.shape[1])))
            continue
        role = "readin" if path == readin else "readout" if path == readout else "hidden"
        shape = mod.weight.shape
        layers.append(Layer(path, mod, role, int(np.prod(shape[1:])), int(shape[0])))
    width = max(layer.fan_out for layer in layers if layer.role != "readout")
    return Anatomy(layers, width, norms, readin)


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


def _vector_lr_factor(param, role, width, update_rule, readin_fan_in, mult=1.0):
    """Learning-rate factor of a vector-like parameter seen through ``mult``: it learns like one weight of the
    read-in (a bias is a weight on a constant input coordinate), so its effective rate is the read-in's."""
    _, lr = effective_scales(param, role, readin_fan_in, width, update_rule)
    return lr / (mult ** 2 if update_rule == "sgd" else mult)


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
                                _vector_lr_factor(param, layer.role, width, update_rule, readin_fan_in, mult)))
            _ensure_hook(mod)
            mod._mup_mult = float(mult)
        norm_factor = _vector_lr_factor(param, "hidden", width, update_rule, readin_fan_in)
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


# --------------------------------------------------------------------------------------------------------
# Coordinate check
# --------------------------------------------------------------------------------------------------------

def _recorder(store: dict, path: str):
    # A closure is fine here: these hooks live only for the duration of coord_check and are never copied.
    def hook(module, inputs, output):
        store.setdefault(path, []).append(output.detach().float().flatten())
    return hook


def _recorded_layers(model: nn.Module) -> list:
    """(path, module) of the layers a coordinate check records: weight layers and norms, in module order."""
    recorded = WEIGHT_LAYERS + EMBEDDINGS + NORMS
    return [(path, mod) for path, mod in model.named_modules() if isinstance(mod, recorded)]


def _record(model: nn.Module, names: list, X) -> tuple:
    layers = dict(_recorded_layers(model))
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
    ``0..steps``; for each Linear/Conv/Embedding/norm layer it records, over batch and features, ``measure``:
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
        opt = parameterize(model, param, optimizer, lr, relu_gain=relu_gain, example_input=batches[0][0],
                           **opt_kwargs)
        paths = [p for p, _ in _recorded_layers(model)]
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
