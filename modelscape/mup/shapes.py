"""Base shapes: how each parameter of a model grows with width, and what it was at the base width.

muP needs two facts the model's own shapes do not hold: which dimensions grow with width (a width -> 8
bottleneck looks like a hidden layer to a model seen at one width) and, for muTransfer, the base width the
hyperparameters were tuned at. ``base_shapes`` gets them from a base model (the same model built at the base
width; on the meta device it costs no memory and draws no random numbers), from a probe (the same model at any
other width: growth only, absolute rules), or from the user naming which dimensions grow. Microsoft's ``mup``
calls the same idea ``set_base_shapes``; this is written here from its description.
"""
from __future__ import annotations

import fnmatch
import math
import random
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

__all__ = ["Shapes", "base_shapes", "shapes_of", "build_shapes"]


@dataclass
class Shapes:
    """What muP knows of a model beyond its shapes.

    ``base``: parameter name -> its shape at the base width, or None (no base width: the absolute rules).
    ``grows``: parameter name -> one bool per dimension, whether it grows with width, or None (not known: the
    anatomy then reads roles from the read-in / read-out alone and refuses what it cannot tell).
    ``base_d_head``: attention module path -> its ``d_head`` at the base width (else read from its ``q``)."""

    base: dict | None = None
    grows: dict | None = None
    base_d_head: dict = field(default_factory=dict)

    def ratios(self, name: str, shape) -> tuple:
        """Per dimension of parameter ``name`` (now of ``shape``): its size over its base size (1 without a base)."""
        if self.base is None:
            return (1.0,) * len(shape)
        return tuple(float(s) / float(b) for s, b in zip(shape, self.base[name]))


def shapes_of(model_or_shapes) -> dict:
    """``{parameter name: shape}`` of a module (shared parameters once, under their first name) or of a dict."""
    if isinstance(model_or_shapes, nn.Module):
        return {name: tuple(p.shape) for name, p in model_or_shapes.named_parameters()}
    if isinstance(model_or_shapes, dict):
        return {str(k): tuple(int(d) for d in v) for k, v in model_or_shapes.items()}
    raise TypeError(f"expected a model (nn.Module) or a dict of shapes, got {type(model_or_shapes).__name__}")


def _d_heads(model) -> dict:
    if not isinstance(model, nn.Module):
        return {}
    return {path: int(mod.d_head) for path, mod in model.named_modules() if hasattr(mod, "d_head")}


def build_shapes(factory: Callable[[], nn.Module], fallback_cpu: bool = True):
    """``(shapes, d_heads)`` of ``factory()``, built on the meta device (no memory, no random numbers), or on
    the CPU if the model cannot be built there (``fallback_cpu``). torch's, numpy's and Python's global RNGs are
    restored after, so a constructor that draws from them leaves the job's random numbers as they were. None if
    it cannot be built at all without the CPU fallback."""
    state, np_state, py_state = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        try:
            with torch.device("meta"):
                model = factory()
        except Exception:
            if not fallback_cpu:
                return None
            model = factory()
    finally:
        torch.random.set_rng_state(state)
        np.random.set_state(np_state)
        random.setstate(py_state)
    return shapes_of(model), _d_heads(model)


def _compare(model_shapes: dict, other: dict, what: str) -> None:
    if set(other) != set(model_shapes):
        missing, extra = sorted(set(model_shapes) - set(other)), sorted(set(other) - set(model_shapes))
        raise ValueError(f"the {what} does not have the model's parameters: missing {missing[:5]}, extra "
                         f"{extra[:5]}; it must be the same model built at another width")
    for name, shape in model_shapes.items():
        if len(other[name]) != len(shape):
            raise ValueError(f"parameter {name!r} has shape {shape} in the model but {other[name]} in the {what}")


def _growth(model_shapes: dict, other: dict):
    """Dimensions that differ between the model and another width's; None if nothing differs (same width)."""
    grows = {n: tuple(a != b for a, b in zip(s, other[n])) for n, s in model_shapes.items()}
    return grows if any(any(g) for g in grows.values()) else None


def base_shapes(model: nn.Module, base=None, probe=None, grows: dict | None = None, base_width: int | None = None,
                width: int | None = None) -> Shapes:
    """The ``Shapes`` of ``model``, from one of three sources.

    - ``base``: the same model built at the base width (an ``nn.Module``, meta device welcome), its
      ``{name: shape}`` dict, or a ``Shapes``. The rules become relative to it (muTransfer); the dimensions that
      differ are the ones that grow (at the base width itself nothing differs: pass ``probe`` too, or let
      the anatomy read roles from the read-in / read-out).
    - ``probe``: the same model at any other width (module or shapes): only which dimensions grow; the rules
      stay absolute unless ``base`` is given too.
    - ``grows``: naming which dimensions grow, ``{parameter name or fnmatch pattern: dims}`` (the first
      matching pattern wins; every parameter must match one, ``()`` for none), with ``base_width`` and
      ``width`` (default: the model's ``width`` attribute): each named dimension is ``width / base_width``
      times its base size, which must come out whole.
    """
    now = shapes_of(model)
    out = Shapes()
    if isinstance(base, Shapes):
        out.base, out.grows, out.base_d_head = base.base, base.grows, dict(base.base_d_head)
        base = base.base
        if base is not None:
            _compare(now, base, "base model")
            out.grows = out.grows or _growth(now, base)
    elif base is not None:
        out.base = shapes_of(base)
        _compare(now, out.base, "base model")
        out.grows = _growth(now, out.base)
        out.base_d_head = _d_heads(base)
    if probe is not None:
        other = shapes_of(probe)
        _compare(now, other, "probe model")
        grown = _growth(now, other)
        if grown is None:
            raise ValueError("the probe model has the model's own shapes; build it at another width")
        out.grows = grown
    if grows is not None:
        if base is not None:
            raise ValueError("give the base shapes either as a base model (base=) or by naming the dimensions that "
                             "grow (grows=), not both")
        out.grows, out.base = _named_growth(model, now, grows, base_width, width)
    return out


def _named_growth(model, now, patterns, base_width, width):
    width = width if width is not None else getattr(model, "width", None)
    if base_width is None or not isinstance(width, int):
        raise ValueError("grows= needs base_width= and width= (or a model with an int `width` attribute)")
    grows, base = {}, {}
    for name, shape in now.items():
        dims = next((tuple(d) for pat, d in patterns.items() if fnmatch.fnmatchcase(name, pat)), None)
        if dims is None:
            raise ValueError(f"parameter {name!r} (shape {shape}) matches no pattern of grows=; name the dimensions "
                             "of it that grow with width, () for none")
        flags = tuple(i in dims or i - len(shape) in dims for i in range(len(shape)))
        size = []
        for d, g in zip(shape, flags):
            b = d * base_width / width if g else d
            if g and (b < 1 or not math.isclose(b, round(b))):
                raise ValueError(f"parameter {name!r}: dimension of size {d} at width {width} is {b:g} at base "
                                 f"width {base_width}, not a whole number; check grows= for it")
            size.append(int(round(b)))
        grows[name], base[name] = flags, tuple(size)
    return grows, base
