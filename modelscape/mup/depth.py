"""Depth as a second dimension that grows: residual-branch multipliers and the learning-rate and eps rules that go
with them (Depth-muP, alpha = 1/2, Yang et al., Tensor Programs VI and Bordelon et al. 2023; CompleteP, alpha = 1,
Dey et al. 2025).

A model declares its residual blocks: a **residual block** is a module with a ``residual_branches`` attribute, the
names (paths inside the block, dotted where nested) of the submodules whose outputs are added to the residual
stream in full. ``GPTBlock`` declares ``("attn.proj", "fc2")``: ``x + attn(ln1(x))`` ends in the attention's output
projection, ``x + fc2(...)`` in the MLP's second layer. The depth ``L`` is the number of blocks.

With ``r = L / L_base`` (``L_base``: BASE_DEPTH, else 1) and exponent ``alpha``:

- every branch's output is multiplied by ``r**-alpha`` (on top of its width multiplier);
- every parameter inside a block (weights, biases, the block's norms) has its learning rate multiplied by
  ``r**(alpha - 1)`` under Adam-like rules and by ``r**(2 * alpha - 1)`` under SGD, so that each block moves the
  residual stream by ``1/L`` of what all of them do together; its gradient entries scale by ``r**-alpha``, which
  Adam's eps follows under EPS_SCALING;
- inits are left as they are: the multiplier, not the init, keeps the stream's size independent of depth;
- the embeddings, the read-out and the norms outside blocks are untouched.

At ``L = L_base`` every factor is 1, so the model is the width rules' to the bit.
"""
from __future__ import annotations

import math

from torch import nn

__all__ = ["residual_blocks", "depth_factors", "apply_depth"]


def residual_blocks(model: nn.Module) -> list:
    """``[(path, block, [branch paths])]`` for every residual block of ``model`` (a module with a
    ``residual_branches`` attribute), in module order; branch paths are the model's (``blocks.0.fc2``). A branch
    name the block has no submodule for is a ``ValueError`` naming both."""
    out = []
    for path, mod in model.named_modules():
        names = getattr(mod, "residual_branches", None)
        if names is None:
            continue
        if isinstance(names, str) or not names:
            raise ValueError(f"{type(mod).__name__} at {path or '<model>'!r}: residual_branches must be a non-empty "
                             f"list of submodule names, got {names!r}")
        branches = []
        for name in names:
            try:
                mod.get_submodule(name)
            except AttributeError:
                raise ValueError(f"{type(mod).__name__} at {path or '<model>'!r} declares residual branch {name!r}, "
                                 "but has no submodule of that name") from None
            branches.append(f"{path}.{name}" if path else name)
        out.append((path, mod, branches))
    nested = [(a, b) for a, *_ in out for b, *_ in out if a != b and b.startswith(f"{a}.")]
    if nested:
        raise ValueError(f"residual block {nested[0][1]!r} sits inside residual block {nested[0][0]!r}; declare "
                         "residual_branches on the blocks the stream passes through, not on their parts")
    return out


def depth_factors(alpha: float, depth: int, base_depth: int | None, update_rule: str) -> dict:
    """The depth rules' factors for ``depth`` blocks relative to ``base_depth`` (None: 1): ``mult`` (each
    branch's output), ``lr`` (a block parameter's learning rate under ``update_rule``), ``grad`` (how its
    gradient entries scale, for Adam's eps)."""
    alpha = float(alpha)
    if not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"depth_alpha (DEPTH_ALPHA) must be a finite number >= 0, got {alpha!r}")
    base = 1 if base_depth is None else int(base_depth)
    if base < 1:
        raise ValueError(f"base_depth (BASE_DEPTH) must be >= 1, got {base_depth!r}")
    r = depth / base
    lr_exp = alpha - 1 if update_rule == "adam" else 2 * alpha - 1
    return {"mult": r ** -alpha, "lr": r ** lr_exp, "grad": r ** -alpha}


def apply_depth(plan, model: nn.Module, alpha: float, base_depth: int | None, update_rule: str) -> int:
    """Compose the depth rules into ``plan`` (an ``Assignment``) for ``model``: branch multipliers into
    ``plan.mults``, learning-rate and gradient factors into the rules of every parameter inside a block.
    Returns the depth (the number of blocks). A model with no residual block is a ``ValueError``."""
    blocks = residual_blocks(model)
    if not blocks:
        raise ValueError(f"depth_alpha (DEPTH_ALPHA) = {alpha} scales residual branches, but "
                         f"{type(model).__name__} declares none: give its residual block class a "
                         "residual_branches attribute naming the submodules whose outputs are added to the stream "
                         "(the built-in GPT and Transformer do; an MLP has no residual stream)")
    depth = len(blocks)
    f = depth_factors(alpha, depth, base_depth, update_rule)
    inside = {id(p) for _, block, _ in blocks for p in block.parameters()}
    for rule in plan.rules:
        if id(rule.param) in inside:
            rule.times(lr=f["lr"], grad=f["grad"])
    for _, _, branches in blocks:
        for path in branches:
            plan.mults[path] = plan.mults.get(path, 1.0) * f["mult"]
    return depth
