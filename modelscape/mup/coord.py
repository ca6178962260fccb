"""The coordinate check: train a model a few steps at several widths and record the size of every layer's output
(flat in width under muP, growing under sp), and its figure."""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from modelscape.mup.apply import parameterize
from modelscape.mup.rules import EMBEDDINGS, NORMS, WEIGHT_LAYERS
from modelscape.mup.shapes import Shapes, build_shapes
from modelscape.utils import match_shapes

__all__ = ["coord_check", "plot_coord_check"]


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
                device=None, base_width: int | None = None, **opt_kwargs):
    """Train ``model_fn(width)`` for ``steps`` steps at each width and record the size of every layer's output.

    Each model is built after ``torch.manual_seed(seed)``, parameterized with ``param`` and ``optimizer`` (lr
    defaults to 0.1 for SGD, 0.01 otherwise; ``opt_kwargs`` go to the optimizer) and trained on
    ``batch_fn(0..steps-1)`` with ``loss_fn`` (MSE by default). The batches are drawn once, so every width
    sees the same data. Step ``s`` is the forward pass on ``batch_fn(s)`` after ``s`` updates, ``s`` in
    ``0..steps``; for each Linear/Conv/Embedding/norm layer it records, over batch and features, ``measure``:
    ``'rms'``, the RMS of the layer's output (multiplier included), or ``'delta'``, the RMS of its change
    from the initial model on the same batch (zero at step 0; more sensitive, since init dominates 'rms').

    ``base_width``: parameterize relative to ``model_fn(base_width)`` (muTransfer's rules; built on the meta
    device), else the absolute rules; either way ``model_fn(2 * width)`` tells which dimensions grow.

    Returns an ``xarray.DataArray`` named ``measure`` with dims ``(width, step, layer)`` (layer = module path)
    and attrs param, optimizer, lr, measure. Under muP the curves are flat in width; under sp they grow.
    """
    import xarray as xr  # worker start-up: workers never load xarray

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
        shapes = {} if param == "sp" else {"probe": build_shapes(lambda: model_fn(2 * width), fallback_cpu=False)}
        shapes = {k: v[0] for k, v in shapes.items() if v is not None}
        if base_width is not None and param != "sp":
            base, d_heads = build_shapes(lambda: model_fn(base_width))
            shapes["base"] = Shapes(base, None, d_heads)
        opt = parameterize(model, param, optimizer, lr, relu_gain=relu_gain, example_input=batches[0][0],
                           **shapes, **opt_kwargs)
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
    from matplotlib.figure import Figure  # optional: only a figure needs matplotlib

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
