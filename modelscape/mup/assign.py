"""What each parameter and module of a model gets under a parameterization: the numbers of ``rules`` placed on its
``anatomy`` (forward multipliers, init, learning-rate factors, and how its gradient scales, which Adam's eps may
follow), with the user's tunable multipliers (``Knobs``) on top. ``apply`` carries the assignment out.

Everything here is a product of factors per parameter (``Rule``: learning rate, gradient scale, init) and per
module (``Assignment.mults``), so a second dimension that grows besides width (depth) adds its factors with
``Rule.times`` and by multiplying ``mults``, and the user's per-group multipliers stay on top of both.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from modelscape.mup.layers import Anatomy
from modelscape.mup.rules import (EMBEDDINGS, attention_scale, effective_scales, layer_scales,
                                  relative_mult, relative_scales, tied_readout_mult, vector_scale)

__all__ = ["LR_GROUPS", "Knobs", "Rule", "Assignment", "assign"]

# The groups a per-group learning-rate multiplier acts on: read-in weights (embeddings, the input layer, a layer
# out of a bottleneck), hidden weights (and fixed-size layers, custom matrices), read-out weights (the read-out
# and bottlenecks), and vector-like parameters (biases, norms, custom vectors and scalars).
LR_GROUPS = ("embedding", "hidden", "readout", "vector")


@dataclass
class Knobs:
    """The tunable multipliers, as muP practice tunes them at a small width and carries them over (config keys):
    ``output_mult`` (OUTPUT_MULT) multiplies the read-out's output, ``emb_mult`` (EMB_MULT) every embedding's
    and the input layer's; ``lr_mults`` (EMB_LR_MULT, HIDDEN_LR_MULT, READOUT_LR_MULT, VECTOR_LR_MULT)
    multiplies the learning rate of one group of ``LR_GROUPS``; ``readout_zero_init`` and ``query_zero_init``
    start the read-out and the attention queries at 0 (READOUT_ZERO_INIT, QUERY_ZERO_INIT). A forward
    multiplier leaves learning rates alone (as Microsoft's ``output_mult``): it is part of the function."""
    output_mult: float = 1.0
    emb_mult: float = 1.0
    lr_mults: dict = field(default_factory=dict)
    readout_zero_init: bool = False
    query_zero_init: bool = False

    def __post_init__(self):
        self.lr_mults = dict(self.lr_mults or {})
        unknown = set(self.lr_mults) - set(LR_GROUPS)
        if unknown:
            raise ValueError(f"lr_mults names groups {sorted(unknown)}; the groups are {LR_GROUPS}")
        for name, value in [("output_mult", self.output_mult), ("emb_mult", self.emb_mult)] + \
                [(f"lr_mults[{k!r}]", v) for k, v in self.lr_mults.items()]:
            if not math.isfinite(float(value)) or float(value) < 0 or (float(value) == 0 and "lr" not in name):
                raise ValueError(f"{name} must be a finite number > 0 (>= 0 for a learning-rate multiplier), got "
                                 f"{value!r}")

    def is_default(self) -> bool:
        return (self.output_mult == 1 and self.emb_mult == 1 and all(v == 1 for v in self.lr_mults.values())
                and not self.readout_zero_init and not self.query_zero_init)

    def lr_mult(self, group: str) -> float:
        return float(self.lr_mults.get(group, 1.0))


@dataclass
class Rule:
    """One parameter's assignment. ``init``: None (keep the model's own), ``("normal", std)``, ``("scale",
    factor)`` of the model's own, or ``("zero",)``. ``lr``: its learning-rate factor (before the group's
    multiplier). ``grad``: how its raw gradient entries scale (Adam's factor over SGD's: both rules move it
    alike, so the gradient is their ratio); 1 at the base width."""
    name: str
    param: nn.Parameter
    group: str
    init: tuple | None
    lr: float
    grad: float = 1.0
    padding_idx: int | None = None  # an embedding's padding row, kept at 0 by a fresh draw

    def times(self, lr: float = 1.0, grad: float = 1.0, init: float = 1.0) -> "Rule":
        """Compose one more factor into this rule, in place: its learning-rate factor times ``lr``, its gradient
        scale (Adam's eps) times ``grad``, its init times ``init`` (a fresh draw's std, a scaling of the model's
        own, or nothing for a zero init). Width is one dimension that grows; another (depth: residual-branch
        rules) composes here as one more factor per parameter, without touching the width rules."""
        self.lr *= float(lr)
        self.grad *= float(grad)
        if init != 1 and self.init is None:
            self.init = ("scale", float(init))
        elif init != 1 and self.init[0] in ("normal", "scale"):
            self.init = (self.init[0], self.init[1] * float(init))
        return self


@dataclass
class Assignment:
    """A model's parameterization: per parameter a ``Rule``, per module path a forward multiplier, per
    attention module its logit scale, the ReLU multiplier (None: ReLUs left alone), norms to reset."""
    rules: list = field(default_factory=list)
    mults: dict = field(default_factory=dict)
    attention: list = field(default_factory=list)
    relu: float | None = None
    reset: list = field(default_factory=list)


def _split(eff: dict, mult: float) -> dict:
    """Raw learning-rate factors, per update rule, of an effective rate seen through ``mult``."""
    return {"sgd": eff["sgd"] / mult ** 2, "adam": eff["adam"] / mult}


class _Placer:
    """The parameterization's numbers for one anatomy, absolute (no base width) or relative to the base."""

    def __init__(self, anat: Anatomy, param: str):
        self.anat, self.param = anat, param
        self.sp = param == "sp"
        self.relative = anat.shapes.base is not None

    def layer(self, layer):
        """``(mult, init, {rule: raw lr factor})`` of a weight layer's weight."""
        if self.sp or layer.role == "fixed":
            return 1.0, None, {"sgd": 1.0, "adam": 1.0}
        if self.relative:
            init, eff = None, {}
            for r in ("sgd", "adam"):
                init, eff[r] = relative_scales(self.param, layer.role, layer.m_in, layer.m_out, r)
            if layer.tied:
                return tied_readout_mult(self.param, layer.m_in), None, {}
            mult = relative_mult(self.param, layer.role, init, layer.m_in)
            return mult, (None if init == mult else ("scale", init / mult)), _split(eff, mult)
        width = self.anat.width
        if layer.tied:
            return tied_readout_mult(self.param, width), None, {}
        if isinstance(layer.module, EMBEDDINGS):
            std, eff = None, {}
            for r in ("sgd", "adam"):
                std, eff[r] = effective_scales(self.param, "readin", 1, width, r)
            return 1.0, ("normal", std), eff
        raw, mult, std = {}, 1.0, 1.0
        for r in ("sgd", "adam"):
            mult, raw[r], std = layer_scales(self.param, layer.role, layer.fan_in, width, r)
        return mult, ("normal", std), raw

    def vector(self, p, mult=1.0, m_in=1.0, layer_role=None):
        """``(init, {rule: raw lr factor})`` of a bias (behind its layer's ``mult``), norm or custom parameter."""
        if self.sp or (layer_role == "fixed" and not self.relative):
            return None, {"sgd": 1.0, "adam": 1.0}
        if self.relative:
            eff = {}
            for r in ("sgd", "adam"):
                _, eff[r] = relative_scales(self.param, p.kind, p.m_in, p.m_out, r)
            # Biases: sp draws them ~1/sqrt(fan_in), which muP makes width-independent, as Microsoft's
            # set_base_shapes does; seen through the layer's multiplier like its weight.
            factor = math.sqrt(m_in) / mult if p.what == "bias" else 1.0
            return (None if factor == 1 else ("scale", factor)), _split(eff, mult)
        if p.kind == "hidden":
            raise ValueError(f"parameter {p.name!r} (module {p.owner or '<model>'!r}) is a custom matrix (two of its "
                             "dimensions grow with width): the absolute rules set a weight's init, which modelscape "
                             "cannot do for a parameter it does not know the use of. Set a base width (BASE_WIDTH, "
                             "or parameterize's base=), whose rules keep the model's own init, or use nn.Linear")
        if p.kind == "fixed" and p.what != "bias":
            return None, {"sgd": 1.0, "adam": 1.0}
        role = "readout" if p.kind == "fixed" else "readin"
        d_in = next(layer.fan_in for layer in self.anat.layers if layer.path == self.anat.readin_path)
        eff = {r: vector_scale(self.param, role, self.anat.width, r, d_in) for r in ("sgd", "adam")}
        raw = _split(eff, mult)
        # its gradient's scale: Adam's rate over the SGD rate of the same convention (fan-in 1); SGD's own
        # constant carries the data's dimension, which says nothing about the gradient
        raw["grad"] = raw["adam"] / (vector_scale(self.param, role, self.anat.width, "sgd", 1) / mult ** 2)
        return (("zero",) if p.what == "bias" else None), raw

    def attention(self, mod, base_d_head):
        return None if self.sp else attention_scale(self.param, mod.d_head, base_d_head)


def _grad(raw: dict) -> float:
    """How a parameter's raw gradient entries scale: both rules move it alike, so the gradient is Adam's rate
    over SGD's."""
    return raw.get("grad", raw["adam"] / raw["sgd"])


def _group_of(layer) -> str:
    if layer.tied or layer.role == "readin":
        return "embedding"
    return "readout" if layer.role == "readout" else "hidden"


def assign(anat: Anatomy, param: str, update_rule: str, knobs: Knobs | None = None,
           relu_gain: bool = True) -> Assignment:
    """The ``Assignment`` of ``param`` on ``anat`` under ``update_rule`` ('sgd' or 'adam'), with ``knobs``.

    Weight layers in module order, each weight then its bias, then norms and custom parameters: the order
    ``apply`` draws the inits in (mupify's, so its draws are reproduced). Absolute rules re-draw weights and
    embeddings, zero biases and reset norms; relative rules (a base width) scale the model's own init. The
    ReLU gain sqrt(2) is mupify's and belongs to the absolute rules; with a base width (and under sp) the model
    keeps its own activations, so that at the base width it is sp to the bit.
    """
    knobs = knobs if knobs is not None else Knobs()
    place = _Placer(anat, param)
    out = Assignment()
    layer_mult = {}
    for layer in anat.layers:
        mult, init, raw = place.layer(layer)
        layer_mult[layer.path] = mult
        if layer.tied and knobs.readout_zero_init:
            raise ValueError(f"READOUT_ZERO_INIT / readout_zero_init: the read-out {layer.path!r} shares its weight "
                             f"with the embedding {layer.tied!r}; zeroing it would zero the embedding too")
        if layer.path == anat.readout_path and knobs.readout_zero_init:
            init = ("zero",)
        if not layer.tied:
            w = layer.module.weight
            pad = getattr(layer.module, "padding_idx", None) if isinstance(layer.module, EMBEDDINGS) else None
            out.rules.append(Rule(f"{layer.path}.weight" if layer.path else "weight", w, _group_of(layer),
                                  init, raw[update_rule], _grad(raw), pad))
        for p in anat.params:
            if p.what == "bias" and p.owner == layer.path:
                init_b, raw_b = place.vector(p, mult, layer.m_in, layer.role)
                if layer.path == anat.readout_path and knobs.readout_zero_init:
                    init_b = ("zero",)
                out.rules.append(Rule(p.name, p.param, "vector", init_b, raw_b[update_rule], _grad(raw_b)))
    for p in anat.params:
        if p.what != "bias":
            init, raw = place.vector(p)
            out.rules.append(Rule(p.name, p.param, "hidden" if p.kind == "hidden" else "vector", init,
                                  raw[update_rule], _grad(raw)))
    if not place.sp and not place.relative:
        out.reset = [mod for _, mod in anat.norms]
        out.relu = math.sqrt(2.0) if relu_gain else 1.0
    for layer in anat.layers:
        mult = layer_mult[layer.path]
        if layer.path == anat.readout_path:
            mult *= float(knobs.output_mult)
        if isinstance(layer.module, EMBEDDINGS) or layer.path == anat.readin_path:
            mult *= float(knobs.emb_mult)
        if not (isinstance(layer.module, EMBEDDINGS) or place.sp) or mult != 1:
            out.mults[layer.path] = mult  # every weight layer carries the hook under muP, as mupify's do
    for path, mod, base_d_head in anat.attention:
        scale = place.attention(mod, base_d_head)
        if scale is not None:
            out.attention.append((mod, scale))
        if knobs.query_zero_init:
            q = getattr(mod, "q", None)
            if not isinstance(q, nn.Linear):
                raise ValueError(f"QUERY_ZERO_INIT / query_zero_init: attention module {path!r} has no `q` Linear")
            for rule in out.rules:
                if rule.param is q.weight or rule.param is q.bias:
                    rule.init = ("zero",)
    if knobs.query_zero_init and not anat.attention:
        raise ValueError("QUERY_ZERO_INIT / query_zero_init: the model has no attention module (one with d_head and "
                         "attn_scale, as modelscape.models.SelfAttention)")
    return out


