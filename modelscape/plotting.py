"""The figures of the field, drawn from a sweep's labelled results.

Every function takes a ``SweepResults`` (what ``run_job_iterator`` and ``modelscape.load`` return) or its
``xarray.Dataset`` (``res.to_xarray()``), and names the sweep axes it uses (``color="WIDTH"``,
``x="N_SAMPLES"``), never positions. Sweep axes a figure does not use must hold a single value, or be fixed
with ``sel={"GAMMA": 1.0}``; the trial axis (``trial_axis``, default ``"trial"``) is averaged over, with the
spread over trials drawn. Each function returns a ``matplotlib.figure.Figure`` made without pyplot (no display
needed, the session's backend untouched; in a notebook, run ``%matplotlib inline`` once and make the figure
the cell's last expression to show it) and saves it when given ``path=`` (the suffix picks the format:
``.png``, ``.pdf``, ``.svg``).

- ``plot_loss_curves``: train or test loss along training, one colour per value of an axis, one panel per
  value of another, mean over trials with a shaded spread, log-log.
- ``plot_timekeys``: steps to reach each loss threshold against an axis, log-log, trials as error bars;
  jobs that never reached a threshold are drawn at the step budget as open markers, not dropped.
- ``plot_lr_transfer``: final loss against learning rate, one curve per width, one panel per
  parameterization with a shared y-axis, the best learning rate of each width starred.
- ``plot_coord_check``: the coordinate check of ``modelscape.mup.coord_check``.
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Iterable

import numpy as np
import xarray as xr

from modelscape.mup import coord_check, plot_coord_check  # noqa: F401  (re-exported: the coordinate check's figure)
from modelscape.results import NO_RESULT, axis_label
from modelscape.transfer import best_over_trials, drift

__all__ = ["plot_loss_curves", "plot_timekeys", "plot_lr_transfer", "plot_coord_check", "coord_check"]

DPI = 110
_NOT_REACHED = dict(marker="o", mfc="white", ms=7, mew=1.5, ls="none", zorder=4)
_BROKEN = dict(marker="X", ms=7, ls="none", zorder=4)


# --------------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------------

def _dataset(res):
    """SweepResults or Dataset -> Dataset."""

    if isinstance(res, xr.Dataset):
        return res
    if hasattr(res, "to_xarray"):
        return res.to_xarray()
    raise TypeError(f"expected SweepResults or its xarray.Dataset (res.to_xarray()), got {type(res).__name__}")


def _sweep_axes(ds) -> list:
    """The sweep axes: the dimensions of the per-job ``status`` variable."""
    if "status" in ds:
        return list(ds["status"].dims)
    return [d for d in ds.dims if d not in ("threshold", "step", "eval_step")]


def _select(ds, keep: Iterable[str], sel: dict | None, what: str):
    """Fix the axes named in ``sel``, squeeze the other axes not in ``keep``; error on ambiguous ones."""
    axes = _sweep_axes(ds)
    keep = [k for k in keep if k is not None]
    for name in keep:
        if name not in axes:
            raise KeyError(f"{what}: no sweep axis {name!r}; the axes are {axes}")
    sel = dict(sel or {})
    for name in sel:
        if name not in axes:
            raise KeyError(f"{what}: sel names {name!r}, which is not a sweep axis; the axes are {axes}")
        if name in keep:
            raise ValueError(f"{what}: axis {name!r} is both selected (sel) and plotted; drop one")
    if sel:
        ds = ds.sel({k: axis_label(v) for k, v in sel.items()})
    for name in _sweep_axes(ds):
        if name in keep or name not in ds.dims:
            continue
        n = ds.sizes[name]
        if n == 1:
            ds = ds.isel({name: 0})
        else:
            vals = [_fmt(v) for v in ds[name].values]
            raise ValueError(f"{what}: sweep axis {name!r} has {n} values ({', '.join(vals)}) and the figure does "
                             f"not use it; fix one with sel={{{name!r}: ...}} or plot it (color=/facet=/x=)")
    return ds


def _values(ds, name) -> list:
    return [axis_label(v) for v in ds[name].values] if name is not None else [None]


def _fmt(v) -> str:
    v = axis_label(v)
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _numeric(values) -> bool:
    return all(isinstance(axis_label(v), (int, float)) and not isinstance(axis_label(v), bool) for v in values)


def _colors(values):
    """Sequential colours for a numeric axis (small -> dark), categorical ones otherwise."""
    from matplotlib import colormaps  # optional until a figure is drawn: the module imports without it

    n = len(values)
    if _numeric(values) and n > 1:
        cmap = colormaps["viridis"]
        return [cmap(x) for x in np.linspace(0.0, 0.85, n)]
    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _figure(n_panels: int, max_cols: int = 4, panel=(4.2, 3.4), sharey=True, sharex=True):
    from matplotlib.figure import Figure  # optional until a figure is drawn: the module imports without it

    ncols = n_panels if n_panels <= 3 else math.ceil(math.sqrt(n_panels))  # 4 panels -> 2 x 2
    ncols = max(1, min(ncols, max_cols))
    nrows = -(-n_panels // ncols)
    fig = Figure(figsize=(panel[0] * ncols + 1.4, panel[1] * nrows + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharex=sharex, sharey=sharey, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, list(axes[:n_panels]), ncols


def _save(fig, path):
    if path is not None:
        path = os.fspath(path)
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        fig.savefig(path, dpi=DPI)
    return fig


def _legend(fig, axes, title):
    """One legend for the whole figure, outside the panels on the right, without duplicate labels."""
    handles, labels, seen = [], [], set()
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in seen:
                seen.add(lab)
                handles.append(h)
                labels.append(lab)
    if handles:
        # centred on the right: at the top it would cover the end of a long figure title
        fig.legend(handles, labels, title=title, loc="outside right center", fontsize="small",
                   title_fontsize="small")


def _tidy_log_axes(axes):
    """Readable log ticks: over less than two decades, ticks at 1, 2, 5 x 10^k written as plain numbers;
    never labelled minor ticks (they collide)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # optional until a figure is drawn

    for ax in axes:
        for axis, lims in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            if axis.get_scale() != "log":
                continue
            lo, hi = sorted(lims)
            axis.set_minor_formatter(NullFormatter())
            if lo > 0 and math.log10(hi / lo) < 2:
                axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def _ticks_at(axes, values, max_ticks=10):
    """Put the x ticks at the swept values themselves (few, positive numbers), written plainly."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator  # optional until drawn

    vals = sorted(float(v) for v in values)
    if not vals or len(vals) > max_ticks or vals[0] <= 0:
        return
    # long labels (0.00195) of many ticks run into each other: label every other tick, the largest always
    step = 2 if len(vals) > 6 else 1
    shown = set(vals[::-1][::step])
    for ax in axes:
        ax.xaxis.set_major_locator(FixedLocator(vals))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}" if v in shown else ""))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())


def _label_axes(axes, ncols, xlabel, ylabel):
    """x labels (and tick labels) under every panel with no panel below it, y labels on the left column."""
    for i, ax in enumerate(axes):
        if i + ncols >= len(axes):
            ax.set_xlabel(xlabel)
            ax.xaxis.set_tick_params(which="both", labelbottom=True)
        if i % ncols == 0:
            ax.set_ylabel(ylabel)


def _trial_reduce(arr, axis_index):
    """Mean, min, max and std over the trial axis, ignoring NaN (all-NaN slices stay NaN)."""

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return (np.nanmean(arr, axis=axis_index), np.nanmin(arr, axis=axis_index),
                np.nanmax(arr, axis=axis_index), np.nanstd(arr, axis=axis_index))


def _as_trials(da, trial_axis, dims):
    """``da`` transposed to ``dims + [trial]`` as a float array (a trial axis of length 1 if there is none)."""
    if trial_axis is not None and trial_axis in da.dims:
        return np.asarray(da.transpose(*dims, trial_axis).values, dtype=float)
    return np.asarray(da.transpose(*dims).values, dtype=float)[..., None]


def _panel_title(name, value):
    return f"{name} = {_fmt(value)}" if name is not None else None


# --------------------------------------------------------------------------------------------------------
# Loss curves
# --------------------------------------------------------------------------------------------------------

def plot_loss_curves(res, color: str, facet: str | None = None, which: str = "train", trial_axis: str = "trial",
                     spread: str | None = "minmax", sel: dict | None = None, logx: bool | None = None,
                     logy: bool = True, thresholds: bool = True, path=None, title: str | None = None):
    """Loss along training: one line per value of ``color``, one panel per value of ``facet``.

    Args:
        res: SweepResults or its Dataset, from a sweep run with ``ONLYTHRESHOLDS=False`` (curves recorded).
        color: the sweep axis whose values get one colour each (legend titled by the axis).
        facet: a sweep axis whose values get one panel each (shared axes), or None for one panel.
        which: ``"train"`` (the EMA train loss at every step, ``train_curve``) or ``"test"`` (the test loss at
            every evaluation, ``test_curve``).
        trial_axis: the axis averaged over; the line is the mean, the band the spread over trials.
        spread: ``"minmax"`` (band from the lowest to the highest trial), ``"std"`` (mean +- one standard
            deviation) or None.
        sel: values fixing the other sweep axes, e.g. ``{"LR": 0.1}``.
        logx: log-scaled steps, linear between 0 and 1 (a symlog axis) so that step 0, the model at
            initialization, is drawn at the left edge; default: when the curves span over 100 steps.
        logy: log-scaled loss.
        thresholds: draw the LOSS_CHECKPOINTS as dotted lines (train loss only).
        path: save the figure there (PNG, PDF, ...).

    Returns the Figure.
    """
    if which not in ("train", "test"):
        raise ValueError(f"which must be 'train' or 'test', got {which!r}")
    if spread not in ("minmax", "std", None):
        raise ValueError(f"spread must be 'minmax', 'std' or None, got {spread!r}")
    ds = _dataset(res)
    var, step_dim = ("train_curve", "step") if which == "train" else ("test_curve", "eval_step")
    if var not in ds:
        raise ValueError(f"no {which} loss curves in these results ({var} is missing): run the sweep with "
                         "ONLYTHRESHOLDS=False to record curves, or plot final values instead")
    if color == facet:
        raise ValueError(f"color and facet are both {color!r}; give two different axes")
    keep = [color, facet] + ([trial_axis] if trial_axis in _sweep_axes(ds) else [])
    ds = _select(ds, keep, sel, "plot_loss_curves")
    trial = trial_axis if trial_axis in ds.dims else None
    steps = np.asarray(ds[step_dim].values, dtype=float)
    if logx is None:
        logx = steps.max(initial=0) > 100
    cvals, fvals = _values(ds, color), _values(ds, facet)
    colors = _colors(cvals)
    fig, axes, ncols = _figure(len(fvals))
    ylabel = "train loss (EMA)" if which == "train" else "test loss"
    for ax, fv in zip(axes, fvals):
        sub = ds.sel({facet: fv}) if facet is not None else ds
        for cv, col in zip(cvals, colors):
            da = sub[var].sel({color: cv})
            arr = _as_trials(da, trial, [step_dim])
            arr = arr[..., np.isfinite(arr).any(axis=0)]  # drop failed trials (counted in the panel note)
            mean, lo, hi, sd = _trial_reduce(arr, -1)
            # The mean only where every trial still runs (jobs stop at different steps once their thresholds
            # are crossed), so it does not jump where one ends; the band the same steps, so it ends with its line.
            full = np.isfinite(arr).all(-1) if arr.shape[-1] else np.zeros(len(steps), bool)
            ok = full & np.isfinite(mean)
            if logy:
                ok &= mean > 0
            if not ok.any():
                ax.plot([], [], color=col, label=_fmt(cv) + " (no data)")
                continue
            # test losses are sparse (every EVAL_EVERY steps): a marker shows where each was measured
            ax.plot(steps[ok], mean[ok], color=col, lw=1.6, label=_fmt(cv),
                    **(dict(marker="o", ms=3) if which == "test" else {}))
            if spread is not None and arr.shape[-1] > 1:
                low, high = (lo, hi) if spread == "minmax" else (mean - sd, mean + sd)
                if logy:
                    low = np.where(low > 0, low, np.nan)
                ax.fill_between(steps[ok], low[ok], high[ok], color=col, alpha=0.2, lw=0)
        _note_broken(ax, sub["status"])
        if thresholds and which == "train" and "thresholds" in sub:
            drawn = False
            for thr in _threshold_values(sub):
                if np.isfinite(thr) and (thr > 0 or not logy):
                    ax.axhline(thr, color="0.5", ls=":", lw=1, zorder=0)
                    drawn = True
            if drawn:
                ax.plot([], [], color="0.5", ls=":", lw=1, label="loss thresholds")
        if logx:  # linear on [0, 1]: step 0 stays on the axis
            ax.set_xscale("symlog", linthresh=1.0, linscale=0.5)
            ax.set_xlim(left=0)
        ax.set_yscale("log" if logy else "linear")
        ax.set_title(_panel_title(facet, fv))
        ax.grid(True, which="major", alpha=0.3)
    _label_axes(axes, ncols, "training step" if which == "train" else "training step (test evaluations)", ylabel)
    _tidy_log_axes(axes)
    n_trials = ds.sizes[trial] if trial else 1
    band = {"minmax": "band: min-max", "std": "band: +-1 std", None: ""}[spread]
    note = f"mean of {n_trials} trials, {band}" if n_trials > 1 and band else \
        (f"mean of {n_trials} trials" if n_trials > 1 else "")
    _legend(fig, axes, color)
    fig.suptitle(title or f"{which} loss by {color}" + (f" and {facet}" if facet else "")
                 + (f" ({note})" if note else ""), fontsize="medium")
    return _save(fig, path)


def _note_broken(ax, status):
    """Say in the panel's corner how many of its jobs failed or are missing (they have no curve)."""
    vals = np.asarray(status.values).astype(str).ravel()
    parts = [f"{(vals == s).sum()} {s}" for s in (*NO_RESULT, "missing") if (vals == s).any()]
    if parts:
        ax.text(0.02, 0.03, " / ".join(parts) + " (not drawn)", transform=ax.transAxes, fontsize="x-small",
                color="firebrick", va="bottom")


def _threshold_values(ds) -> list:
    """The loss thresholds, one per threshold index (the median over jobs, which share them)."""

    arr = np.asarray(ds["thresholds"].values, dtype=float)
    arr = arr.reshape(-1, arr.shape[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return list(np.nanmedian(arr, axis=0))


# --------------------------------------------------------------------------------------------------------
# Timekeys
# --------------------------------------------------------------------------------------------------------

def plot_timekeys(res, x: str, color: str | None = None, threshold=None, trial_axis: str = "trial",
                  sel: dict | None = None, xlabel: str | None = None, path=None, title: str | None = None):
    """Steps to reach each loss threshold against the sweep axis ``x``, log-log, one panel per threshold.

    Args:
        res: SweepResults or its Dataset.
        x: the sweep axis on the horizontal axis (sample size, width, ...).
        color: a sweep axis whose values get one line each, or None.
        threshold: None (every threshold, one panel each), an index into LOSS_CHECKPOINTS, or a list of them.
        trial_axis: the axis over which the error bars run: the marker is the mean over the trials that
            reached the threshold, the bar spans the fastest to the slowest of them.
        sel: values fixing the other sweep axes.
        xlabel: the horizontal axis label (default: the axis name).
        path: save the figure there.

    Points are never dropped silently: a job that stopped at MAX_ITER without reaching the threshold is an
    open circle on the dotted line of the step budget (its timekey is at least that); when only some trials
    reached it the filled marker averages those and ``k/n`` tells how many did. Diverged and failed jobs are
    crosses on the same line.

    Returns the Figure.
    """
    ds = _dataset(res)
    if "timekeys" not in ds:
        raise ValueError("no timekeys in these results: every job failed, or none had thresholds")
    if x == color:
        raise ValueError(f"x and color are both {x!r}; give two different axes")
    keep = [x, color] + ([trial_axis] if trial_axis in _sweep_axes(ds) else [])
    ds = _select(ds, keep, sel, "plot_timekeys")
    trial = trial_axis if trial_axis in ds.dims else None
    n_thr = ds.sizes["threshold"]
    thr_idx = list(range(n_thr)) if threshold is None else \
        ([threshold] if isinstance(threshold, (int, np.integer)) else list(threshold))
    for j in thr_idx:
        if not -n_thr <= j < n_thr:
            raise IndexError(f"threshold index {j} out of range: there are {n_thr} thresholds")
    thr_vals = _threshold_values(ds)
    xvals, cvals = _values(ds, x), _values(ds, color)
    numeric_x = _numeric(xvals)
    xpos = np.asarray(xvals, dtype=float) if numeric_x else np.arange(len(xvals), dtype=float)
    logx = numeric_x and bool(np.all(xpos > 0))
    colors = _colors(cvals) if color is not None else ["C0"]
    status = ds["status"]
    steps_run = np.asarray(ds["steps"].values, dtype=float)
    budget = np.nanmax(steps_run) if np.isfinite(steps_run).any() else np.nan
    fig, axes, ncols = _figure(len(thr_idx), panel=(4.0, 3.4))
    for ax, j in zip(axes, thr_idx):
        tk = ds["timekeys"].isel(threshold=j)
        missing_any = False
        for cv, col in zip(cvals, colors):
            sub_tk = tk.sel({color: cv}) if color is not None else tk
            sub_st = status.sel({color: cv}) if color is not None else status
            t = _as_trials(sub_tk, trial, [x])
            st = _as_trials_str(sub_st, trial, [x])
            mean, lo, hi, _ = _trial_reduce(t, -1)
            reached = np.isfinite(t)
            k = reached.sum(-1)
            n = t.shape[-1]
            ok = k > 0
            label = _fmt(cv) if color is not None else "mean over trials"
            if ok.any():
                # a threshold crossed at step 0 (the smoothed loss started below it) sits at 1 on the log axis
                mean, lo, hi = np.maximum(mean, 1.0), np.maximum(lo, 1.0), np.maximum(hi, 1.0)
                yerr = np.vstack([mean - lo, hi - mean])[:, ok]
                ax.errorbar(xpos[ok], mean[ok], yerr=yerr if n > 1 else None, color=col, marker="o", ms=5,
                            lw=1.4, capsize=3, label=label)
            else:
                ax.plot([], [], color=col, marker="o", label=label + " (never reached)")
            for i in np.flatnonzero(k < n):
                missing_any = True
                kinds = set(st[i][~reached[i]])
                broken = kinds & {"diverged", *NO_RESULT, "missing"}
                lost = kinds - broken
                if lost:
                    ax.plot([xpos[i]], [budget], color=col, **_NOT_REACHED)
                if broken:
                    ax.plot([xpos[i]], [budget], color=col, **_BROKEN)
                if 0 < k[i] < n:
                    ax.annotate(f"{k[i]}/{n}", (xpos[i], mean[i]), textcoords="offset points", xytext=(-16, 6),
                                fontsize="x-small", color=col)
        if missing_any and np.isfinite(budget):
            ax.axhline(budget, color="0.5", ls=":", lw=1, zorder=0)
            ax.plot([], [], color="0.3", label=f"not reached in {int(budget)} steps", **_NOT_REACHED)
            if np.isin(status.values, ["diverged", *NO_RESULT]).any():
                ax.plot([], [], color="0.3", label="diverged / failed", **_BROKEN)
        ax.set_yscale("log")
        if logx:
            ax.set_xscale("log")
        if not numeric_x:
            ax.set_xticks(xpos, [_fmt(v) for v in xvals])
        thr = thr_vals[j]
        ax.set_title(f"loss < {thr:.3g}" if np.isfinite(thr) else f"threshold {j}")
        ax.grid(True, which="major", alpha=0.3)
    _label_axes(axes, ncols, xlabel or x, "steps to reach threshold")
    _tidy_log_axes(axes)
    if logx:
        _ticks_at(axes, xvals)
    n_trials = ds.sizes[trial] if trial else 1
    _legend(fig, axes, color)
    note = f" (mean and range over {n_trials} trials)" if n_trials > 1 else ""
    fig.suptitle(title or f"steps to reach each loss threshold vs {x}{note}", fontsize="medium")
    return _save(fig, path)


def _as_trials_str(da, trial_axis, dims):
    if trial_axis is not None and trial_axis in da.dims:
        return np.asarray(da.transpose(*dims, trial_axis).values).astype(str)
    return np.asarray(da.transpose(*dims).values).astype(str)[..., None]


# --------------------------------------------------------------------------------------------------------
# Learning-rate transfer
# --------------------------------------------------------------------------------------------------------

def plot_lr_transfer(res, lr: str = "LR", width: str = "WIDTH", param: str | None = "PARAMETERIZATION",
                     metric: str = "train_loss", trial_axis: str = "trial", best: str = "min",
                     ceiling="auto", sel: dict | None = None, logy: bool = True, path=None,
                     title: str | None = None):
    """Final ``metric`` against learning rate: one curve per width, one panel per parameterization.

    Under muP the curves of all widths share their best learning rate (it *transfers*); under sp the best
    learning rate shrinks as width grows. The panels share their y-axis.

    Args:
        res: SweepResults or its Dataset.
        lr, width: the learning-rate and width axes.
        param: the parameterization axis (one panel per value, side by side), or None for a single panel.
        metric: a per-job variable: ``train_loss`` (final EMA train loss), ``test_loss``, or a scalar grab
            (``grab_<name>`` or just ``<name>``).
        trial_axis: the axis averaged over (the band spans min to max over trials).
        best: ``"min"`` (losses) or ``"max"`` (accuracies): which learning rate per width gets the star.
        ceiling: with ``best="min"``, a value above which a run counts as blown up (a loss that exploded
            without becoming NaN): drawn as a cross, not a point that squashes the rest of the plot. ``"auto"``:
            10 x the largest value any curve has at its smallest learning rate (where training is slow but
            stable); a number; or None for no ceiling.
        sel: values fixing the other sweep axes.
        logy: log-scaled metric.
        path: save the figure there.

    Diverged and failed jobs (or a non-finite metric) are crosses on the top edge of the panel, not a gap;
    jobs that were never run (status ``missing``) are left out.

    Each curve's optimum is also read between grid points (``modelscape.transfer``: a parabola in log2(LR)
    around its minimum, fitted to the mean over trials) and marked with a dotted vertical line; a note in each
    panel gives the drift of that optimum in octaves per doubling of ``width`` (0: the learning rate transfers). ``width``
    may be any axis: ``"DEPTH"`` for depth transfer.

    Returns the Figure; the best grid learning rates are in ``fig.best_lr`` as ``{param: {width: lr}}``, the
    fitted optima in ``fig.fitted_lr`` (same layout) and the drifts in ``fig.drift`` (``{param: octaves per
    doubling}``).
    """
    if best not in ("min", "max"):
        raise ValueError(f"best must be 'min' or 'max', got {best!r}")
    ds = _dataset(res)
    var = metric if metric in ds else f"grab_{metric}"
    if var not in ds:
        have = [v for v in ds.data_vars if v not in ("status",)]
        raise KeyError(f"no variable {metric!r} in these results; there are {have}")
    axes_all = _sweep_axes(ds)
    if param is not None and param not in axes_all:
        raise KeyError(f"plot_lr_transfer: no sweep axis {param!r} (the axes are {axes_all}); pass param=None "
                       "to plot a single parameterization")
    keep = [lr, width, param] + ([trial_axis] if trial_axis in axes_all else [])
    ds = _select(ds, keep, sel, "plot_lr_transfer")
    extra = [d for d in ds[var].dims if d not in keep]
    if extra:
        raise ValueError(f"{var} has dimensions {extra} besides the sweep axes: plot_lr_transfer needs a scalar "
                         "per job (a final loss, a scalar grab)")
    trial = trial_axis if trial_axis in ds.dims else None
    lrs, widths, params = _values(ds, lr), _values(ds, width), _values(ds, param)
    if not _numeric(lrs):
        raise TypeError(f"axis {lr!r} must hold numbers, got {lrs}")
    lr_arr = np.asarray(lrs, dtype=float)
    colors = _colors(widths)
    if best == "max" or ceiling is None:
        ceiling = np.inf
    elif ceiling == "auto":
        ceiling = _auto_ceiling(ds, var, lr, trial)
    # wide enough for the drift note under each panel
    fig, axes, _ = _figure(len(params), panel=(4.8, 3.6), sharex=True, sharey=True)
    fig.best_lr, fig.fitted_lr, fig.drift = {}, {}, {}
    any_broken = False
    for ax, pv in zip(axes, params):
        sub = ds.sel({param: pv}) if param is not None else ds
        best_here, fitted_here = {}, {}
        for wv, col in zip(widths, colors):
            vals = _as_trials(sub[var].sel({width: wv}), trial, [lr])
            st = _as_trials_str(sub["status"].sel({width: wv}), trial, [lr])
            # A job that never ran (a grid point one parameterization skips) is left out, not drawn as broken.
            absent = st == "missing"
            bad = (~np.isfinite(vals) | np.isin(st, ["diverged", *NO_RESULT]) | (vals > ceiling)) & ~absent
            if logy:
                bad |= (vals <= 0) & ~absent
            vals = np.where(bad | absent, np.nan, vals)
            mean, lo, hi, _ = _trial_reduce(vals, -1)
            ok = ~(bad | absent).all(-1)
            all_bad = ~ok & ~absent.all(-1)
            ax.plot(lr_arr[ok], mean[ok], color=col, marker="o", ms=4, lw=1.6, label=_fmt(wv))
            if vals.shape[-1] > 1 and ok.any():
                ax.fill_between(lr_arr[ok], lo[ok], hi[ok], color=col, alpha=0.15, lw=0)
            if all_bad.any():
                any_broken = True
                top = 0.97 - 0.035 * widths.index(wv)  # stacked so the crosses of different widths all show
                ax.plot(lr_arr[all_bad], np.full(all_bad.sum(), top), color=col, transform=ax.get_xaxis_transform(),
                        clip_on=False, **_BROKEN)
            if ok.any():
                m = np.where(ok, mean, np.inf if best == "min" else -np.inf)
                i = int(np.argmin(m) if best == "min" else np.argmax(m))
                best_here[wv] = float(lr_arr[i])
                ax.plot([lr_arr[i]], [mean[i]], marker="*", ms=15, color=col, mec="black", mew=0.8, ls="none",
                        zorder=5)
                if best == "min" and (lr_arr > 0).all():
                    fit = best_over_trials(lr_arr, vals.T, log_y=logy)
                    if math.isfinite(fit["x"]) and not fit["at_edge"]:
                        fitted_here[wv] = fit["x"]
                        ax.axvline(fit["x"], color=col, lw=1.0, ls=":", alpha=0.8)
        fig.best_lr[pv] = best_here
        fig.fitted_lr[pv] = fitted_here
        fig.drift[pv] = drift(list(fitted_here), list(fitted_here.values())) if _numeric(widths) else math.nan
        ax.set_xscale("log")
        ax.set_yscale("log" if logy else "linear")
        moved = fig.drift[pv]
        ax.set_title(_panel_title(param, pv))
        ax.set_xlabel(f"learning rate ({lr})" + (f"\noptimum moves {moved:+.2f} octaves per doubling of {width}"
                                                 if math.isfinite(moved) else ""))
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel(_metricaxis_label(metric))
    _tidy_log_axes(axes)
    _ticks_at(axes, lrs)
    axes[0].plot([], [], marker="*", ms=12, color="0.6", mec="black", mew=0.8, ls="none",
                 label="best LR of the width" if width == "WIDTH" else f"best LR at each {width}")
    if any(fig.fitted_lr.values()):
        axes[0].plot([], [], color="0.3", lw=1.0, ls=":", label="fitted optimum")
    if any_broken:
        label = "diverged / failed" + (f" / above {ceiling:.3g}" if np.isfinite(ceiling) else "")
        axes[0].plot([], [], color="0.3", label=label, **_BROKEN)
    _legend(fig, axes, width)
    n_trials = ds.sizes[trial] if trial else 1
    note = f" (mean of {n_trials} trials)" if n_trials > 1 else ""
    fig.suptitle(title or f"{_metricaxis_label(metric)} vs learning rate, by {width}{note}", fontsize="medium")
    return _save(fig, path)


def _auto_ceiling(ds, var, lr, trial):
    """10 x the largest trial-mean value at the smallest learning rate of any curve that has one."""

    da = ds[var].where(~ds["status"].isin(["diverged", *NO_RESULT, "missing"]))
    if trial is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            da = da.mean(trial, skipna=True)
    arr = np.moveaxis(np.asarray(da.values, dtype=float), da.dims.index(lr), -1)
    arr = arr.reshape(-1, arr.shape[-1])
    firsts = [row[np.isfinite(row)][0] for row in arr if np.isfinite(row).any()]
    return 10 * max(firsts) if firsts else np.inf


def _metricaxis_label(metric):
    return {"train_loss": "final train loss (EMA)", "test_loss": "final test loss"}.get(
        metric, metric[5:] if metric.startswith("grab_") else metric)


# --------------------------------------------------------------------------------------------------------
# Coordinate check (lives in modelscape.mup; re-exported so it sits beside the other figures)
# --------------------------------------------------------------------------------------------------------
