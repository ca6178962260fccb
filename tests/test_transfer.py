"""Reading the optimum of a sweep axis between grid points (``modelscape.transfer``, ``SweepResults.best``): a known
optimum recovered from synthetic basins, its bootstrap uncertainty, edges, failed runs, and the drift per doubling."""
import itertools
import math

import numpy as np
import pytest

from modelscape.results import SweepResults
from modelscape.transfer import best_over_trials, drift, fit_basin

LRS = [2.0 ** k for k in range(-9, 0)]  # one-octave grid


def basin(lr, opt, depth=0.3, floor=0.05):
    """A loss with its minimum at ``opt``: a parabola in log2(lr) on a log scale (the shape of a real LR basin)."""
    return floor * np.exp(depth * (np.log2(lr) - np.log2(opt)) ** 2)


def test_a_parabola_is_read_exactly_between_grid_points():
    x = np.log2(LRS)
    for opt in (0.0371, 0.011, 0.2):
        x0, y0, edge = fit_basin(x, basin(np.asarray(LRS), opt))
        assert abs(x0 - math.log2(opt)) < 1e-9 and abs(y0 - 0.05) < 1e-9 and not edge
    # the grid's best point is a whole octave away from where the fit puts it
    assert abs(np.log2(LRS)[np.argmin(basin(np.asarray(LRS), 0.0371))] - math.log2(0.0371)) > 0.2


def test_a_minimum_on_the_grid_edge_is_flagged_and_failed_points_are_left_out():
    y = basin(np.asarray(LRS), 1e-4)  # the optimum lies below the smallest LR tried
    x0, _, edge = fit_basin(np.log2(LRS), y)
    assert edge and x0 == math.log2(LRS[0])
    y = basin(np.asarray(LRS), 0.0371)
    y[-3:] = np.nan  # the largest LRs diverged
    x0, _, edge = fit_basin(np.log2(LRS), y)
    assert not edge and abs(x0 - math.log2(0.0371)) < 1e-9
    assert math.isnan(fit_basin(np.log2(LRS), np.full(len(LRS), np.nan))[0])


def test_the_uncertainty_over_trials_shrinks_with_the_noise():
    rng = np.random.default_rng(1)
    lrs = np.asarray(LRS)
    spreads = []
    for noise in (0.02, 0.2):
        y = basin(lrs, 0.0371) * np.exp(noise * rng.standard_normal((8, len(lrs))))
        fit = best_over_trials(lrs, y)
        assert abs(math.log2(fit["x"]) - math.log2(0.0371)) < 4 * fit["octaves"] + 0.02
        spreads.append(fit["octaves"])
    assert 0 < spreads[0] < spreads[1]
    assert math.isnan(best_over_trials(lrs, basin(lrs, 0.0371)[None])["octaves"])  # one trial: no spread


def test_drift_is_octaves_per_doubling():
    widths = np.array([64, 128, 256, 512])
    assert drift(widths, 0.1 * (widths / 64.0) ** -1) == pytest.approx(-1.0)  # sp-like: halves per doubling
    assert drift(widths, [0.05] * 4) == pytest.approx(0.0)  # muP: transfers
    assert math.isnan(drift([64], [0.1]))


def synthetic_results(opts, trials=4, noise=0.05, diverge_above=None):
    """SweepResults of a WIDTH x LR x trial sweep whose train loss has its minimum at ``opts[width]``."""
    rng = np.random.default_rng(0)
    widths = list(opts)
    records = []
    for w, lr, t in itertools.product(widths, LRS, range(trials)):
        loss = float(basin(lr, opts[w]) * math.exp(noise * rng.standard_normal()))
        status = "diverged" if diverge_above is not None and lr > diverge_above else "done"
        records.append({"axes": {"WIDTH": w, "LR": lr, "trial": t}, "status": status, "steps": 100,
                        "wall_time": 1.0, "train_loss": loss if status == "done" else math.nan,
                        "test_loss": loss, "timekeys": np.array([np.nan]), "thresholds": np.array([0.01]),
                        "grabs": {"acc": 1.0 - loss}})
    return SweepResults(["WIDTH", "LR", "trial"], [widths, LRS, list(range(trials))], records)


def test_res_best_recovers_the_known_optimum_per_width():
    opts = {64: 0.0371, 128: 0.0185, 256: 0.0093}
    res = synthetic_results(opts)
    best = res.best("LR")
    assert list(best["best"].dims) == ["WIDTH"] and best.attrs["axis"] == "LR"
    for w, opt in opts.items():
        got = float(best["best"].sel(WIDTH=w))
        spread = float(best["octaves"].sel(WIDTH=w))
        assert abs(math.log2(got) - math.log2(opt)) < max(0.15, 3 * spread)
        assert 0 < spread < 0.3 and not bool(best["at_edge"].sel(WIDTH=w))
    assert drift(list(opts), best["best"].values) == pytest.approx(-1.0, abs=0.2)
    # an accuracy is maximised: the same optimum
    acc = res.best("LR", metric="acc", maximize=True, WIDTH=64)
    assert abs(math.log2(float(acc["best"])) - math.log2(0.0371)) < 0.3


def test_res_best_leaves_diverged_runs_out_and_names_bad_input():
    res = synthetic_results({64: 0.0371}, diverge_above=0.07)
    best = res.best("LR", WIDTH=64)
    assert abs(math.log2(float(best["best"])) - math.log2(0.0371)) < 0.3
    with pytest.raises(KeyError, match="no sweep axis 'lr'"):
        res.best("lr")
    with pytest.raises(KeyError, match="no variable 'nope'"):
        res.best("LR", metric="nope")


def test_the_transfer_figure_marks_fitted_optima_and_prints_the_drift(tmp_path):
    from modelscape import plotting
    opts = {64: 0.0371, 128: 0.0185, 256: 0.0093}
    fig = plotting.plot_lr_transfer(synthetic_results(opts), param=None, path=tmp_path / "t.png")
    fitted = fig.fitted_lr[None]
    assert sorted(fitted) == [64, 128, 256]
    assert all(abs(math.log2(fitted[w]) - math.log2(opts[w])) < 0.15 for w in opts)
    assert fig.drift[None] == pytest.approx(-1.0, abs=0.2)
    (ax,) = [a for a in fig.axes if a.get_visible()]
    assert f"optimum moves {fig.drift[None]:+.2f} octaves per doubling of WIDTH" in ax.get_xlabel()
    assert (tmp_path / "t.png").stat().st_size > 10_000
