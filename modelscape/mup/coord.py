"""The coordinate checks: train a model a few steps at several widths (or depths) and record the size of every
layer's output (flat in width under muP, growing under sp; flat in depth under the depth rules), and their figure."""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from modelscape.mup.apply import parameterize
from modelscape.mup.depth import residual_blocks
from modelscape.mup.rules import EMBEDDINGS, NORMS, WEIGHT_LAYERS
from modelscape.mup.shapes import Shapes, build_shapes
from modelscape.utils import match_shapes

__all__ = ["coord_check", "coord_check_depth", "plot_coord_check"]


def _recorder(store: dict, path: str):
    # A closure is fine here: these hooks live only for the duration of coord_check and are never copied.
    def hook(module, inputs, output):
        store.setdefault(path, []).append(output.detach().float().flatten())
    return hook


def _recorded_layers(model: nn.Module) -> list:
    """(path, module) of the layers a coordinate check records: weight layers and norms, in module order."""
    recorded = WEIGHT_LAYERS + EMBEDDINGS + NORMS
    return [(path, mod) for path, mod in model.named_modules() if isinstance(mod, recorded)]


def _groups(model: nn.Module, by_depth: bool) -> dict:
    """``{name: [module paths]}`` of what a check records. Across widths every layer is its own name. Across
    depths a layer inside a residual block is named with the block's index replaced by ``*`` (``blocks.*.fc2``)
    and pooled over the blocks, so models of different depths share names; ``residual`` is the stream after
    the last block."""
    layers = [p for p, _ in _recorded_layers(model)]
    if not by_depth:
        return {p: [p] for p in layers}
    blocks = [path for path, _, _ in residual_blocks(model)]
    if not blocks:
        raise ValueError(f"a depth coordinate check needs residual blocks, and {type(model).__name__} declares none "
                         "(a module with residual_branches: see modelscape.mup.depth)")
    out = {}
    for path in layers:
        name, owner = path, next((b for b in blocks if path.startswith(f"{b}.")), None)
        if owner is not None:
            head, _, last = owner.rpartition(".")
            name = (f"{head}.*" if last.isdigit() else "*") + path[len(owner):]
        out.setdefault(name, []).append(path)
    out["residual"] = [blocks[-1]]
    return out


def _record(model: nn.Module, groups: dict, X) -> tuple:
    """The model's output on ``X`` and ``{name: every recorded output of the name's modules, flattened}``."""
    modules = dict(model.named_modules())
    raw: dict = {}
    handles = [modules[p].register_forward_hook(_recorder(raw, p)) for paths in groups.values() for p in paths]
    try:
        out = model(X)
    finally:
        for h in handles:
            h.remove()
    return out, {name: torch.cat([t for p in paths for t in raw.get(p, [])])
                 for name, paths in groups.items() if any(p in raw for p in paths)}


def _trace(model, opt, groups, batches, loss_fn, measure) -> np.ndarray:
    """(steps + 1, layers) sizes of the recorded outputs: step ``s`` is the forward pass on batch ``s`` after
    ``s`` updates."""
    initial = copy.deepcopy(model) if measure == "delta" else None
    model.train()
    rows = []
    for s, (X, y) in enumerate(batches):
        out, now = _record(model, groups, X)
        if initial is not None:
            with torch.no_grad():
                _, then = _record(initial, groups, X)
        row = []
        for name in groups:
            h = now.get(name, torch.full((1,), float("nan")))
            if initial is not None and name in then:
                h = h - then[name]
            row.append(h.pow(2).mean().sqrt())
        rows.append(torch.stack(row))
        if s == len(batches) - 1:
            break
        loss = loss_fn(match_shapes(out, y), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return torch.stack(rows).cpu().numpy()


def _check(dim, values, build, batch_fn, steps, optimizer, lr, loss_fn, seed, measure, device, **attrs):
    """The loop both checks share: per value of ``dim``, ``build(value, example)`` -> (model, optimizer), then
    ``_trace``; a labelled DataArray."""
    import xarray as xr  # worker start-up: workers never load xarray

    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if measure not in ("rms", "delta"):
        raise ValueError(f"measure must be 'rms' or 'delta', got {measure!r}")
    values = [int(v) for v in values]
    loss_fn = nn.MSELoss() if loss_fn is None else loss_fn
    batches = [batch_fn(s) for s in range(steps + 1)]
    if device is not None:
        batches = [tuple(t.to(device) for t in b) for b in batches]
    names, traces = None, []
    for value in values:
        torch.manual_seed(seed)
        model, opt = build(value, batches[0][0])
        groups = _groups(model, dim == "depth")
        if names is None:
            names = list(groups)
        elif set(groups) != set(names):
            raise ValueError(f"at {dim} {value} the model records layers {list(groups)}, but at {dim} {values[0]} "
                             f"it recorded {names}; a coordinate check compares the same layers across {dim}s")
        traces.append(_trace(model, opt, {n: groups[n] for n in names}, batches, loss_fn, measure))
    opt_name = getattr(optimizer, "__name__", str(optimizer))
    return xr.DataArray(np.stack(traces).astype(np.float64), dims=(dim, "step", "layer"),
                        coords={dim: values, "step": np.arange(steps + 1), "layer": names}, name=measure,
                        attrs={"optimizer": opt_name, "lr": float(lr), "measure": measure, **attrs})


def _default_lr(optimizer, lr):
    if lr is not None:
        return lr
    return 0.1 if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.SGD) else 0.01


def coord_check(model_fn: Callable[[int], nn.Module], widths: Sequence[int], batch_fn: Callable, steps: int = 5,
                param: str = "mup", optimizer=torch.optim.SGD, lr: float | None = None,
                loss_fn: Callable | None = None, seed: int = 0, measure: str = "rms", relu_gain: bool = True,
                device=None, base_width: int | None = None, **opt_kwargs):
    """Train ``model_fn(width)`` for ``steps`` steps at each width and record the size of every layer's output.

    Each model is built after ``torch.manual_seed(seed)``, parameterized with ``param`` and ``optimizer`` (lr
    defaults to 0.1 for SGD, 0.01 otherwise; ``opt_kwargs`` go to the optimizer and ``parameterize``, e.g.
    ``depth_alpha``) and trained on ``batch_fn(0..steps-1)`` with ``loss_fn`` (MSE by default). The batches are
    drawn once, so every width sees the same data. Step ``s`` is the forward pass on ``batch_fn(s)`` after
    ``s`` updates, ``s`` in ``0..steps``; for each Linear/Conv/Embedding/norm layer it records, over batch and
    features, ``measure``: ``'rms'``, the RMS of the layer's output (multiplier included), or ``'delta'``, the
    RMS of its change from the initial model on the same batch (zero at step 0; more sensitive, since init
    dominates 'rms').

    ``base_width``: parameterize relative to ``model_fn(base_width)`` (muTransfer's rules; built on the meta
    device), else the absolute rules; either way ``model_fn(2 * width)`` tells which dimensions grow.

    Returns an ``xarray.DataArray`` named ``measure`` with dims ``(width, step, layer)`` (layer = module path)
    and attrs param, optimizer, lr, measure. Under muP the curves are flat in width; under sp they grow.
    """
    lr = _default_lr(optimizer, lr)

    def build(width, example):
        model = model_fn(width)
        if device is not None:
            model = model.to(device)
        shapes = {} if param == "sp" else {"probe": build_shapes(lambda: model_fn(2 * width), fallback_cpu=False)}
        shapes = {k: v[0] for k, v in shapes.items() if v is not None}
        if base_width is not None and param != "sp":
            base, d_heads = build_shapes(lambda: model_fn(base_width))
            shapes["base"] = Shapes(base, None, d_heads)
        return model, parameterize(model, param, optimizer, lr, relu_gain=relu_gain, example_input=example,
                                   **shapes, **opt_kwargs)

    return _check("width", widths, build, batch_fn, steps, optimizer, lr, loss_fn, seed, measure, device,
                  param=param)


def coord_check_depth(model_fn: Callable[[int], nn.Module], depths: Sequence[int], batch_fn: Callable,
                      steps: int = 3, param: str = "mup", optimizer=torch.optim.Adam, lr: float | None = None,
                      depth_alpha: float = 0.0, base_depth: int | None = None, loss_fn: Callable | None = None,
                      seed: int = 0, measure: str = "delta", device=None, **opt_kwargs):
    """The depth coordinate check: train ``model_fn(depth)`` (a model with residual blocks, at one width) for
    ``steps`` steps at each depth and record the size of every layer's output, and of the residual stream.

    As ``coord_check``, with depth for width: ``depth_alpha`` and ``base_depth`` are ``parameterize``'s depth
    rules (0: none), ``param`` its width rules. A layer inside a residual block is pooled over the blocks
    (``blocks.*.fc2``: the RMS over every block's output), so models of different depths compare; the layer
    ``residual`` is the stream after the last block. ``measure`` defaults to ``'delta'``: the change from init
    after ``s`` steps, which the depth rules keep flat in depth (without them the stream's change grows with
    depth). Returns a DataArray with dims ``(depth, step, layer)`` and attrs param, optimizer, lr, measure,
    depth_alpha, base_depth (None written as 0).
    """
    lr = _default_lr(optimizer, lr)

    def build(depth, example):
        model = model_fn(depth)
        if device is not None:
            model = model.to(device)
        return model, parameterize(model, param, optimizer, lr, example_input=example, depth_alpha=depth_alpha,
                                   base_depth=base_depth, **opt_kwargs)

    return _check("depth", depths, build, batch_fn, steps, optimizer, lr, loss_fn, seed, measure, device,
                  param=param, depth_alpha=float(depth_alpha), base_depth=int(base_depth or 0))


def plot_coord_check(da, path=None, title: str | None = None, max_cols: int = 6):
    """The coordinate-check figure: one panel per step, RMS of each layer's output vs width (or depth), log-log.

    ``da`` is ``coord_check``'s or ``coord_check_depth``'s DataArray. Returns a ``matplotlib.figure.Figure``
    (made without pyplot, so it neither needs a display nor changes the session's backend) and saves it to
    ``path`` (PNG, PDF, ...) if given.
    """
    from matplotlib import colormaps  # optional: only a figure needs matplotlib
    from matplotlib.figure import Figure  # optional: only a figure needs matplotlib

    delta = da.attrs.get("measure") == "delta"
    ylabel = "RMS of change in layer output" if delta else "RMS of layer output"
    # A change from init is zero at step 0, which a log axis cannot show.
    steps = [s for s in da["step"].values if not (delta and s == 0)]
    if not steps:
        raise ValueError("nothing to plot: the coordinate check has no step with a nonzero measure")
    dim = da.dims[0]  # width, or depth
    widths = np.asarray(da[dim].values)
    ncols = min(len(steps), max_cols)
    nrows = -(-len(steps) // ncols)
    fig = Figure(figsize=(2.8 * ncols + 1.6, 2.6 * nrows + 0.6), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharey=True, squeeze=False).ravel()
    for ax, step in zip(axes, steps):
        for i, layer in enumerate(da["layer"].values):
            # tab20 past ten layers: the default cycle repeats its colours after ten
            color = colormaps["tab20"](i % 20) if da.sizes["layer"] > 10 else f"C{i}"
            ax.plot(widths, da.sel(step=step, layer=layer).values, marker="o", ms=3, label=str(layer), color=color)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"step {step}")
        ax.grid(True, which="major", alpha=0.3)
    for ax in axes[len(steps):]:
        ax.set_visible(False)
    for ax in axes[max(0, len(steps) - ncols):len(steps)]:  # the lowest panel of each column
        ax.set_xlabel(dim)
    for ax in axes[::ncols]:
        ax.set_ylabel(ylabel)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", title="layer", fontsize="small")
    if title is None:
        attrs = da.attrs
        title = "coordinate check"
        if "param" in attrs:
            title += f": {attrs['param']}, {attrs.get('optimizer', '?')}, lr={attrs.get('lr', '?')}"
        if dim == "depth":
            title += f", depth_alpha={attrs.get('depth_alpha', 0):g}"
    fig.suptitle(title)
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
