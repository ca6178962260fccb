"""Where a hyperparameter is best, and how that optimum moves: the numbers behind a transfer figure.

A muTransfer sweep measures a loss over a grid of learning rates (or multipliers) at several widths or depths;
the question is where the minimum of each curve lies and whether it moves. Reading the best grid point gives an
answer only to the grid's resolution (one octave, say) and hides how sure it is. ``fit_basin`` fits a parabola in
log2(x) (and in log(loss)) to the points around the grid minimum, so the optimum is read between grid points;
``best_over_trials`` repeats the fit on bootstrap resamples of the trials to give its uncertainty in octaves;
``drift`` is the slope of log2(optimum) against log2(width or depth): octaves the optimum moves per doubling.

Pure numpy on arrays; ``SweepResults.best`` and ``plotting.plot_lr_transfer`` apply it to a sweep.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["fit_basin", "best_over_trials", "drift", "WINDOW"]

WINDOW = 2  # grid points on each side of the minimum that the parabola is fitted to


def fit_basin(x, y, log_y: bool = True, window: int = WINDOW) -> tuple[float, float, bool]:
    """``(x_opt, y_opt, at_edge)``: the minimum of ``y`` over ``x`` read from a parabola fitted around the best grid
    point.

    ``x``: increasing grid (already in the units the parabola is fitted in: log2 of a learning rate, say);
    ``y``: one value per grid point, NaN where the run failed or diverged. The parabola is fitted (least squares)
    to the finite points within ``window`` grid steps of the finite minimum, on ``log(y)`` if ``log_y`` (losses
    span decades near divergence). Its vertex is kept within the two neighbours of the grid minimum. The minimum
    on the first or last finite point is ``at_edge``: the optimum may lie beyond the grid, and ``x_opt`` is that
    grid point. Fewer than three finite points around the minimum, or a curve that is not convex there, give the
    grid minimum itself. All NaN gives ``(nan, nan, False)``.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    ok = np.isfinite(y) & np.isfinite(x) & ((y > 0) if log_y else True)
    if not ok.any():
        return math.nan, math.nan, False
    idx = np.flatnonzero(ok)
    i = idx[np.argmin(y[idx])]
    if i == idx[0] or i == idx[-1]:
        return float(x[i]), float(y[i]), len(idx) > 1
    near = idx[(idx >= i - window) & (idx <= i + window)]
    fy = np.log(y[near]) if log_y else y[near]
    if len(near) < 3:
        return float(x[i]), float(y[i]), False
    a, b, c = np.polyfit(x[near], fy, 2)
    if not a > 0:
        return float(x[i]), float(y[i]), False
    lo, hi = x[idx[np.searchsorted(idx, i) - 1]], x[idx[np.searchsorted(idx, i) + 1]]
    x0 = float(np.clip(-b / (2 * a), lo, hi))
    f0 = a * x0 * x0 + b * x0 + c
    return x0, float(np.exp(f0) if log_y else f0), False


def best_over_trials(x, y, log_x: bool = True, log_y: bool = True, n_boot: int = 200, seed: int = 0) -> dict:
    """The optimum of ``y`` (shape ``(n_trials, len(x))``, NaN for failed runs) over ``x``, and its uncertainty.

    The curve fitted is the mean over trials (a trial's NaN leaves the others' mean; a grid point NaN in every
    trial is out). ``log_x``: fit in log2(x) (x > 0: learning rates, multipliers). Returns ``x`` (the optimum),
    ``y`` (the fitted value there), ``octaves`` (the standard deviation of log2 of the optimum over ``n_boot``
    bootstrap resamples of the trials; NaN with one trial or with ``log_x`` False: then ``std`` is in x's units),
    ``std`` and ``at_edge``.
    """
    x = np.asarray(x, dtype=float)
    y = np.atleast_2d(np.asarray(y, dtype=float))
    if y.shape[-1] != len(x):
        raise ValueError(f"y has {y.shape[-1]} values per trial but x has {len(x)}")
    order = np.argsort(x)
    x, y = x[order], y[:, order]
    if log_x and not (x > 0).all():
        raise ValueError(f"log_x needs positive values, got {x.tolist()}; pass log_x=False")
    u = np.log2(x) if log_x else x

    def fit(rows):
        # a grid point NaN in every trial has no mean: it stays NaN, which fit_basin leaves out
        count = np.isfinite(rows).sum(axis=0)
        mean = np.where(count > 0, np.nansum(np.where(np.isfinite(rows), rows, 0.0), axis=0) / np.maximum(count, 1),
                        np.nan)
        return fit_basin(u, mean, log_y)

    u0, y0, edge = fit(y)
    spread = math.nan
    n = y.shape[0]
    if n > 1 and math.isfinite(u0):
        rng = np.random.default_rng(seed)
        draws = [fit(y[rng.integers(0, n, n)])[0] for _ in range(n_boot)]
        draws = np.asarray([d for d in draws if math.isfinite(d)])
        spread = float(draws.std()) if len(draws) > 1 else math.nan
    value = float(2.0 ** u0) if log_x and math.isfinite(u0) else u0
    return {"x": value, "y": y0, "octaves": spread if log_x else math.nan, "std": spread, "at_edge": bool(edge)}


def drift(by, best) -> float:
    """Octaves the optimum moves per doubling of ``by`` (widths or depths): the least-squares slope of
    log2(``best``) against log2(``by``) over the finite pairs; NaN with fewer than two."""
    by, best = np.asarray(by, dtype=float), np.asarray(best, dtype=float)
    ok = np.isfinite(by) & np.isfinite(best) & (by > 0) & (best > 0)
    if ok.sum() < 2:
        return math.nan
    return float(np.polyfit(np.log2(by[ok]), np.log2(best[ok]), 1)[0])
