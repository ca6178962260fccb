"""A model's anatomy as muP sees it: which weight layers are the read-in, the hidden layers and the read-out,
its norm layers, and its width."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from modelscape.mup.rules import EMBEDDINGS, NORMS, WEIGHT_LAYERS

__all__ = ["Layer", "Anatomy", "anatomy"]


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

