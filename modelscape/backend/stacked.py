"""The stacked model and optimizer of a fused group: the members' MLPs as tensors with a leading member axis.

``StackedMLP`` holds every member's parameters stacked along a leading "member" axis (G, ...), one batched
matmul per layer serving every member. Members may differ in WIDTH: each is padded with zeros to the group's
largest width, and its hidden activations are multiplied by a 0/1 mask, so that a padded unit is exactly 0
forward and its weights get exactly zero gradient, whatever the nonlinearity (Sigmoid's act(0) = 0.5 included).
Each member keeps its own muP/GAMMA multipliers, initial weights and per-parameter learning rates: they are taken
from its own model and optimizer, prepared as the job alone would be; the stack only pads.

``StackedOptimizer`` applies torch's SGD (momentum, weight decay) or Adam/AdamW update to the stacked parameters
with each member's own constants. A zero gradient on a zero weight gives a zero update under all of them (weight
decay of 0 is 0, Adam's first moment stays 0 and its update is ``0 / (0 + eps)``), so padding stays zero.

When members leave (``select``), the stack keeps the rest, narrowed to their largest width.
"""
from __future__ import annotations

import torch
from torch import nn

from modelscape.backend.plan import optimizer_kind

__all__ = ["StackedMLP", "StackedOptimizer", "mlp_layers", "padded_numel"]


def mlp_layers(model) -> list:
    """``(path, Linear)`` of a built-in MLP's layers, read-in first."""
    return [("input_layer", model.input_layer)] + \
        [(f"hidden_layers.{i}", m) for i, m in enumerate(model.hidden_layers)] + [("output_layer", model.output_layer)]


def padded_numel(model, width: int) -> int:
    """How many numbers a built-in MLP's parameters hold once padded to ``width`` hidden units."""
    n = 0
    for path, layer in mlp_layers(model):
        fan_in = layer.in_features if path == "input_layer" else width
        fan_out = layer.out_features if path == "output_layer" else width
        n += fan_in * fan_out + (fan_out if layer.bias is not None else 0)
    return n


def _scale(module: nn.Module) -> float:
    """The factor ``mup``'s forward hook applies to this module's output (1 without it)."""
    return float(getattr(module, "_mup_mult", 1.0)) / float(getattr(module, "_mup_gamma", 1.0))


def _column(values, like: torch.Tensor, ndim: int) -> torch.Tensor:
    """Per-member numbers as a tensor of shape (G, 1, ..., 1) that broadcasts against a stacked parameter."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).reshape((-1,) + (1,) * ndim)


def _stack_padded(tensors: list) -> torch.Tensor:
    """``torch.stack`` of tensors whose shapes may differ: each is put at the start of every dimension of a
    zero tensor as large as the largest along each."""
    shape = tuple(max(t.shape[d] for t in tensors) for d in range(tensors[0].ndim))
    if all(tuple(t.shape) == shape for t in tensors):
        return torch.stack(tensors).contiguous()
    out = tensors[0].new_zeros((len(tensors),) + shape)
    for g, t in enumerate(tensors):
        out[g][tuple(slice(0, n) for n in t.shape)] = t
    return out


class StackedMLP:
    """The members' MLPs as stacked weights: ``forward(params, X)`` maps (G, B, ...) inputs to (G, B, d_out).

    ``params`` follow the model's ``named_parameters`` order, weights transposed to (G, in, out) and padded to
    ``width`` (the largest member's) where a member is narrower. Each layer's output is multiplied by that
    member's muP/GAMMA factor and the nonlinearity's by its own, exactly as ``mup``'s forward hook does on each
    member's model; the nonlinearity's factor carries the member's width mask.
    """

    def __init__(self, models: list):
        first = models[0]
        self.names = [n for n, _ in first.named_parameters()]
        self.act = first.nonlin
        index = {n: i for i, n in enumerate(self.names)}
        self.layer_params = []  # per layer: (index of weight, index of bias or None) into params
        width_dims = {}  # param index -> its dimensions (after the member axis) that are hidden width
        for path, _ in mlp_layers(first):
            w, b = index[f"{path}.weight"], index.get(f"{path}.bias")
            self.layer_params.append((w, b))
            # stored transposed: (in, out); the read-in's in and the read-out's out are data dimensions
            width_dims[w] = tuple(d for d, keep in ((1, path == "input_layer"), (2, path == "output_layer"))
                                  if not keep)
            if b is not None and path != "output_layer":
                width_dims[b] = (1,)
        self.width_dims = [width_dims.get(i, ()) for i in range(len(self.names))]
        per_layer = [[_scale(m) for _, m in mlp_layers(model)] for model in models]
        self.layer_scales = [list(s) for s in zip(*per_layer)]
        self.act_scales = [_scale(m.nonlin) for m in models]
        self.widths = [int(m.width) for m in models]
        self.width = max(self.widths)
        per_model = [dict(m.named_parameters()) for m in models]
        # Weights are kept transposed, (G, in, out), so that neither the forward matmul nor the weight gradient
        # (and the optimizer's arithmetic on it) works on a strided view.
        self.transposed = [n.endswith(".weight") for n in self.names]
        self.params = [_stack_padded([pm[n].detach().t() if t else pm[n].detach() for pm in per_model])
                       .requires_grad_() for n, t in zip(self.names, self.transposed)]
        self._set_scales()

    def _set_scales(self):
        like = self.params[0]
        self._layer_t = [None if all(s == 1.0 for s in sc) else _column(sc, like, 2) for sc in self.layer_scales]
        act = None if all(s == 1.0 for s in self.act_scales) else _column(self.act_scales, like, 2)
        if any(w != self.width for w in self.widths):  # 1 on a member's own units, 0 on its padding
            mask = (torch.arange(self.width, device=like.device) < torch.tensor(self.widths, device=like.device)
                    .unsqueeze(1)).to(like.dtype).unsqueeze(1)  # (G, 1, width)
            act = mask if act is None else act * mask  # x * s * 1 == x * s: a member's numbers are unchanged
        self._act_t = act

    def forward(self, params: list, X: torch.Tensor) -> torch.Tensor:
        h = X.reshape(X.shape[0], X.shape[1], -1)  # MLP.forward flattens each sample
        last = len(self.layer_params) - 1
        for i, ((w, b), scale) in enumerate(zip(self.layer_params, self._layer_t)):
            wt = params[w]
            h = torch.bmm(h, wt) if b is None else torch.baddbmm(params[b].unsqueeze(1), h, wt)
            if scale is not None:
                h = h * scale
            if i < last:
                h = self.act.forward(h)  # .forward: the muP hook's factor is _act_t, per member
                if self._act_t is not None:
                    h = h * self._act_t
        return h

    def take(self, keep: list, tensors: list, width: int) -> list:
        """``tensors`` shaped as ``params`` (parameters, optimizer state, a baseline), with only the members at
        rows ``keep`` and their width dimensions cut to ``width``."""
        idx = torch.tensor(keep, device=tensors[0].device)
        out = []
        for t, dims in zip(tensors, self.width_dims):
            t = t.index_select(0, idx)
            if dims and t.shape[dims[0]] != width:
                t = t[tuple(slice(0, width) if d in dims else slice(None) for d in range(t.ndim))].contiguous()
            out.append(t)
        return out

    def select(self, keep: list) -> int:
        """Keep only the members at rows ``keep`` (in that order), narrowed to the widest of them; returns that
        width (for ``take`` on whatever else is shaped as ``params``)."""
        width = max(self.widths[k] for k in keep)
        self.params = [p.detach().requires_grad_() for p in self.take(keep, [p.detach() for p in self.params],
                                                                        width)]
        self.layer_scales = [[sc[k] for k in keep] for sc in self.layer_scales]
        self.act_scales = [self.act_scales[k] for k in keep]
        self.widths, self.width = [self.widths[k] for k in keep], width
        self._set_scales()
        return width

    def write_back(self, row: int, model: nn.Module) -> None:
        """Copy member ``row``'s current weights (its own, unpadded part) into its own model."""
        with torch.no_grad():
            for stacked, t, p in zip(self.params, self.transposed, model.parameters()):
                own = stacked[row][tuple(slice(0, n) for n in (p.shape[::-1] if t else p.shape))]
                p.copy_(own.t() if t else own)


class StackedOptimizer:
    """SGD (momentum, weight decay) or Adam/AdamW on stacked parameters, with each member's own per-parameter
    learning rate and constants taken from its optimizer's param groups; the update is torch's, per member.

    Every per-member constant is a (G, 1, ..., 1) tensor made once (and again when members leave), and Adam's
    bias corrections are computed once per step for all parameters together, so a step costs a fixed number of
    tensor operations per parameter, whatever the number of members."""

    def __init__(self, jobs: list, stack: StackedMLP):
        self.kind = optimizer_kind(jobs[0].opt)
        self.decoupled = type(jobs[0].opt) is torch.optim.AdamW or \
            bool(jobs[0].opt.param_groups[0].get("decoupled_weight_decay"))
        keys = ("lr", "momentum", "weight_decay") if self.kind == "sgd" else ("lr", "beta1", "beta2", "eps",
                                                                            "weight_decay")
        # self.hyper[key][param index] = list over members
        self.hyper = {k: [[] for _ in stack.names] for k in keys}
        for job in jobs:
            group_of = {id(p): g for g in job.opt.param_groups for p in g["params"]}
            for i, p in enumerate(job.model.parameters()):
                g = group_of[id(p)]
                values = dict(g, beta1=g.get("betas", (0, 0))[0], beta2=g.get("betas", (0, 0))[1])
                for k in keys:
                    self.hyper[k][i].append(float(values[k]))
        self.state = [dict() for _ in stack.names]
        self.steps = 0
        self._tensors(stack.params)

    def _tensors(self, params):
        t = {k: [_column(v, p, p.ndim - 1) for v, p in zip(vals, params)] for k, vals in self.hyper.items()}
        t["neg_lr"] = [-lr for lr in t["lr"]]
        self.uses = {k: any(x != 0 for vals in self.hyper[k] for x in vals) for k in self.hyper}
        if self.kind == "adam":
            # as torch does, 1 - beta and 1 - lr * wd in Python floats (double), rounded once to the dtype
            h = self.hyper

            def derived(f, *keys):
                return [_column([f(*xs) for xs in zip(*per_member)], p, p.ndim - 1)
                        for p, per_member in zip(params, zip(*(h[k] for k in keys)))]

            t["one_minus_b1"] = derived(lambda b: 1 - b, "beta1")
            t["one_minus_b2"] = derived(lambda b: 1 - b, "beta2")
            t["decay"] = derived(lambda lr, wd: 1 - lr * wd, "lr", "weight_decay")
            # every parameter's betas and learning rate, (P, G) in double: the bias corrections of a step
            # are then a few operations on these, not a few per parameter
            like = params[0]
            self._b1, self._b2, self._lr = (torch.tensor(self.hyper[k], dtype=torch.float64, device=like.device)
                                            for k in ("beta1", "beta2", "lr"))
        self.t = t

    @torch.no_grad()
    def step(self, params: list, grads: list) -> None:
        self.steps += 1
        if self.kind == "sgd":
            for i, (p, g) in enumerate(zip(params, grads)):
                self._sgd(i, p, g)
            return
        # torch computes the bias corrections in Python floats (double); so do we, then round once to float32
        step_size = (self._lr / (1 - self._b1 ** self.steps)).to(params[0].dtype)
        bc2_sqrt = (1 - self._b2 ** self.steps).sqrt().to(params[0].dtype)
        for i, (p, g) in enumerate(zip(params, grads)):
            shape = (-1,) + (1,) * (p.ndim - 1)
            self._adam(i, p, g, step_size[i].reshape(shape), bc2_sqrt[i].reshape(shape))

    def _sgd(self, i, p, g):
        t, state = self.t, self.state[i]
        if self.uses["weight_decay"]:
            g = torch.addcmul(g, t["weight_decay"][i], p)  # g + wd * p, as torch's grad.add(p, alpha=wd)
        if self.uses["momentum"]:
            buf = state.get("buf")
            if buf is None:
                buf = state["buf"] = g.clone()
            else:
                buf.mul_(t["momentum"][i]).add_(g)
            g = buf
        p.addcmul_(t["neg_lr"][i], g)

    def _adam(self, i, p, g, step_size, bc2_sqrt):
        t, state = self.t, self.state[i]
        if self.uses["weight_decay"]:
            if self.decoupled:
                p.mul_(t["decay"][i])
            else:
                g = torch.addcmul(g, t["weight_decay"][i], p)
        if "m" not in state:
            state["m"], state["v"] = torch.zeros_like(p), torch.zeros_like(p)
        m, v = state["m"], state["v"]
        m.lerp_(g, t["one_minus_b1"][i])
        v.mul_(t["beta2"][i]).addcmul_(g, g * t["one_minus_b2"][i])
        denom = (v.sqrt() / bc2_sqrt).add_(t["eps"][i])
        p.sub_(step_size * m / denom)

    def select(self, keep: list, stack: StackedMLP, width: int) -> None:
        """Keep the members at rows ``keep``, their state narrowed to ``width`` as ``stack.take`` does."""
        self.hyper = {k: [[vals[j] for j in keep] for vals in per_param] for k, per_param in self.hyper.items()}
        names = sorted({k for st in self.state for k in st})
        for k in names:
            kept = stack.take(keep, [st[k] for st in self.state], width)
            for st, s in zip(self.state, kept):
                st[k] = s
        self._tensors(stack.params)
