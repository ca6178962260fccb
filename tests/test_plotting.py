"""modelscape.plotting on hand-built sweep results: lines, panels, log scales, legends, missing points, files."""
import itertools

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")


from modelscape import plotting  # noqa: E402
from modelscape.results import SweepResults  # noqa: E402

THRESHOLDS = [0.5, 0.1]
MAX_ITER = 400


def record(axes, status="not_reached", curve_len=MAX_ITER, final=0.2, timekeys=(10.0, np.nan), grabs=None):
    steps = curve_len
    curve = np.geomspace(1.0, final, curve_len)
    eval_steps = np.arange(0, curve_len + 1, 100)
    return dict(status=status, axes=dict(axes), steps=steps, wall_time=0.1, train_loss=final, test_loss=2 * final,
                thresholds=np.array(THRESHOLDS), timekeys=np.array(timekeys, dtype=float),
                train_curve=curve, train_raw=curve, eval_steps=eval_steps,
                test_curve=np.geomspace(2.0, 2 * final, len(eval_steps)), grabs=dict(grabs or {}), error=None)


@pytest.fixture(scope="module")
def curves_res():
    """WIDTH x GAMMA x trial with loss curves; one job failed."""
    widths, gammas, trials = [32, 64, 128], [0.5, 1.0], [0, 1]
    recs = []
    for w, g, t in itertools.product(widths, gammas, trials):
        ax = dict(WIDTH=w, GAMMA=g, trial=t)
        if (w, g, t) == (128, 1.0, 1):
            recs.append(dict(status="failed", axes=ax, steps=0, wall_time=0.0, train_loss=np.nan,
                             test_loss=np.nan, thresholds=None, timekeys=None, grabs={}, error="boom"))
            continue
        recs.append(record(ax, final=0.3 / np.sqrt(w) * (1 + 0.1 * t) * g, curve_len=MAX_ITER - 50 * t))
    return SweepResults(["WIDTH", "GAMMA", "trial"], [widths, gammas, trials], recs)


@pytest.fixture(scope="module")
def timekeys_res():
    """N_SAMPLES x trial: the smallest size never reaches the second threshold, the middle one once in two."""
    sizes, trials = [16, 64, 256, 1024], [0, 1]
    recs = []
    for n, t in itertools.product(sizes, trials):
        first = 2000.0 / n + t
        second = np.nan if n == 16 or (n == 64 and t == 1) else 8000.0 / n + t
        status = "done" if np.isfinite(second) else "not_reached"
        recs.append(dict(status=status, axes=dict(N_SAMPLES=n, trial=t), steps=MAX_ITER if status != "done"
                         else int(second) + 1, wall_time=0.1, train_loss=0.05, test_loss=0.06,
                         thresholds=np.array(THRESHOLDS), timekeys=np.array([first, second]), grabs={}, error=None))
    return SweepResults(["N_SAMPLES", "trial"], [sizes, trials], recs)


@pytest.fixture(scope="module")
def transfer_res():
    """LR x WIDTH x PARAMETERIZATION x trial: muP's optimum sits at one LR, sp's moves; one sp job diverged."""
    lrs, widths, params, trials = [0.01, 0.1, 1.0, 10.0], [64, 256], ["sp", "mup"], [0, 1]
    recs = []
    for lr, w, p, t in itertools.product(lrs, widths, params, trials):
        best = 1.0 if p == "mup" else 2.5 / w
        loss = 0.1 * (1 + np.log10(lr / best) ** 2) * (1 + 0.05 * t)
        status = "not_reached"
        if p == "sp" and lr == 10.0:
            status, loss = "diverged", np.nan
        recs.append(dict(status=status, axes=dict(LR=lr, WIDTH=w, PARAMETERIZATION=p, trial=t), steps=100,
                         wall_time=0.1, train_loss=loss, test_loss=loss, thresholds=np.array([1e-9]),
                         timekeys=np.array([np.nan]), grabs={"acc": 1 - loss if np.isfinite(loss) else np.nan},
                         error=None))
    return SweepResults(["LR", "WIDTH", "PARAMETERIZATION", "trial"], [lrs, widths, params, trials], recs)


def visible_axes(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


def labelled_lines(ax):
    return [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]


def legend_texts(fig):
    return [t.get_text() for leg in fig.legends for t in leg.get_texts()]


def legend_title(fig):
    return fig.legends[0].get_title().get_text()


def check_png(path, min_bytes=5_000):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > min_bytes


# --- loss curves -------------------------------------------------------------------------------------------

def test_loss_curves_one_line_per_colour_one_panel_per_facet(curves_res, tmp_path):
    fig = plotting.plot_loss_curves(curves_res, color="WIDTH", facet="GAMMA", path=tmp_path / "curves.png")
    axes = visible_axes(fig)
    assert len(axes) == 2
    assert [ax.get_title() for ax in axes] == ["GAMMA = 0.5", "GAMMA = 1"]
    for ax in axes:
        assert [ln.get_label() for ln in labelled_lines(ax)] == ["32", "64", "128", "loss thresholds"]
        # log steps, but linear on [0, 1]: step 0 (the model at init) is on the axis, at its left edge
        assert ax.get_yscale() == "log" and ax.get_xscale() == "symlog" and ax.get_xlim()[0] == 0
        assert "loss" in axes[0].get_ylabel() and "step" in ax.get_xlabel()
    # a spread band per width, but WIDTH=128 at GAMMA=1 has one trial left: its failed job is noted, not hidden
    assert [len(ax.collections) for ax in axes] == [3, 2]
    assert [t.get_text() for t in axes[1].texts] == ["1 failed (not drawn)"] and not axes[0].texts
    # the mean starts at step 0 and stops where the first trial stops (at 350 of 400 steps), and so does its band
    mean = next(ln for ln in labelled_lines(axes[0]) if ln.get_label() == "32")
    assert min(mean.get_xdata()) == 0 and max(mean.get_xdata()) == MAX_ITER - 50 - 1
    band = axes[0].collections[0].get_paths()[0].vertices[:, 0]
    assert band.min() == 0 and band.max() == MAX_ITER - 50 - 1
    assert legend_title(fig) == "WIDTH"
    assert legend_texts(fig) == ["32", "64", "128", "loss thresholds"]
    assert [ln.get_ydata()[0] for ln in axes[0].get_lines() if ln.get_linestyle() == ":"
            and len(ln.get_ydata())] == THRESHOLDS
    check_png(tmp_path / "curves.png")


def test_the_legend_leaves_the_title_and_the_panels_clear(curves_res):
    """One panel makes a narrow figure under a long title (the notebook's figure): the legend, on the right,
    covers neither."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    fig = plotting.plot_loss_curves(curves_res, color="WIDTH", sel={"GAMMA": 0.5})
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    legend = fig.legends[0].get_window_extent(renderer)
    assert not legend.overlaps(fig._suptitle.get_window_extent(renderer))
    assert not any(legend.overlaps(ax.get_window_extent(renderer)) for ax in visible_axes(fig))


def test_loss_curves_test_loss_and_the_accepted_inputs(curves_res, tmp_path):
    ds = curves_res.to_xarray()
    fig = plotting.plot_loss_curves(ds, color="GAMMA", which="test", sel={"WIDTH": 64}, spread="std",
                                    path=tmp_path / "test.pdf")
    (ax,) = visible_axes(fig)
    assert len(labelled_lines(ax)) == 2 and ax.get_ylabel() == "test loss"
    assert legend_title(fig) == "GAMMA" and legend_texts(fig) == ["0.5", "1"]
    assert (tmp_path / "test.pdf").read_bytes()[:4] == b"%PDF"


def test_loss_curves_name_the_axis_left_ambiguous(curves_res):
    with pytest.raises(ValueError, match="GAMMA"):
        plotting.plot_loss_curves(curves_res, color="WIDTH")
    with pytest.raises(KeyError, match="WIDHT"):
        plotting.plot_loss_curves(curves_res, color="WIDHT", facet="GAMMA")


def test_loss_curves_need_curves(timekeys_res):
    with pytest.raises(ValueError, match="ONLYTHRESHOLDS"):
        plotting.plot_loss_curves(timekeys_res, color="N_SAMPLES")


# --- timekeys ----------------------------------------------------------------------------------------------

def test_timekeys_panels_scales_and_not_reached_points(timekeys_res, tmp_path):
    fig = plotting.plot_timekeys(timekeys_res, x="N_SAMPLES", path=tmp_path / "tk.png")
    axes = visible_axes(fig)
    assert [ax.get_title() for ax in axes] == ["loss < 0.5", "loss < 0.1"]
    for ax in axes:
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
        assert ax.get_xlabel() == "N_SAMPLES" or ax is not axes[-1]
    # second threshold: N=16 never reached (both trials), N=64 once in two -> open markers at the budget
    open_pts = [ln for ln in axes[1].get_lines() if ln.get_marker() == "o" and ln.get_markerfacecolor() == "white"
                and len(ln.get_xdata())]
    xs = sorted(float(ln.get_xdata()[0]) for ln in open_pts)
    assert xs == [16.0, 64.0]
    assert all(float(ln.get_ydata()[0]) == MAX_ITER for ln in open_pts)
    assert any(t.get_text() == "1/2" for t in axes[1].texts)
    assert any(t.startswith("not reached") for t in legend_texts(fig))
    # the first threshold was reached everywhere: no not-reached marker there
    assert not [ln for ln in axes[0].get_lines() if ln.get_markerfacecolor() == "white" and len(ln.get_xdata())]
    check_png(tmp_path / "tk.png")


def test_timekeys_one_threshold_with_colour(transfer_res, timekeys_res):
    fig = plotting.plot_timekeys(timekeys_res, x="N_SAMPLES", threshold=0)
    assert len(visible_axes(fig)) == 1
    fig = plotting.plot_timekeys(transfer_res, x="WIDTH", color="LR", sel={"PARAMETERIZATION": "mup"})
    (ax,) = visible_axes(fig)
    assert legend_title(fig) == "LR"
    assert legend_texts(fig)[:4] == ["0.01 (never reached)", "0.1 (never reached)", "1 (never reached)",
                                     "10 (never reached)"]
    with pytest.raises(IndexError):
        plotting.plot_timekeys(timekeys_res, x="N_SAMPLES", threshold=5)


# --- LR transfer -------------------------------------------------------------------------------------------

def test_lr_transfer_panels_share_y_and_mark_the_best_lr(transfer_res, tmp_path):
    fig = plotting.plot_lr_transfer(transfer_res, path=tmp_path / "transfer.png")
    axes = visible_axes(fig)
    assert [ax.get_title() for ax in axes] == ["PARAMETERIZATION = sp", "PARAMETERIZATION = mup"]
    assert axes[0].get_shared_y_axes().joined(axes[0], axes[1])
    for ax in axes:
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
        widths = [ln for ln in ax.get_lines() if ln.get_label() in ("64", "256")]
        assert len(widths) == 2
        stars = [ln for ln in ax.get_lines() if ln.get_marker() == "*" and len(ln.get_xdata())]
        assert len(stars) == 2
    assert fig.best_lr == {"sp": {64: 0.1, 256: 0.01}, "mup": {64: 1.0, 256: 1.0}}
    assert legend_title(fig) == "WIDTH"
    texts = legend_texts(fig)
    assert texts[:2] == ["64", "256"] and "best LR of the width" in texts
    assert any(t.startswith("diverged / failed") for t in texts)
    # the diverged sp jobs at LR=10 are crosses on the edge, not dropped
    crosses = [ln for ln in axes[0].get_lines() if ln.get_marker() == "X" and len(ln.get_xdata())]
    assert sorted(float(ln.get_xdata()[0]) for ln in crosses) == [10.0, 10.0]
    check_png(tmp_path / "transfer.png")


def test_lr_transfer_exploded_losses_are_crosses_not_points(transfer_res):
    ds = transfer_res.to_xarray().copy(deep=True)
    ds["train_loss"].loc[dict(LR=1.0, WIDTH=256, PARAMETERIZATION="sp")] = 1e20  # finite, but blown up
    fig = plotting.plot_lr_transfer(ds)
    ax = visible_axes(fig)[0]
    line = next(ln for ln in ax.get_lines() if ln.get_label() == "256")
    assert 1.0 not in list(line.get_xdata()) and max(line.get_ydata()) < 10
    crosses = [float(x) for ln in ax.get_lines() if ln.get_marker() == "X" for x in ln.get_xdata()]
    assert sorted(crosses) == [1.0, 10.0, 10.0]
    fig = plotting.plot_lr_transfer(ds, ceiling=None)
    line = next(ln for ln in visible_axes(fig)[0].get_lines() if ln.get_label() == "256")
    assert max(line.get_ydata()) == 1e20


def test_lr_transfer_grab_metric_with_max_and_single_panel(transfer_res):
    fig = plotting.plot_lr_transfer(transfer_res, metric="acc", best="max", logy=False, param=None,
                                    sel={"PARAMETERIZATION": "mup"})
    (ax,) = visible_axes(fig)
    assert ax.get_ylabel() == "acc" and ax.get_yscale() == "linear"
    assert fig.best_lr == {None: {64: 1.0, 256: 1.0}}


def test_coord_check_is_reexported():
    from modelscape import mup

    if not hasattr(mup, "plot_coord_check"):
        pytest.skip("modelscape.mup has no coordinate check yet")
    import torch
    from modelscape.models import MLP

    gen = torch.Generator().manual_seed(0)

    def batch_fn(step):
        X = torch.randn(16, 4, generator=gen)
        return X, X.sum(1, keepdim=True)

    da = plotting.coord_check(lambda w: MLP(d_in=4, width=w, depth=2), [16, 32], batch_fn, steps=2)
    fig = plotting.plot_coord_check(da)
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 3
