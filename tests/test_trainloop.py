"""train_loop: per-step losses, EMA timekeys, stopping, divergence, evaluation cadence, grabs."""
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from modelscape.backend.trainloop import ema_thresholds, train_loop
from modelscape.data import powerlaw_bfn
from modelscape.models import MLP

DIM, WIDTH, BSZ, LR = 8, 32, 32, 0.05
S = 0.9  # EMA smoother used throughout


def setup(seed=0, lr=LR, bfn_wrap=None):
    """A fresh model, online batch function, optimizer and test set; the same seed gives the same objects."""
    torch.manual_seed(seed)
    model = MLP(d_in=DIM, width=WIDTH, depth=2)
    bfn = powerlaw_bfn(BSZ, torch.Generator().manual_seed(seed + 1), dim=DIM)
    if bfn_wrap is not None:
        bfn = bfn_wrap(bfn)
    X_te, y_te = powerlaw_bfn(200, torch.Generator().manual_seed(seed + 2), dim=DIM)(0)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return model, bfn, opt, X_te, y_te


def train(max_iter, thresholds, *, seed=0, lr=LR, bfn_wrap=None, **kw):
    model, bfn, opt, X_te, y_te = setup(seed, lr, bfn_wrap)
    kw.setdefault("only_thresholds", False)
    r = train_loop(model, bfn, opt, nn.MSELoss(), max_iter=max_iter, thresholds=thresholds, ema_smoother=S,
                    X_te=X_te, y_te=y_te, **kw)
    return r, model, X_te, y_te


def brute_force(raw, thresholds, s=S):
    """EMA (seeded with the first loss) and first step below each threshold, recomputed from scratch."""
    ema, out = [], [None] * len(thresholds)
    e = raw[0]
    for i, v in enumerate(raw):
        e = s * e + (1 - s) * v
        ema.append(e)
        for j, t in enumerate(thresholds):
            if out[j] is None and e < t:
                out[j] = i
    return np.array(ema), np.array([np.nan if o is None else o for o in out], dtype=float)


@pytest.fixture(scope="module")
def probe():
    """Per-step losses and EMA of an 80-step run that crosses no threshold."""
    r, *_ = train(80, [1e-12])
    return r


def test_train_raw_and_test_curve_are_those_of_a_plain_loop():
    k = 7
    r, *_ = train(30, [1e-12], eval_every=k)
    model, bfn, opt, X_te, y_te = setup(0)
    raw, test = [], {}
    for step in range(30):
        X, y = bfn(step)
        if step % k == 0:
            with torch.no_grad():
                test[step] = float(nn.functional.mse_loss(model(X_te), y_te))
        loss = nn.functional.mse_loss(model(X), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        raw.append(loss.item())
    with torch.no_grad():
        test[30] = float(nn.functional.mse_loss(model(X_te), y_te))
    np.testing.assert_allclose(r["train_raw"], raw, rtol=1e-6)
    assert list(r["eval_steps"]) == sorted(test)
    np.testing.assert_allclose(r["test_curve"], [test[s] for s in sorted(test)], rtol=1e-6)
    assert r["steps"] == 30 and r["status"] == "not_reached"


def test_ema_thresholds_matches_brute_force():
    losses = np.random.default_rng(0).exponential(size=200) * np.linspace(2, 0.1, 200)
    ths = [1.0, 0.5, 0.2, 1e-6]
    ema, first = ema_thresholds(losses, ths, 0.8)
    ema_bf, first_bf = brute_force(losses, ths, 0.8)
    np.testing.assert_allclose(ema, ema_bf)
    np.testing.assert_array_equal(first, first_bf)
    assert np.isnan(first[-1]) and not np.isnan(first[:-1]).any()
    ema, _ = ema_thresholds([2.0, 4.0], [1.0], 0.5, ema0=0.0)
    np.testing.assert_allclose(ema, [1.0, 2.5])


@pytest.mark.parametrize("sync_every", [1, 7])
def test_timekeys_equal_brute_force_recomputation_from_train_raw(probe, sync_every):
    ema = probe["train_curve"]
    # thresholds crossed at different steps, given out of order, plus one never crossed
    ths = [ema[40] * 1.001, ema[12] * 1.001, 1e-12, ema[25] * 1.001]
    r, *_ = train(80, ths, sync_every=sync_every)
    ema_bf, first_bf = brute_force(r["train_raw"], ths)
    np.testing.assert_array_equal(r["timekeys"], first_bf)
    assert np.isnan(r["timekeys"][2])
    tk = r["timekeys"][[1, 3, 0]]
    assert 0 < tk[0] < tk[1] < tk[2] < 80  # distinct, ordered, not trivially at step 0
    np.testing.assert_allclose(r["train_curve"], ema_bf, rtol=1e-12)
    assert r["train_loss"] == pytest.approx(ema_bf[-1], rel=1e-12)
    assert r["status"] == "not_reached" and r["steps"] == 80 and len(r["train_raw"]) == 80
    np.testing.assert_array_equal(r["thresholds"], ths)


def test_sync_every_does_not_change_results(probe):
    ema = probe["train_curve"]
    ths = [ema[12] * 1.001, ema[25] * 1.001, 1e-12]
    a, *_ = train(80, ths, sync_every=1)
    b, *_ = train(80, ths, sync_every=7)
    for key in ("timekeys", "train_raw", "train_curve", "eval_steps", "test_curve"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert (a["status"], a["steps"], a["train_loss"], a["test_loss"]) == \
        (b["status"], b["steps"], b["train_loss"], b["test_loss"])


@pytest.mark.parametrize("sync_every", [1, 7])
def test_job_stops_once_every_threshold_is_crossed(probe, sync_every):
    ema = probe["train_curve"]
    ths = [ema[12] * 1.001, ema[30] * 1.001]
    r, *_ = train(500, ths, sync_every=sync_every)
    _, first_bf = brute_force(r["train_raw"], ths)
    np.testing.assert_array_equal(r["timekeys"], first_bf)
    last = int(r["timekeys"].max())
    assert r["status"] == "done"
    # losses are read back every sync_every steps: the job may run up to sync_every - 1 steps more
    assert r["steps"] == math.ceil((last + 1) / sync_every) * sync_every
    assert len(r["train_raw"]) == r["steps"]


@pytest.mark.parametrize("only_thresholds", [True, False])
def test_never_crossed_thresholds_are_nan_not_zero(only_thresholds):
    r, *_ = train(25, [1e-9, 1e-12], only_thresholds=only_thresholds, sync_every=4)
    assert r["timekeys"].shape == (2,) and np.isnan(r["timekeys"]).all()
    assert r["status"] == "not_reached" and r["steps"] == 25


def test_relative_thresholds_are_fractions_of_the_first_loss():
    fr = [0.5, 0.25, 1e-9]
    r, *_ = train(80, fr, relative=True)
    first = r["train_raw"][0]
    np.testing.assert_allclose(r["thresholds"], np.array(fr) * first, rtol=1e-12)
    _, first_bf = brute_force(r["train_raw"], np.array(fr) * first)
    np.testing.assert_array_equal(r["timekeys"], first_bf)
    assert not np.isnan(r["timekeys"][:2]).any() and np.isnan(r["timekeys"][2])


@pytest.mark.parametrize("sync_every", [1, 7])
def test_huge_learning_rate_diverges_long_before_max_iter(sync_every):
    r, *_ = train(5000, [1e-12], lr=1e4, sync_every=sync_every, only_thresholds=True)
    assert r["status"] == "diverged"
    assert r["steps"] < 60
    assert math.isnan(r["timekeys"][0])


def nan_at(step_bad, value=float("nan")):
    def wrap(bfn):
        def batch_fn(step):
            X, y = bfn(step)
            return X, (y * value if step == step_bad else y)
        return batch_fn
    return wrap


@pytest.mark.parametrize("sync_every,value,steps", [(1, float("nan"), 6), (4, float("nan"), 8),
                                                    (1, float("inf"), 6)])
def test_a_non_finite_loss_ends_the_job_as_diverged(sync_every, value, steps):
    r, *_ = train(1000, [1e-12], bfn_wrap=nan_at(5, value), sync_every=sync_every)
    assert r["status"] == "diverged" and r["steps"] == steps
    assert np.isfinite(r["train_raw"][:5]).all() and not np.isfinite(r["train_raw"][5])
    assert np.isfinite(r["train_loss"])  # the EMA up to the last finite loss


def test_y_of_shape_n_is_matched_to_output_of_shape_n_by_1():
    def squeeze(bfn):
        def batch_fn(step):
            X, y = bfn(step)
            return X, y[:, 0]
        return batch_fn

    model, bfn, opt, X_te, y_te = setup(0)
    X0, y0 = bfn(0)
    with torch.no_grad():
        expected = float(((model(X0)[:, 0] - y0[:, 0]) ** 2).mean())
    r, *_ = train(3, [1e-12], bfn_wrap=squeeze)
    assert r["train_raw"][0] == pytest.approx(expected, rel=1e-6)


# --- evaluation cadence and the final test loss ------------------------------------------------------------

@pytest.mark.parametrize("max_iter,every,expected", [(35, 10, [0, 10, 20, 30, 35]), (40, 10, [0, 10, 20, 30, 40]),
                                                     (12, 0, [12]), (5, 1, [0, 1, 2, 3, 4, 5]),
                                                     (6, 100, [0, 6])])
def test_eval_steps_follow_the_cadence_and_end_at_the_last_step(max_iter, every, expected):
    r, *_ = train(max_iter, [1e-12], eval_every=every)
    assert list(r["eval_steps"]) == expected
    assert r["test_curve"].shape == (len(expected),)
    assert r["test_curve"][-1] == r["test_loss"]


def test_eval_steps_end_at_the_step_the_job_stopped(probe):
    r, *_ = train(500, [probe["train_curve"][15] * 1.001], eval_every=10)
    assert r["status"] == "done" and r["steps"] < 30
    assert list(r["eval_steps"]) == list(range(0, r["steps"], 10)) + [r["steps"]]


@pytest.mark.parametrize("only_thresholds,every", [(True, 100), (False, 7), (False, 0), (False, 1000)])
def test_final_test_loss_is_that_of_the_final_model(only_thresholds, every):
    r, model, X_te, y_te = train(30, [1e-12], only_thresholds=only_thresholds, eval_every=every)
    with torch.no_grad():
        expected = float(nn.functional.mse_loss(model(X_te), y_te))
    assert r["test_loss"] == pytest.approx(expected, rel=1e-6)
    model0, *_, X0, y0 = setup(0)
    with torch.no_grad():
        initial = float(nn.functional.mse_loss(model0(X0), y0))
    assert abs(r["test_loss"] - initial) > 1e-3  # the model did move, so a stale test loss would differ


def test_only_thresholds_returns_no_curves():
    r, *_ = train(10, [1e-12], only_thresholds=True)
    assert not {"train_curve", "train_raw", "eval_steps", "test_curve"} & set(r)
    assert r["grabs"] == {}


def test_no_test_set_gives_nan_test_loss():
    model, bfn, opt, *_ = setup(0)
    r = train_loop(model, bfn, opt, nn.MSELoss(), max_iter=5, thresholds=[1e-12])
    assert math.isnan(r["test_loss"]) and r["steps"] == 5


# --- grabs ------------------------------------------------------------------------------------------------

def grabs():
    def test_loss(model, X_tr, y_tr, X_te, y_te, opt, **kw):
        with torch.no_grad():
            return nn.functional.mse_loss(model(X_te), y_te)

    def weight(model, **kw):
        return model.output_layer.weight  # a live parameter: must be copied, not referenced

    def batch_rows(X_tr, **kw):
        return X_tr.shape[0]

    def from_kwargs(MY_KEY, **kw):
        return np.full(3, MY_KEY)

    return dict(test_loss=test_loss, weight=weight, batch_rows=batch_rows, from_kwargs=from_kwargs)


def test_grabs_at_the_end_with_only_thresholds():
    r, model, X_te, y_te = train(20, [1e-12], only_thresholds=True, grabs=grabs(), grab_kwargs={"MY_KEY": 2.5})
    g = r["grabs"]
    assert type(g["test_loss"]) is float and g["test_loss"] == pytest.approx(r["test_loss"], rel=1e-6)
    assert g["weight"].shape == (1, WIDTH)  # a number comes back a number, an array an array
    np.testing.assert_array_equal(g["weight"], model.output_layer.weight.detach().cpu().numpy())
    assert g["batch_rows"] == BSZ and g["from_kwargs"].shape == (3,) and (g["from_kwargs"] == 2.5).all()


def test_grabs_along_the_curve_are_stacked_over_eval_steps():
    r, model, *_ = train(20, [1e-12], eval_every=5, grabs=grabs(), grab_kwargs={"MY_KEY": 1.0})
    g, n = r["grabs"], len(r["eval_steps"])
    assert list(r["eval_steps"]) == [0, 5, 10, 15, 20]
    assert g["test_loss"].shape == (n,) and g["weight"].shape == (n, 1, WIDTH)
    assert g["batch_rows"].shape == (n,) and g["from_kwargs"].shape == (n, 3)
    np.testing.assert_allclose(g["test_loss"], r["test_curve"], rtol=1e-6)
    # each entry is the weight at its own step, not the final weight repeated
    np.testing.assert_array_equal(g["weight"][-1], model.output_layer.weight.detach().cpu().numpy())
    model0, *_ = setup(0)
    np.testing.assert_array_equal(g["weight"][0], model0.output_layer.weight.detach().cpu().numpy())
    assert not np.array_equal(g["weight"][0], g["weight"][-1])


def test_grabs_see_the_grab_model_and_the_current_batch():
    seen = []
    model, bfn, opt, X_te, y_te = setup(0)
    other = copy.deepcopy(model)

    def grab(model, X_tr, opt, **kw):
        seen.append((model, X_tr.clone(), opt))
        return 0

    train_loop(model, bfn, opt, nn.MSELoss(), max_iter=3, thresholds=[1e-12], X_te=X_te, y_te=y_te,
                only_thresholds=False, eval_every=1, grabs={"g": grab}, grab_model=other)
    assert all(m is other and o is opt for m, _, o in seen)
    _, bfn2, *_ = setup(0)
    for step, (_, X, _) in enumerate(seen[:3]):
        torch.testing.assert_close(X, bfn2(step)[0])


def test_a_grab_error_names_the_grab():
    def broken(**kw):
        raise KeyError("oops")

    with pytest.raises(RuntimeError, match="broken_grab"):
        train(5, [1e-12], only_thresholds=True, grabs={"broken_grab": broken})


def test_a_grab_changing_shape_is_an_error():
    calls = []

    def growing(**kw):
        calls.append(1)
        return np.zeros(len(calls))

    with pytest.raises(ValueError, match="growing"):
        train(5, [1e-12], eval_every=1, grabs={"growing": growing})


def test_verbose_prints_each_step(capsys):
    train(3, [1e-12], only_thresholds=True, verbose=True)
    out = capsys.readouterr().out
    assert "step 0" in out and "step 2" in out and "step 3" not in out
