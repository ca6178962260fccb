"""run_config: data (online/offline, per-trial seeds), centering, models, losses/optimizers, failures, determinism."""
import collections
import json
import textwrap
import warnings

import numpy as np
import pytest
import torch

from modelscape.backend.job import run_config, run_config_safe
from modelscape.config import ConfigError
from modelscape.data import powerlaw_bfn
from modelscape.models import MLP

N_TEST, N_SAMPLES = 50, 16


def cfg(**kw):
    base = dict(PARAMETERIZATION="sp", WIDTH=32, DEPTH=2, MAX_ITER=10, N_TEST=N_TEST, N_SAMPLES=N_SAMPLES,
                LR=0.05, LOSS_CHECKPOINTS=[1e-12], EVAL_EVERY=0)
    base.update(kw)
    return base


def recorder(dim=8):
    """A base batch function that records every batch it hands out, with whether it was given X (offline)."""
    calls = []

    def base_bfn(bsz, gen, X, y, dim=dim, **kwargs):
        inner = powerlaw_bfn(bsz, gen, X, y, dim=dim)

        def batch_fn(step):
            Xb, yb = inner(step)
            calls.append(dict(bsz=bsz, offline=X is not None, step=step, X=Xb.clone(), y=yb.clone()))
            return Xb, yb
        return batch_fn

    return base_bfn, calls


def test_online_batches_differ_step_to_step():
    bfn, calls = recorder()
    r = run_config(cfg(ONLINE=True), dict(base_bfn=bfn), quiet=True)
    test_sets = [c for c in calls if c["bsz"] == N_TEST]
    batches = [c for c in calls if c["bsz"] == N_SAMPLES]
    assert len(test_sets) == 1 and len(batches) == r["steps"] == 10
    assert [c["step"] for c in batches] == list(range(10))
    for i in range(len(batches)):
        for j in range(i):
            assert not torch.equal(batches[i]["X"], batches[j]["X"])
        assert not any(torch.equal(batches[i]["X"][:1], row[None]) for row in test_sets[0]["X"])


def test_offline_batches_are_the_same_fixed_set_every_step():
    bfn, calls = recorder()
    r = run_config(cfg(ONLINE=False), dict(base_bfn=bfn), quiet=True)
    drawn = [c for c in calls if c["bsz"] == N_SAMPLES and not c["offline"]]
    batches = [c for c in calls if c["offline"]]
    assert len(drawn) == 1  # the training set is drawn once
    assert len(batches) == r["steps"] == 10
    for c in batches:
        assert torch.equal(c["X"], drawn[0]["X"]) and torch.equal(c["y"], drawn[0]["y"])
    test_set = [c for c in calls if c["bsz"] == N_TEST][0]
    assert not torch.equal(test_set["X"][:N_SAMPLES], drawn[0]["X"])  # train and test sets are not the same draw


def _data(width, trial, online=False):
    bfn, calls = recorder()
    run_config(cfg(WIDTH=width, ONLINE=online, MAX_ITER=3), dict(base_bfn=bfn), axes={"trial": trial}, quiet=True)
    test = [c for c in calls if c["bsz"] == N_TEST][0]
    train = [c for c in calls if c["bsz"] == N_SAMPLES][0]
    return test["X"], test["y"], train["X"], train["y"]


@pytest.mark.parametrize("online", [False, True])
def test_same_trial_same_data_across_widths_and_different_trials_differ(online):
    a, b, c = _data(32, 0, online), _data(64, 0, online), _data(32, 1, online)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y)
        assert not torch.equal(x, z)


def test_determinism_two_runs_are_bitwise_identical():
    def grab(model, X_te, **kw):
        return model(X_te)[:4].detach()

    c = cfg(MAX_ITER=40, ONLYTHRESHOLDS=False, EVAL_EVERY=10, LOSS_CHECKPOINTS=[0.8, 0.5, 1e-12],
            RELATIVE_THRESHOLDS=True, otherreturns={"out": grab})
    r1 = run_config(c, dict(base_bfn=powerlaw_bfn, dim=8), quiet=True)
    r2 = run_config(c, dict(base_bfn=powerlaw_bfn, dim=8), quiet=True)
    assert not np.isnan(r1["timekeys"][:2]).any()
    for key in ("timekeys", "train_raw", "test_curve", "thresholds"):
        assert np.array_equal(r1[key], r2[key], equal_nan=True), key
    assert r1["test_loss"] == r2["test_loss"] and r1["train_loss"] == r2["train_loss"]
    assert np.array_equal(r1["grabs"]["out"], r2["grabs"]["out"])
    r3 = run_config({**c, "SEED": 7}, dict(base_bfn=powerlaw_bfn, dim=8), quiet=True)
    assert not np.array_equal(r1["train_raw"], r3["train_raw"])


def test_result_record_fields():
    r = run_config(cfg(), dict(base_bfn=powerlaw_bfn, dim=8), axes={"trial": 2, "LR": 0.05}, quiet=True)
    assert r["status"] == "not_reached" and r["steps"] == 10 and r["error"] is None
    assert r["trial"] == 2 and r["axes"] == {"trial": 2, "LR": 0.05} and r["seed"] == 42
    assert r["wall_time"] > 0 and r["device"] == "cpu" and np.isfinite(r["test_loss"])


# --- centering ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("center", [True, False])
def test_centered_job_starts_from_zero_output(center):
    bfn, calls = recorder()
    r = run_config(cfg(CENTER=center, ONLYTHRESHOLDS=False, MAX_ITER=2), dict(base_bfn=bfn), quiet=True)
    y0 = [c for c in calls if c["bsz"] == N_SAMPLES][0]["y"]
    zero_output_loss = float((y0 ** 2).mean())
    if center:
        assert r["train_raw"][0] == pytest.approx(zero_output_loss, rel=1e-6)
    else:
        assert abs(r["train_raw"][0] - zero_output_loss) > 1e-4


def counting_mlp():
    class CountingMLP(MLP):
        built, calls = [], collections.Counter()

        def __init__(self, d_in, width, depth, d_out):
            super().__init__(d_in=d_in, width=width, depth=depth, d_out=d_out)
            CountingMLP.built.append(id(self))

        def forward(self, x):
            CountingMLP.calls[id(self)] += 1
            return super().forward(x)

        @classmethod
        def baseline_calls(cls):
            return sum(n for i, n in cls.calls.items() if i not in cls.built)

    return CountingMLP


@pytest.mark.parametrize("online", [False, True])
def test_offline_centering_computes_the_baseline_once(online):
    M = counting_mlp()
    r = run_config(cfg(MODEL=M, ONLINE=online, MAX_ITER=20, ONLYTHRESHOLDS=False, EVAL_EVERY=5),
                dict(base_bfn=powerlaw_bfn, dim=8), quiet=True)
    assert len(M.built) == 1 and r["steps"] == 20
    assert M.calls[M.built[0]] == 20 + len(r["eval_steps"])  # one forward per step and per evaluation
    if online:
        assert M.baseline_calls() >= 20  # fresh inputs every step
    else:
        assert M.baseline_calls() == 2  # once on the fixed training set, once on the test set


# --- models ------------------------------------------------------------------------------------------------

def test_a_user_model_class_in_the_config_is_used_with_the_config_width():
    built = []

    class Mine(torch.nn.Module):
        def __init__(self, d_in, d_out, width, depth, mult):
            super().__init__()
            built.append(dict(d_in=d_in, d_out=d_out, width=width, depth=depth, mult=mult))
            self.a = torch.nn.Linear(d_in, width * mult)
            self.b = torch.nn.Linear(width * mult, d_out)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    def n_params(model, **kw):
        return sum(p.numel() for p in model.parameters())

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 'mult' is named by the model: no warning
        r = run_config(cfg(MODEL=Mine, WIDTH=24, DEPTH=3, mult=2, otherreturns={"n": n_params}),
                    dict(base_bfn=powerlaw_bfn, dim=5))
    assert built == [dict(d_in=5, d_out=1, width=24, depth=3, mult=2)]
    assert r["grabs"]["n"] == 5 * 48 + 48 + 48 + 1


def test_model_class_alias_is_accepted():
    M = counting_mlp()
    run_config(cfg(MODEL_CLASS=M), dict(base_bfn=powerlaw_bfn, dim=8), quiet=True)
    assert len(M.built) == 1


def test_a_model_from_a_file_is_used(tmp_path):
    src = tmp_path / "my_model.py"
    src.write_text(textwrap.dedent("""
        import json, os
        import torch
        from torch import nn

        class FileModel(nn.Module):
            def __init__(self, d_in, width, d_out):
                super().__init__()
                with open(os.path.join(os.path.dirname(__file__), "built.json"), "w") as f:
                    json.dump(dict(d_in=d_in, width=width, d_out=d_out), f)
                self.l1 = nn.Linear(d_in, width)
                self.l2 = nn.Linear(width, d_out)

            def forward(self, x):
                return self.l2(torch.relu(self.l1(x)))
    """))

    def n_params(model, **kw):
        return sum(p.numel() for p in model.parameters())

    r = run_config(cfg(MODEL_FILE=str(src), MODEL_NAME="FileModel", WIDTH=20, otherreturns={"n": n_params}),
                dict(base_bfn=powerlaw_bfn, dim=6), quiet=True)
    assert json.loads((tmp_path / "built.json").read_text()) == dict(d_in=6, width=20, d_out=1)
    assert r["grabs"]["n"] == 6 * 20 + 20 + 20 + 1 and r["status"] == "not_reached"


def test_model_file_without_model_name_fails(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("X = 1\n")
    with pytest.raises(ValueError, match="MODEL_NAME"):
        run_config(cfg(MODEL_FILE=str(src)), dict(base_bfn=powerlaw_bfn), quiet=True)


def test_d_in_and_d_out_are_inferred_from_the_data():
    M = counting_mlp()
    seen = {}

    def multi_bfn(bsz, gen, X, y, **kw):
        def batch_fn(step):
            Xb = torch.randn(bsz, 12, generator=gen, device=gen.device)
            return Xb, torch.stack([Xb[:, 0], Xb[:, 1], Xb[:, 2] * Xb[:, 3]], 1)
        return batch_fn if X is None else (lambda step: (X, y))

    def shapes(model, X_te, **kw):
        seen["in"] = model.input_layer.in_features
        seen["out"] = model(X_te).shape[1]
        return 0

    run_config(cfg(MODEL=M, otherreturns={"s": shapes}), dict(base_bfn=multi_bfn), quiet=True)
    assert seen == {"in": 12, "out": 3}


def blobs_bfn(bsz, gen, X, y, dim=6, n_classes=3, **kwargs):
    """Gaussian blobs around fixed class centres; labels are class indices (long)."""
    if X is not None:
        return lambda step: (X, y)
    # the same centres whatever the job's device: drawn on the CPU, then moved beside the batches
    centres = torch.randn(n_classes, dim, generator=torch.Generator().manual_seed(0)).to(gen.device) * 2

    def batch_fn(step):
        lab = torch.randint(0, n_classes, (bsz,), generator=gen, device=gen.device)
        return centres[lab] + torch.randn(bsz, dim, generator=gen, device=gen.device), lab
    return batch_fn


def test_cross_entropy_with_adamw_trains_a_classifier():
    opts = []

    def accuracy(model, X_te, y_te, opt, **kw):
        opts.append(opt)
        with torch.no_grad():
            return (model(X_te).argmax(1) == y_te).float().mean()

    c = cfg(LOSS="cross_entropy", OPTIMIZER="AdamW", LR=1e-2, WEIGHT_DECAY=1e-3, MAX_ITER=60, N_TEST=300,
            N_SAMPLES=64, ONLYTHRESHOLDS=False, EVAL_EVERY=20, n_classes=4, otherreturns={"acc": accuracy})
    r = run_config(c, dict(base_bfn=blobs_bfn), quiet=True)
    assert type(opts[0]) is torch.optim.AdamW and opts[0].defaults["weight_decay"] == 1e-3
    assert r["test_loss"] < 0.5 * r["test_curve"][0]
    assert r["train_loss"] < 0.5 * r["train_raw"][0]
    assert r["train_raw"][0] == pytest.approx(np.log(4), rel=1e-5)  # centred: uniform logits at init
    assert r["grabs"]["acc"][-1] > 0.8 and r["grabs"]["acc"][0] < 0.6


def test_momentum_with_an_optimizer_that_has_none_is_an_error():
    with pytest.raises(ValueError, match="MOMENTUM"):
        run_config(cfg(OPTIMIZER="Adam", MOMENTUM=0.9), dict(base_bfn=powerlaw_bfn), quiet=True)


def test_sgd_momentum_reaches_the_optimizer():
    seen = []
    run_config(cfg(MOMENTUM=0.9, otherreturns={"o": lambda opt, **kw: seen.append(opt) or 0}),
            dict(base_bfn=powerlaw_bfn), quiet=True)
    assert type(seen[0]) is torch.optim.SGD and seen[0].defaults["momentum"] == 0.9


# --- config flowing to the batch function, grabs and test set ---------------------------------------------

def test_config_keys_flow_to_the_batch_function_and_grabs():
    seen = {}

    def base_bfn(bsz, gen, X, y, N_TRAIN, dim, **kwargs):
        seen["N_TRAIN"], seen["dim"] = N_TRAIN, dim
        return powerlaw_bfn(bsz, gen, X, y, dim=dim)

    def grab(X_te, WIDTH, CLASSES, **kw):
        seen["grab"] = (X_te.shape[1], WIDTH, CLASSES)
        return 0

    with pytest.warns(UserWarning, match="N_TRIAN"):
        run_config(cfg(N_TRIAN=777, dim=11, CLASSES=5, otherreturns={"g": grab}), dict(base_bfn=base_bfn))
    assert seen == {"N_TRAIN": 777, "dim": 11, "grab": (11, 32, 5)}


def test_a_given_test_set_is_used():
    X_te = np.random.default_rng(0).normal(size=(30, 8))
    y_te = np.zeros((30, 1))
    seen = []

    def grab(X_te, y_te, **kw):
        seen.append((X_te, y_te))
        return 0

    bfn, calls = recorder()
    r = run_config(cfg(X_te=X_te, y_te=y_te, otherreturns={"g": grab}), dict(base_bfn=bfn), quiet=True)
    assert not [c for c in calls if c["bsz"] == N_TEST]  # no test set was drawn
    np.testing.assert_allclose(seen[0][0].cpu().numpy(), X_te, rtol=1e-6)
    assert seen[0][0].dtype == torch.float32
    assert np.isfinite(r["test_loss"])


def test_a_typo_fails_before_anything_runs():
    bfn, calls = recorder()
    with pytest.raises(ConfigError, match="WIDHT.*WIDTH"):
        run_config(cfg(WIDHT=64), dict(base_bfn=bfn))
    assert calls == []


def test_a_sweep_list_in_a_single_job_is_an_error():
    with pytest.raises(ConfigError, match="WIDTH"):
        run_config(cfg(WIDTH=[32, 64]), dict(base_bfn=powerlaw_bfn), quiet=True)


def test_batch_function_from_a_file(tmp_path):
    src = tmp_path / "bfns.py"
    src.write_text("from modelscape.data import powerlaw_bfn\n\n"
                   "def my_bfn(bsz, gen, X, y, **kw):\n    return powerlaw_bfn(bsz, gen, X, y, dim=3)\n")
    seen = []
    run_config(cfg(otherreturns={"g": lambda X_te, **kw: seen.append(X_te.shape) or 0}),
            dict(bfn_file=str(src), bfn_name="my_bfn"), quiet=True)
    assert seen == [(N_TEST, 3)] * 2  # once on the initial model (the pre-training check), once at the end


def test_post_init_fn_receives_model_and_optimizer():
    seen = {}

    def post_init_fn(model, opt, lr):
        seen.update(model=model, lr=lr)
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        return model, torch.optim.SGD(model.parameters(), lr=0.0)

    r = run_config(cfg(CENTER=False, ONLYTHRESHOLDS=False, post_init_fn=post_init_fn),
                dict(base_bfn=powerlaw_bfn), quiet=True)
    assert isinstance(seen["model"], MLP) and seen["lr"] == 0.05
    assert np.all(r["train_raw"] > 0) and np.ptp(r["test_curve"]) == 0  # lr 0: the model never moves


# --- failures ----------------------------------------------------------------------------------------------

def test_an_exception_in_a_grab_fails_the_job_with_the_grabs_name():
    def exploding_grab(**kw):
        return 1 / 0

    c = cfg(otherreturns={"exploding_grab": exploding_grab})
    with pytest.raises(RuntimeError, match="exploding_grab"):
        run_config(c, dict(base_bfn=powerlaw_bfn), quiet=True)
    r = run_config_safe(c, dict(base_bfn=powerlaw_bfn), axes={"trial": 0})
    assert r["status"] == "failed"
    assert "exploding_grab" in r["error"] and "ZeroDivisionError" in r["error"]
    assert r["axes"] == {"trial": 0} and r["oom"] is False


def test_run_job_safe_turns_a_config_error_into_a_failed_record():
    r = run_config_safe(cfg(Lr=0.1), dict(base_bfn=powerlaw_bfn))
    assert r["status"] == "failed" and "'Lr'" in r["error"] and "'LR'" in r["error"]


def test_a_diverging_job_is_recorded_as_diverged():
    r = run_config_safe(cfg(LR=1e4, MAX_ITER=2000), dict(base_bfn=powerlaw_bfn, dim=8))
    assert r["status"] == "diverged" and r["steps"] < 100
