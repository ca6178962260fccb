"""Labelled results: ExptTrace (set/get, sorted axes, partial keys, masking, round trip) and SweepResults
(xarray view and get at the right coordinates, labels for non-numeric axis values, ragged curves NaN-padded,
failed and missing jobs NaN / masked), on hand-made records and on a real in-process sweep with curves."""
import itertools
import pickle

import numpy as np
import pytest
import torch

from modelscape.backend.cli import base_args
from modelscape.backend.job_iterator import main
from modelscape.data import powerlaw_bfn
from modelscape.results import ExptTrace, SweepResults, axis_label


# --- ExptTrace ---------------------------------------------------------------------------------------------

def value(w, lr, t):
    return w * 1000 + lr * 10 + t


WS, LRS, TS = [64, 16, 32], [0.5, 0.1], [1, 0]  # deliberately unsorted


@pytest.fixture
def trace():
    t = ExptTrace(["WIDTH", "LR", "trial"])
    for w, lr, tr in itertools.product(WS, LRS, TS):
        t[(w, lr, tr)] = value(w, lr, tr)
    return t


def test_set_and_get_one_entry(trace):
    assert trace[(32, 0.1, 1)] == value(32, 0.1, 1)
    assert trace.get(WIDTH=32, LR=0.1, trial=1) == value(32, 0.1, 1)
    assert trace[(np.int64(32), np.float64(0.1), 1)] == value(32, 0.1, 1)  # numpy scalars are the same labels
    trace[(32, 0.1, 1)] = -1.0
    assert trace[(32, 0.1, 1)] == -1.0
    with pytest.raises(KeyError, match="no value"):
        trace[(128, 0.1, 1)]
    with pytest.raises(KeyError, match="2 values"):
        trace[(32, 0.1)]
    with pytest.raises(KeyError, match="no axis"):
        trace.get(WIDHT=32)
    assert trace.is_written(WIDTH=16, LR=0.5, trial=0) and not trace.is_written(WIDTH=8, LR=0.5, trial=0)


def test_get_axis_is_sorted(trace):
    assert trace.get_axis("WIDTH") == [16, 32, 64]
    assert trace.get_axis("LR") == [0.1, 0.5]
    assert trace.get_axis("trial") == [0, 1]
    with pytest.raises(KeyError):
        trace.get_axis("depth")
    s = ExptTrace(["name"])
    s[("b",)], s[("a",)], s[(3,)] = 1, 2, 3
    assert s.get_axis("name") == [3, "a", "b"]  # numbers first, then labels


def test_get_with_partial_keys_returns_the_other_axes_in_order_with_sorted_values(trace):
    a = trace.get(WIDTH=32)
    assert a.shape == (2, 2)  # (LR, trial)
    for i, lr in enumerate(sorted(LRS)):
        for j, t in enumerate(sorted(TS)):
            assert a[i, j] == value(32, lr, t)
    b = trace.get(trial=0)
    assert b.shape == (3, 2)  # (WIDTH, LR)
    assert b[2, 1] == value(64, 0.5, 0)
    c = trace.get(LR=0.5, trial=1)
    np.testing.assert_array_equal(c, [value(w, 0.5, 1) for w in sorted(WS)])
    full = trace.get()
    assert full.shape == (3, 2, 2) and full[0, 0, 0] == value(16, 0.1, 0)
    assert not np.ma.getmaskarray(full).any()


def test_missing_entries_are_masked(trace):
    del trace.vals[(32, 0.5, 0)]
    a = trace.get(WIDTH=32)
    mask = np.ma.getmaskarray(a)
    assert mask.tolist() == [[False, False], [True, False]]
    assert a[0, 1] == value(32, 0.1, 1)
    # values an axis is declared to take are masked rows even when nothing is stored for them
    t = ExptTrace(["WIDTH"], {"WIDTH": [8, 16]})
    t[(16,)] = 2.0
    assert t.get_axis("WIDTH") == [8, 16]
    got = t.get()
    assert np.ma.getmaskarray(got).tolist() == [True, False] and got[1] == 2.0


def test_array_values_and_ragged_curves_are_nan_padded_and_masked():
    t = ExptTrace(["WIDTH"])
    t[(16,)] = np.array([3.0, 2.0, 1.0])
    t[(32,)] = np.array([4.0, 1.0])
    got = t.get()
    assert got.shape == (2, 3)
    np.testing.assert_array_equal(got.data[0], [3.0, 2.0, 1.0])
    np.testing.assert_array_equal(got.data[1, :2], [4.0, 1.0])
    assert np.isnan(got.data[1, 2]) and np.ma.getmaskarray(got).tolist() == [[False] * 3, [False, False, True]]
    np.testing.assert_array_equal(t.get(WIDTH=32), [4.0, 1.0])


def test_serialize_deserialize_round_trip(trace):
    del trace.vals[(64, 0.1, 1)]
    data = pickle.loads(pickle.dumps(trace.serialize()))
    back = ExptTrace.deserialize(data)
    assert back.var_names == trace.var_names and back.vals == trace.vals and back.valshape == trace.valshape
    for sel in ({}, {"WIDTH": 64}, {"LR": 0.1, "trial": 1}):
        a, b = trace.get(**sel), back.get(**sel)
        np.testing.assert_array_equal(np.ma.getmaskarray(a), np.ma.getmaskarray(b))
        np.testing.assert_array_equal(a.filled(-7), b.filled(-7))
    assert ExptTrace.deserialize(trace) is trace
    declared = ExptTrace(["x"], {"x": [1, 2]})
    assert ExptTrace.deserialize(declared.serialize()).get_axis("x") == [1, 2]


def test_an_axis_called_val_is_refused():
    with pytest.raises(ValueError, match="val"):
        ExptTrace(["WIDTH", "val"])


# --- SweepResults on hand-made records -----------------------------------------------------------------------

class Act:
    def __init__(self, name):
        self.name = name

    def __str__(self):
        return f"act:{self.name}"


ACTS = [Act("relu"), Act("tanh")]


def record(w, act, opt, status="done", n_steps=4):
    """A result record as run_config makes it, with numbers that encode its coordinates."""
    base = w + 100 * ACTS.index(act) + (0.5 if opt == "adam" else 0.0)
    if status == "failed":
        return dict(status="failed", error="Traceback ...\nValueError: bad job", axes=dict(WIDTH=w, act=act, opt=opt),
                    wall_time=0.25, steps=0, timekeys=None, thresholds=None, train_loss=np.nan, test_loss=np.nan,
                    grabs={})
    steps = np.arange(n_steps)
    return dict(status=status, error=None, axes=dict(WIDTH=w, act=act, opt=opt), wall_time=1.0, steps=n_steps,
                thresholds=np.array([0.5, 0.1]), timekeys=np.array([base, np.nan]), train_loss=base + 0.1,
                test_loss=base + 0.2, train_curve=base + steps, train_raw=base - steps,
                eval_steps=np.arange(0, n_steps + 1, 2), test_curve=base + np.arange(0, n_steps + 1, 2) / 10,
                grabs={"norm": base + np.arange(0, n_steps + 1, 2) / 100,
                       "vec": np.stack([np.full(3, base)] * len(range(0, n_steps + 1, 2)))})


@pytest.fixture
def handmade():
    axes = dict(WIDTH=[16, 32], act=ACTS, opt=["sgd", "adam"])
    recs = []
    for (w, act, opt) in itertools.product(*axes.values()):
        if (w, act.name, opt) == (32, "tanh", "adam"):
            continue  # never ran
        if (w, act.name, opt) == (16, "tanh", "sgd"):
            recs.append(record(w, act, opt, status="failed"))
            continue
        recs.append(record(w, act, opt, n_steps=6 if w == 32 else 4))  # ragged curves
    return SweepResults(list(axes), list(axes.values()), recs), recs


def test_to_xarray_labels_and_values_at_the_records_coordinates(handmade):
    res, recs = handmade
    ds = res.to_xarray()
    assert list(ds["act"].values) == ["act:relu", "act:tanh"]   # objects get their str as label
    assert list(ds["opt"].values) == ["sgd", "adam"]           # strings keep the given order
    assert list(ds["WIDTH"].values) == [16, 32]
    for r in recs:
        at = {k: axis_label(v) for k, v in r["axes"].items()}
        assert str(ds["status"].sel(**at).item()) == r["status"]
        assert ds["wall_time"].sel(**at).item() == r["wall_time"]
        if r["status"] == "failed":
            continue
        assert ds["test_loss"].sel(**at).item() == r["test_loss"]
        assert ds["train_loss"].sel(**at).item() == r["train_loss"]
        assert ds["steps"].sel(**at).item() == r["steps"]
        np.testing.assert_array_equal(ds["timekeys"].sel(**at).values, r["timekeys"])
        np.testing.assert_array_equal(ds["thresholds"].sel(**at).values, r["thresholds"])
        n = len(r["train_curve"])
        curve = ds["train_curve"].sel(**at).values
        np.testing.assert_array_equal(curve[:n], r["train_curve"])
        assert np.isnan(curve[n:]).all() and len(curve) == 6  # ragged: NaN-padded to the longest
        np.testing.assert_array_equal(ds["train_raw"].sel(**at).values[:n], r["train_raw"])
        test_curve = ds["test_curve"].sel(**at)
        np.testing.assert_array_equal(test_curve.sel(eval_step=r["eval_steps"]).values, r["test_curve"])
        assert np.isnan(test_curve.values[len(r["eval_steps"]):]).all()
        np.testing.assert_array_equal(ds["grab_norm"].sel(**at).sel(eval_step=r["eval_steps"]).values,
                                      r["grabs"]["norm"])
        np.testing.assert_array_equal(ds["grab_vec"].sel(**at).sel(eval_step=r["eval_steps"]).values,
                                      r["grabs"]["vec"])
        assert res.get("test_loss", **r["axes"]).item() == r["test_loss"]
    assert list(ds["eval_step"].values) == [0, 2, 4, 6]
    assert ds["grab_vec"].dims == ("WIDTH", "act", "opt", "eval_step", "vec_dim0")


def test_failed_and_missing_jobs_are_nan_and_masked(handmade):
    res, _ = handmade
    ds = res.to_xarray()
    failed = dict(WIDTH=16, act="act:tanh", opt="sgd")
    missing = dict(WIDTH=32, act="act:tanh", opt="adam")
    assert str(ds["status"].sel(**failed).item()) == "failed"
    assert str(ds["status"].sel(**missing).item()) == "missing"
    for at in (failed, missing):
        for var in ("test_loss", "train_loss", "steps", "timekeys", "train_curve", "test_curve", "grab_norm"):
            assert np.isnan(ds[var].sel(**at).values).all(), var
    assert ds["wall_time"].sel(**failed).item() == 0.25 and np.isnan(ds["wall_time"].sel(**missing).item())
    losses = res["losses"].get(WIDTH=16, opt="sgd")  # (act, eval index)
    mask = np.ma.getmaskarray(losses)
    assert mask[1].all() and not mask[0, :3].any()
    tk = res["timekeys"].get(act=ACTS[1])  # (WIDTH, opt, threshold); an ExptTrace sorts values: adam, sgd
    assert res["timekeys"].get_axis("opt") == ["adam", "sgd"]
    assert np.ma.getmaskarray(tk)[0, 1].all() and np.ma.getmaskarray(tk)[1, 0].all()
    assert tk[1, 1, 0] == 32 + 100 and tk[0, 0, 0] == 16 + 100 + 0.5
    assert np.ma.getmaskarray(tk)[1, 1].tolist() == [False, True]  # a threshold never reached is NaN: masked
    assert res.failed()[0]["axes"]["opt"] == "sgd" and res.status_counts() == {"done": 6, "failed": 1}


def test_seed_style_keys(handmade):
    res, recs = handmade
    assert res["var_axes"] == ["WIDTH", "act", "opt"]
    assert len(res["jobs"]) == 8 and res["jobs"][0] == (16, ACTS[0], "sgd")
    assert set(res) == {"jobs", "var_axes", "losses", "train_losses", "timekeys", "extras"}
    assert set(res["extras"]) == {"norm", "vec"}
    r = recs[0]
    # curves of jobs that stopped early are NaN-padded to the longest, so every value has the trace's shape
    for got, want in [(res["extras"]["norm"][(16, ACTS[0], "sgd")], r["grabs"]["norm"]),
                      (res["train_losses"].get(WIDTH=16, act=ACTS[0], opt="sgd"), r["train_curve"])]:
        np.testing.assert_array_equal(got[:len(want)], want)
        assert np.isnan(got[len(want):]).all()
    assert {np.shape(v) for v in res["extras"]["norm"].vals.values()} == {res["extras"]["norm"].valshape}
    assert res["timekeys"].get_axis("act") == ["act:relu", "act:tanh"]
    with pytest.raises(KeyError, match="no variable"):
        res.get("nonsense")
    with pytest.raises(KeyError, match="no axis"):
        res.get("test_loss", WIDHT=16)


def test_repeated_axis_labels_are_refused():
    res = SweepResults(["act"], [[Act("x"), Act("x")]], [])
    with pytest.raises(ValueError, match="repeated"):
        res.to_xarray()


# --- a real sweep with curves (in-process) ------------------------------------------------------------------

def first_weight(model, **kw):
    return float(model.input_layer.weight.detach().sum())


@pytest.fixture(scope="module")
def curve_sweep():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = vars(base_args())
        g.update(PARAMETERIZATION="sp", MAX_ITER=150, N_TEST=128, N_SAMPLES=64, LOSS_CHECKPOINTS=[0.6, 0.3],
                 RELATIVE_THRESHOLDS=True, ONLYTHRESHOLDS=False, EVAL_EVERY=20, otherreturns={"w0": first_weight})
        return main([[16, 32], [0.02, 0.2], [0, 1]], ["WIDTH", "LR", "trial"], g, dict(base_bfn=powerlaw_bfn, dim=8),
                    executor="inprocess", store=False, progress=False)
    finally:
        torch.set_num_threads(before)


def test_real_curves_are_ragged_and_nan_padded_at_the_right_coordinates(curve_sweep):
    res = curve_sweep
    ds = res.to_xarray()
    lengths = {len(r["train_curve"]) for r in res.records}
    assert len(lengths) > 1, "the curves should stop at different steps"
    assert ds.sizes["step"] == max(lengths)
    for r in res.records:
        at = r["axes"]
        n = len(r["train_curve"])
        assert n == r["steps"]
        curve = ds["train_curve"].sel(**at).values
        np.testing.assert_array_equal(curve[:n], r["train_curve"])
        assert np.isnan(curve[n:]).all()
        tc = ds["test_curve"].sel(**at)
        np.testing.assert_array_equal(tc.sel(eval_step=r["eval_steps"]).values, r["test_curve"])
        assert np.isnan(tc.drop_sel(eval_step=r["eval_steps"]).values).all()
        np.testing.assert_array_equal(ds["grab_w0"].sel(**at).sel(eval_step=r["eval_steps"]).values,
                                      r["grabs"]["w0"])
        one = res["train_losses"].get(**at)  # NaN-padded to the longest curve: expt-core needs one shape
        np.testing.assert_array_equal(one[:n], r["train_curve"])
        assert len(one) == max(lengths) and np.isnan(one[n:]).all()
        assert r["test_curve"][-1] == r["test_loss"]
    by_width = res["train_losses"].get(WIDTH=16)  # (LR, trial, step), masked past each job's end
    assert by_width.shape == (2, 2, max(lengths))
    for r in res.records:
        if r["axes"]["WIDTH"] == 16:
            i, j = [0.02, 0.2].index(r["axes"]["LR"]), r["axes"]["trial"]
            n = len(r["train_curve"])
            np.testing.assert_array_equal(by_width[i, j, :n], r["train_curve"])
            assert np.ma.getmaskarray(by_width[i, j])[n:].all()


def test_jobs_of_one_trial_share_their_initial_weights_and_trials_differ(curve_sweep):
    w0 = curve_sweep.to_xarray()["grab_w0"].sel(eval_step=0)  # the weights before the first update
    for w in (16, 32):
        for t in (0, 1):
            assert w0.sel(WIDTH=w, LR=0.02, trial=t).item() == w0.sel(WIDTH=w, LR=0.2, trial=t).item()
        assert w0.sel(WIDTH=w, LR=0.02, trial=0).item() != w0.sel(WIDTH=w, LR=0.02, trial=1).item()
    raw = curve_sweep.to_xarray()["train_raw"].isel(step=0)  # the first loss: same data, same init
    assert (raw.sel(LR=0.02).values == raw.sel(LR=0.2).values).all()


# --- labels that line up: the threshold coordinate and one step grid -----------------------------------------

def test_threshold_is_a_coordinate_of_the_threshold_values(handmade, curve_sweep):
    res, recs = handmade
    ds = res.to_xarray()
    assert list(ds["threshold"].values) == [0.5, 0.1]  # records stored without thresholds_given: their thresholds
    at = dict(WIDTH=32, act="act:relu", opt="sgd")
    assert ds["timekeys"].sel(**at, threshold=0.5).item() == 32 and np.isnan(ds["timekeys"].sel(**at, threshold=0.1))
    assert res.get("timekeys", threshold=0.5, **at).item() == 32
    with pytest.raises(KeyError, match="no axis"):
        res.get("test_loss", threshold=0.5)  # a final value has no threshold dimension
    # relative thresholds: the coordinate holds the fractions given, ``thresholds`` each job's losses to reach
    real = curve_sweep.to_xarray()
    assert list(real["threshold"].values) == [0.6, 0.3]
    for r in curve_sweep.records:
        np.testing.assert_allclose(real["thresholds"].sel(**r["axes"]).values, np.array([0.6, 0.3]) * r["train_raw"][0])
        np.testing.assert_array_equal(real["timekeys"].sel(**r["axes"], threshold=0.3), r["timekeys"][1])


def test_jobs_given_different_thresholds_share_the_union_of_them():
    def rec(lr, given):
        return dict(status="done", axes={"LR": lr}, steps=5, wall_time=1.0, train_loss=0.0, test_loss=0.0,
                    thresholds=np.array(given) * 2, thresholds_given=np.array(given),
                    timekeys=np.arange(len(given), dtype=float) + 10 * lr, grabs={})

    res = SweepResults(["LR"], [[1, 2]], [rec(1, [0.5, 0.1]), rec(2, [0.2])])
    ds = res.to_xarray()
    assert list(ds["threshold"].values) == [0.5, 0.2, 0.1]  # largest first: the order a loss crosses them
    np.testing.assert_array_equal(ds["timekeys"].sel(LR=1).values, [10, np.nan, 11])
    np.testing.assert_array_equal(ds["timekeys"].sel(LR=2).values, [np.nan, 20, np.nan])
    np.testing.assert_array_equal(ds["thresholds"].sel(LR=2).values, [np.nan, 0.4, np.nan])


def test_curves_of_jobs_of_different_lengths_share_one_step_grid():
    g = vars(base_args())
    g.update(WIDTH=8, N_TEST=32, N_SAMPLES=16, LOSS_CHECKPOINTS=[1e-9], ONLYTHRESHOLDS=False, EVAL_EVERY=20)
    res = main([[30, 50]], ["MAX_ITER"], g, dict(base_bfn=powerlaw_bfn, dim=4), executor="inprocess", store=False,
               progress=False)
    ds = res.to_xarray()
    assert list(ds["eval_step"].values) == [0, 20, 30, 40, 50] and ds.sizes["step"] == 50
    short, long_ = (next(r for r in res.records if r["axes"]["MAX_ITER"] == n) for n in (30, 50))
    tc = ds["test_curve"]
    np.testing.assert_array_equal(tc.sel(MAX_ITER=30, eval_step=[0, 20, 30]).values, short["test_curve"])
    assert np.isnan(tc.sel(MAX_ITER=30, eval_step=[40, 50]).values).all()  # past its end
    np.testing.assert_array_equal(tc.sel(MAX_ITER=50, eval_step=[0, 20, 40, 50]).values, long_["test_curve"])
    assert np.isnan(tc.sel(MAX_ITER=50, eval_step=30))  # the short job's last step is no evaluation of this one
    train = ds["train_raw"]
    np.testing.assert_array_equal(train.sel(MAX_ITER=30, step=slice(0, 29)).values, short["train_raw"])
    assert np.isnan(train.sel(MAX_ITER=30, step=slice(30, None)).values).all()
    # both jobs saw the same data and weights: their losses agree step by step where both ran
    np.testing.assert_array_equal(train.sel(MAX_ITER=30, step=slice(0, 29)), train.sel(MAX_ITER=50, step=slice(0, 29)))
