"""A model's anatomy as muP sees it: which weight layers are the read-in, the hidden layers and the read-out (and
read-out-like bottlenecks), its vector-like and custom parameters, its attention modules, and its width."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from modelscape.mup.rules import EMBEDDINGS, NORMS, WEIGHT_LAYERS
from modelscape.mup.shapes import Shapes

__all__ = ["Layer", "Param", "Anatomy", "anatomy"]


@dataclass
class Layer:
    """One weight layer as ``parameterize`` sees it (an embedding is a read-in with fan-in 1).

    ``role``: readin (fan-in fixed, fan-out grows), hidden (both grow), readout (fan-in grows, fan-out fixed:
    the model's read-out or a bottleneck in the middle) or fixed (neither grows). ``m_in`` / ``m_out``: its
    fan-in / fan-out over their sizes at the base width (1 without one). ``tied``: for a read-out that shares
    its weight with an embedding, that embedding's path."""
    path: str
    module: nn.Module
    role: str
    fan_in: int
    fan_out: int
    m_in: float = 1.0
    m_out: float = 1.0
    tied: str | None = None


@dataclass
class Param:
    """A parameter that is not a weight layer's weight: a bias, a norm's gain or bias, or a custom parameter.
    ``kind``: readin (vector-like: one dimension grows), hidden (two grow: a custom matrix) or fixed (none)."""
    name: str
    param: nn.Parameter
    kind: str
    what: str  # bias, norm or custom
    owner: str  # path of the module it belongs to
    m_in: float = 1.0
    m_out: float = 1.0


@dataclass
class Anatomy:
    """A model as muP sees it: weight layers in module order, the other parameters, norm layers, attention
    modules ``(path, module, base d_head or None)``, the width (the model's ``width`` attribute, else the
    largest fan-out but the read-out's) and the shapes it was read with."""
    layers: list = field(default_factory=list)
    width: int = 0
    norms: list = field(default_factory=list)
    readin_path: str = ""
    readout_path: str = ""
    params: list = field(default_factory=list)
    attention: list = field(default_factory=list)
    shapes: Shapes = field(default_factory=Shapes)

    def __str__(self):
        rows = []
        for layer in self.layers:
            role = layer.role
            if role == "readout" and layer.path != self.readout_path:
                role = "bottleneck"
            extra = f" tied to {layer.tied}" if layer.tied else ""
            if self.shapes.base is not None:
                extra += f" m_in={layer.m_in:g} m_out={layer.m_out:g}"
            rows.append(f"  {role:10s} {layer.path or '<model>'}: {type(layer.module).__name__} "
                        f"fan_in={layer.fan_in} fan_out={layer.fan_out}{extra}")
        rows += [f"  {'norm':10s} {path}: {type(mod).__name__}" for path, mod in self.norms]
        rows += [f"  {p.kind:10s} {p.name}: custom {tuple(p.param.shape)}" for p in self.params if p.what == "custom"]
        return "\n".join([f"model width {self.width}; layers:"] + rows)

    @property
    def readout(self) -> Layer:
        """The model's read-out (the last weight layer; bottlenecks share its role, not its place)."""
        return next(layer for layer in self.layers if layer.path == self.readout_path)


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


def _scan(model):
    """Weight layers, norms, shared weights ``{id: [paths]}``, and modules with parameters of their own that
    are neither (custom), refusing what muP cannot split."""
    found, norms, custom, sharing = [], [], [], {}
    for path, mod in model.named_modules():
        own = dict(mod.named_parameters(recurse=False))
        if isinstance(mod, WEIGHT_LAYERS + EMBEDDINGS):
            w = mod.weight
            if isinstance(w, nn.parameter.UninitializedParameter):
                raise ValueError(f"module {_describe(path, mod)} is a lazy layer whose weight is not materialised "
                                 "yet; run one forward pass before parameterize")
            sharing.setdefault(id(w), []).append(path)
            found.append((path, mod))
            extras = {k: v for k, v in own.items() if k not in ("weight", "bias")}
            if extras:  # a subclass's parameters of its own: classified like custom ones
                custom.append((path, mod, extras))
        elif isinstance(mod, NORMS):
            norms.append((path, mod))
        elif isinstance(mod, nn.MultiheadAttention):
            raise ValueError(f"module {_describe(path, mod)} packs its query, key and value projections into "
                             "one in_proj_weight, which muP cannot split into layers; use "
                             "modelscape.models.SelfAttention (causal=True for a decoder), built from nn.Linear "
                             "layers, or PARAMETERIZATION='sp' for this model")
        elif own:
            custom.append((path, mod, own))
    return found, norms, custom, sharing


def _check_ties(sharing, modules, readout):
    """The one tie muP supports: an embedding and the read-out sharing one weight (``{readout path: embedding
    path}``); any other sharing is an error naming the modules."""
    ties = {}
    for paths in sharing.values():
        if len(paths) == 1:
            continue
        embeddings = [p for p in paths if isinstance(modules[p], EMBEDDINGS)]
        if len(paths) == 2 and len(embeddings) == 1 and (readout is None or readout in paths):
            ties[readout] = embeddings[0]
            continue
        raise ValueError(f"module {_describe(paths[1], modules[paths[1]])} shares its weight with {paths[0]!r}; "
                         "muP supports one tie, an nn.Embedding with the read-out (tied embeddings); other tied "
                         "weights have no single role (read-in/hidden/read-out), so muP cannot parameterize them")
    return ties


def _roles(model, found, input_layer, output_layer, example_input):
    """Paths of the read-in and the read-out: named, else registration order, checked by a forward pass."""
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
    return readin, readout


def _ratio(ratios, dims):
    return float(np.prod([ratios[d] for d in dims])) if dims else 1.0


def _weight_layer(path, mod, name, role_by_name, shapes, grows):
    """A ``Layer`` for one Linear/Conv/Embedding: its role from growth if known, else from its name."""
    shape = tuple(mod.weight.shape)
    ratios = shapes.ratios(name, shape)
    if isinstance(mod, EMBEDDINGS):
        fan_in, fan_out, m_in, m_out = 1, shape[1], 1.0, ratios[1]
        in_grows, out_grows = (False, grows[1]) if grows else (False, True)
    else:
        fan_in, fan_out = int(np.prod(shape[1:])), shape[0]
        m_in, m_out = _ratio(ratios, range(1, len(shape))), ratios[0]
        in_grows, out_grows = (any(grows[1:]), grows[0]) if grows else (None, None)
    if grows is None and not isinstance(mod, EMBEDDINGS):
        role = role_by_name
    else:
        role = {(False, True): "readin", (True, True): "hidden", (True, False): "readout",
                (False, False): "fixed"}[in_grows, out_grows]
        if role_by_name == "readout" and role != "readout":
            raise ValueError(f"the read-out {_describe(path, mod)} should map width-sized features to a fixed-size "
                             f"output, but its {'fan-in does not grow' if not in_grows else 'fan-out grows'} with "
                             "width; name the right read-out (output_layer)")
        if role_by_name == "readin" and in_grows:
            raise ValueError(f"the read-in {_describe(path, mod)}: its fan-in grows with width; the read-in reads the "
                             "data, whose size does not; name the right read-in (input_layer)")
    return Layer(path, mod, role, fan_in, fan_out, m_in, m_out)


def _suspect_bottleneck(layers, readin):
    """Without growth, a middle layer narrower than its input and the read-in's output may be a width -> fixed
    bottleneck (read-out-like) or a layer that narrows but still grows; muP cannot tell, so it asks."""
    readin_out = next(layer.fan_out for layer in layers if layer.path == readin)
    for layer in layers:
        if layer.role == "hidden" and layer.fan_out < layer.fan_in and layer.fan_out < readin_out:
            raise ValueError(f"module {_describe(layer.path, layer.module)} maps {layer.fan_in} inputs to "
                             f"{layer.fan_out} outputs in the middle of the model: muP cannot tell whether its "
                             "output grows with width (a hidden layer) or not (a bottleneck, which muP treats like "
                             "a read-out). Give the base shapes: BASE_WIDTH in a config, or parameterize's base= "
                             "(the model at a base width) or probe= (at any other width)")


def _other_params(model, covered, norms, custom, shapes, has_growth):
    """``Param`` for every norm parameter and custom parameter (biases are added by the caller)."""
    out = []
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [(path, mod, dict(mod.named_parameters(recurse=False)), "norm") for path, mod in norms]
    groups += [(path, mod, own, "custom") for path, mod, own in custom]
    for path, mod, own, what in groups:
        for p in own.values():
            if id(p) in covered:
                continue
            name = names[id(p)]
            shape = tuple(p.shape)
            if has_growth:
                grown = [i for i, g in enumerate(shapes.grows[name]) if g]
            elif what == "norm":
                grown = [0]  # a norm's gain and bias have the features' size, which grows
            elif p.numel() == 1:
                grown = []  # a scalar (a temperature, a gate) cannot grow
            else:
                raise ValueError(f"module {_describe(path, mod)} has parameters ({', '.join(sorted(own))}) that muP "
                                 "cannot classify: parameterize handles nn.Linear, nn.Conv1d/2d/3d, nn.Embedding and "
                                 f"{', '.join(n.__name__ for n in NORMS)}; for parameter {name!r} of shape {shape} "
                                 "it must know which dimensions grow with width: give the base shapes (BASE_WIDTH "
                                 "in a config, or parameterize's base= / probe=), build the module from those layers, "
                                 "or use PARAMETERIZATION='sp' for this model.")
            if len(grown) > 2:
                raise ValueError(f"parameter {name!r} of {_describe(path, mod)}: {len(grown)} of its dimensions grow "
                                 "with width; muP has rules for at most two (a matrix)")
            ratios = shapes.ratios(name, shape)
            kind = ("fixed", "readin", "hidden")[len(grown)]
            m_out = ratios[grown[0]] if grown else 1.0
            m_in = _ratio(ratios, grown[1:]) if len(grown) == 2 else 1.0
            out.append(Param(name, p, kind, what, path, m_in, m_out))
            covered.add(id(p))
    return out


def _attention(model, shapes):
    """Attention modules (``d_head`` and ``attn_scale``) with their base d_head (None without a base width)."""
    found = []
    for path, mod in model.named_modules():
        if not hasattr(mod, "d_head"):
            continue
        if not hasattr(mod, "attn_scale"):
            if hasattr(mod, "attn_mult"):
                raise ValueError(f"module {_describe(path, mod)} has attn_mult and d_head but no attn_scale: "
                                 "parameterize sets attn_scale (the parameterization's logit scale) and leaves "
                                 "attn_mult (the user's multiplier) alone; scale the logits by attn_mult * attn_scale")
            continue
        base = None
        if shapes.base is not None:
            base = shapes.base_d_head.get(path)
            if base is None:
                q = getattr(mod, "q", None)
                if not isinstance(q, nn.Linear):
                    raise ValueError(f"attention module {_describe(path, mod)}: its base d_head is unknown (no base "
                                     "model and no `q` Linear to read it from); pass base= as a model")
                qname = next(n for n, p in model.named_parameters() if p is q.weight)
                base = mod.d_head / shapes.ratios(qname, tuple(q.weight.shape))[0]  # heads fixed, d_head grows
        found.append((path, mod, base))
    return found


def anatomy(model: nn.Module, input_layer=None, output_layer=None, example_input=None, shapes: Shapes | None = None,
            width: int | None = None) -> Anatomy:
    """Classify the parameters of ``model``: read-in, hidden, read-out, bottlenecks, vector-like, custom.

    The read-in and read-out are ``input_layer`` / ``output_layer`` (modules or module paths), else the
    model's attributes of those names. With ``example_input`` (a batch the model takes), one forward pass
    checks that they are the first and the last weight layer the data goes through; a mismatch is an error
    naming both modules. A model that names neither falls back to module registration order, which the forward
    pass must confirm (so it needs ``example_input``).

    ``shapes`` (``base_shapes``) says which dimensions grow with width; with it, every other weight layer's
    role follows from its growth (a width -> fixed layer in the middle is read-out-like, a fixed -> width one a
    read-in) and custom parameters are classified by how many of their dimensions grow (0 fixed, 1
    vector-like, 2 a matrix). Without it, the other layers are hidden, except that a middle layer narrower than
    its input and the read-in's output is an error (it may be a bottleneck), and a custom parameter with more
    than one entry is an error. ``width``: the width of the absolute rules; default the model's ``width``
    attribute, else the largest fan-out but the read-out's (mupify's). Raises ``ValueError`` naming the module
    for what it cannot classify (nn.MultiheadAttention, ...), for weights shared other than an embedding with
    the read-out, and for a model with fewer than two weight layers.
    """
    shapes = shapes if shapes is not None else Shapes()
    found, norms, custom, sharing = _scan(model)
    modules = dict(found)
    _check_ties(sharing, modules, None)  # what no read-out can make right, before the read-out is known
    has_growth = shapes.grows is not None
    covered = {id(p) for _, mod in found for p in (mod.weight, getattr(mod, "bias", None)) if p is not None}
    others = _other_params(model, set(covered), norms, custom, shapes, has_growth)
    readin, readout = _roles(model, found, input_layer, output_layer, example_input)
    ties = _check_ties(sharing, modules, readout)
    names = {id(p): n for n, p in model.named_parameters()}
    layers, params, covered = [], [], set()
    for path, mod in found:
        name = names[id(mod.weight)]
        by_name = "readin" if path == readin else "readout" if path == readout else "hidden"
        layer = _weight_layer(path, mod, name, by_name, shapes, shapes.grows[name] if has_growth else None)
        layer.tied = ties.get(path)
        layers.append(layer)
        covered.add(id(mod.weight))
        bias = getattr(mod, "bias", None)
        if isinstance(bias, nn.Parameter):
            # a bias adds to the layer's outputs: vector-like where they grow, fixed at a read-out
            kind = "fixed" if layer.role in ("readout", "fixed") else "readin"
            params.append(Param(names[id(bias)], bias, kind, "bias", path, 1.0, layer.m_out))
            covered.add(id(bias))
    if not has_growth:
        _suspect_bottleneck(layers, readin)
    params += others
    if width is None:
        width = getattr(model, "width", None)
    if not isinstance(width, (int, np.integer)) or isinstance(width, bool) or width < 1:
        width = max(layer.fan_out for layer in layers if layer.path != readout)
    return Anatomy(layers, int(width), norms, readin, readout, params, _attention(model, shapes), shapes)
