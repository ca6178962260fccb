"""The original modelscape's face: its modules, names, config keys, hooks and result layout, each checked for
what it does (not merely that it imports), and each running on the one engine (run_config / train_loop)."""
import argparse
import contextlib
import json
import pickle
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from deadlines import scaled  # noqa: E402  (deadlines stretched on a busy machine)
import torch
from torch import nn

import modelscape.backend.job as job_module
import modelscape.backend.trainloop as trainloop_module
from modelscape import mup
from modelscape.backend.cli import base_args, int_from_any, parse_args, str2bool
from modelscape.backend.job import run_job
from modelscape.backend.job_iterator import SweepFailed, main as run_job_iterator
from modelscape.backend.trainloop import train_model
from modelscape.backend.utils import (derive_seed, ensure_numpy, ensure_torch, load_config, load_json,
                                      seed_everything, tuple_to_numpy)
from modelscape.config import ConfigError
from modelscape.model import MLP, CenteredWrapper, SimpleCNN, SimpleTransformer, centeredmodel
from modelscape.models import Centered

DIM = 6


def gauss_bfn(bsz, gen, X=None, y=None, dim=DIM, **kwargs):
    """Offline: the given set; online: a fresh linear-teacher batch per step."""
    if X is not None:
        return lambda step: (X, y)

    def batch_fn(step):
        Xb = torch.randn(bsz, dim, generator=gen, device=gen.device)
        return Xb, Xb.sum(1) / dim ** 0.5
    return batch_fn


def label_bfn(bsz, gen, X=None, y=None, dim=DIM, n_classes=3, **kwargs):
    def batch_fn(step):
        return (torch.randn(bsz, dim, generator=gen, device=gen.device),
                torch.randint(0, n_classes, (bsz,), generator=gen, device=gen.device))
    return batch_fn


def small(**kw):
    """An original-style global config (lower-case width/depth, DIM) for a tiny fast job."""
    base = {"LR": 0.05, "MAX_ITER": 3, "LOSS_CHECKPOINTS": [1e-9], "EMA_SMOOTHER": 0.0, "ONLYTHRESHOLDS": True,
            "VERBOSE": False, "ONLINE": True, "N_TEST": 16, "SEED": 1, "width": 16, "depth": 2}
    base.update(kw)
    return base


@contextlib.contextmanager
def _quiet():
    """The original's configs carry keys nothing names (DIM, N_TOT ...): their warnings are expected here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def run_one(config, bfn=gauss_bfn, job=(8, 0), names=("ntrain", "trial")):
    with _quiet():
        return run_job(0, job, config, dict(base_bfn=bfn), list(names))


# --- modelscape.model --------------------------------------------------------------------------------------

def test_mlp_layers_and_get_activations_match_forward():
    torch.manual_seed(0)
    m = MLP(d_in=5, width=12, depth=3, d_out=2)
    assert isinstance(m.input_layer, nn.Linear) and len(m.hidden_layers) == 2 and m.output_layer.out_features == 2
    x = torch.randn(7, 5)
    hidden, out = m.get_activations(x)
    assert len(hidden) == 3 and all(h.shape == (7, 12) for h in hidden)
    assert all((h >= 0).all() for h in hidden)  # post-ReLU
    torch.testing.assert_close(out, m(x))
    torch.testing.assert_close(hidden[-1] @ m.output_layer.weight.T + m.output_layer.bias, out)
    assert torch.count_nonzero(MLP(d_in=5, width=12, forcezeros=True)(x)) == 0


def test_get_activations_sees_mup_multipliers():
    torch.manual_seed(0)
    m = MLP(d_in=5, width=64, depth=2)
    mup.parameterize(m, "mup", torch.optim.SGD, 0.1)
    x = torch.randn(4, 5)
    hidden, out = m.get_activations(x)
    torch.testing.assert_close(out, m(x))
    # the ReLU gain sqrt(2) and the read-in multiplier are inside the activations
    pre = m.input_layer(x)
    torch.testing.assert_close(hidden[0], torch.relu(pre) * 2 ** 0.5)


def test_simple_cnn_flattens_into_its_readout_and_needs_depth_two():
    m = SimpleCNN(in_channels=2, img_size=6, width=4, depth=3, d_out=3)
    assert m.output_layer.in_features == 4 * 6 * 6 and len(m.hidden_layers) == 2
    assert m(torch.randn(5, 2, 6, 6)).shape == (5, 3)
    roles = {layer.path: layer.role for layer in mup.anatomy(m).layers}
    assert roles["output_layer"] == "readout" and roles["input_layer"] == "readin"  # still the read-out for muP
    with pytest.raises(ValueError, match="depth"):
        SimpleCNN(depth=1)


def test_simple_transformer_blocks_have_no_residual():
    torch.manual_seed(0)
    m = SimpleTransformer(d_in=3, width=8, depth=2, d_out=1, seq_len=5)
    x = torch.randn(4, 5, 3)
    assert m(x).shape == (4, 1)
    block = m.hidden_layers[0]
    h = torch.randn(4, 5, 8)
    torch.testing.assert_close(block(h), block.attn(block.fc2(torch.relu(block.fc1(h)))))
    mup.parameterize(m, "mup", torch.optim.SGD, 0.1)  # its layers can be classified
    assert m(x).shape == (4, 1)


def test_centered_wrapper_has_the_original_attributes_and_recenters():
    torch.manual_seed(0)
    inner = MLP(d_in=3, width=8)
    net = centeredmodel(inner)
    assert isinstance(net, CenteredWrapper) and isinstance(net, Centered)
    assert net.model is inner and not any(p.requires_grad for p in net.baseline.parameters())
    x = torch.randn(6, 3)
    assert torch.count_nonzero(net(x)) == 0
    with torch.no_grad():
        inner.output_layer.bias.add_(1.0)
    torch.testing.assert_close(net(x), torch.ones(6, 1))
    net.recenter()
    assert torch.count_nonzero(net(x)) == 0
    low = CenteredWrapper(MLP(d_in=3, width=8), baseline_dtype=torch.float64)
    assert next(low.baseline.parameters()).dtype == torch.float64 and low(x).dtype == torch.float32


# --- backend.utils and backend.cli -----------------------------------------------------------------------

def test_utils_conversions(tmp_path):
    t = ensure_torch(np.arange(4), device="cpu")
    assert t.dtype == torch.float32 and t.device.type == "cpu"  # labels too: the original cast everything
    assert ensure_torch(t, device="cpu") is t and ensure_torch(t, device="cpu", clone=True) is not t
    assert ensure_numpy([1, 2]).dtype == np.float64 and ensure_numpy(torch.ones(2, dtype=torch.int32)).dtype == np.int32
    nested = tuple_to_numpy({"a": (torch.ones(2), [torch.zeros(1), "s", None]), "b": 3})
    assert isinstance(nested["a"], tuple) and isinstance(nested["a"][0], np.ndarray)
    assert nested["a"][1][1:] == ["s", None] and nested["b"] == 3
    (tmp_path / "c.json").write_text(json.dumps({"LR": 0.1}))
    assert load_config(tmp_path / "c.json") == load_json(tmp_path / "c.json") == {"LR": 0.1}
    with pytest.raises(ValueError, match=".toml"):
        load_config(tmp_path / "c.toml")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_json(tmp_path / "nope.json")


def test_seeding_utils():
    assert derive_seed(3, 0) == derive_seed(3, 0) != derive_seed(3, 1)
    assert 0 <= derive_seed(3, 0) < 2 ** 32 and derive_seed(None) != derive_seed(None)
    g1, r1 = seed_everything(5)
    a = torch.randn(3, generator=g1, device=g1.device), r1.random(), torch.rand(1), np.random.rand()
    g2, r2 = seed_everything(5)
    b = torch.randn(3, generator=g2, device=g2.device), r2.random(), torch.rand(1), np.random.rand()
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and torch.equal(a[2], b[2]) and a[3] == b[3]
    assert seed_everything(5, make_generators=False) is None


def test_cli_types():
    assert int_from_any("1e4") == 10000 and int_from_any("5.0") == 5 and int_from_any(7) == 7
    with pytest.raises(argparse.ArgumentTypeError, match="abc"):
        int_from_any("abc")
    assert str2bool("Yes") is True and str2bool("0") is False and str2bool(False) is False
    with pytest.raises(argparse.ArgumentTypeError):
        str2bool("maybe")


def test_width_depth_flags_and_sweepable_lists():
    a = parse_args(["--width", "64", "--depth", "3", "--N_SAMPLES", "32"])
    assert a.width == a.WIDTH == [64] and a.depth == a.DEPTH == [3] and a.N_SAMPLES == [32]
    assert "width" not in vars(a)  # one key per hyperparameter in args.__dict__
    a.width = [128]
    assert a.WIDTH == [128]
    b = base_args()
    for key in ("N_SAMPLES", "LR", "WIDTH", "DEPTH", "GAMMA"):
        assert isinstance(getattr(b, key), list) and len(getattr(b, key)) == 1, key
    assert b.depth == b.DEPTH and b.N_TRIAN == b.N_TRAIN  # the original's spellings read the same values


def test_one_value_lists_from_base_args_run_as_scalars():
    """``global_config = args.__dict__`` with WIDTH=[16], LR=[0.05] ... runs; the job sees scalars."""
    seen = {}

    def grab(model, WIDTH, LR, **kw):
        seen.update(width=model.width, WIDTH=WIDTH, LR=LR)
        return 0.0

    args = base_args()
    args.WIDTH, args.LR, args.MAX_ITER, args.N_TEST, args.N_SAMPLES = [16], [0.05], 2, 8, [4]
    g = {**vars(args), "otherreturns": {"g": grab}}
    res = run_job_iterator([args.N_SAMPLES, range(1)], ["N_SAMPLES", "trial"], g, dict(base_bfn=gauss_bfn),
                           store=False, executor="inprocess", progress=False)
    assert res.status_counts() == {"not_reached": 1}
    assert seen == dict(width=16, WIDTH=16, LR=0.05)


# --- run_job ---------------------------------------------------------------------------------------------

def test_run_job_returns_the_original_tuple():
    def batch_size(X_tr, **kw):
        return X_tr.shape[0]

    job, tk, tr, te, bs = run_one(small(otherreturns={"bsz": batch_size}), job=(8, 1))
    assert job == (8, 1) and tk.shape == (1,) and isinstance(tr, float) and isinstance(te, float)
    assert bs == 8 and isinstance(bs, int)  # the ntrain axis is the batch size; a scalar grab is a scalar
    job, tk, tr, te = run_one(small(ONLYTHRESHOLDS=False, MAX_ITER=5, EVAL_EVERY=2))
    assert tr.shape == (5,) and te.shape == (4,)  # loss per step; test loss at steps 0, 2, 4 and the end


def test_run_job_runs_on_the_engine(monkeypatch):
    calls = []
    real = job_module.run_config
    monkeypatch.setattr(job_module, "run_config", lambda *a, **k: calls.append(a) or real(*a, **k))
    run_one(small())
    assert len(calls) == 1 and calls[0][0]["N_SAMPLES"] == 8 and calls[0][3] == {"ntrain": 8, "trial": 0}


def test_default_model_is_read_from_job_MLP_at_call_time(monkeypatch):
    built = []

    class Spy(MLP):
        def __init__(self, d_in=1, width=4096, depth=2, d_out=1):
            built.append(dict(d_in=d_in, width=width, depth=depth))
            super().__init__(d_in=d_in, width=width, depth=depth, d_out=d_out)

    monkeypatch.setattr(job_module, "MLP", Spy)
    run_one(small())
    assert built and built[0]["width"] == 16 and built[0]["depth"] == 2 and built[0]["d_in"] == DIM
    built.clear()
    run_one(small(MODEL_CLASS=MLP))
    assert not built


# --- config keys the original read --------------------------------------------------------------------------

def opt_state(opt, **kw):
    g = opt.param_groups[0]
    return np.array([float(g.get("momentum", -1)), float(g.get("nesterov", -1)), float(g.get("weight_decay", -1))])


def test_optimizer_keys_and_forwarded_ctor_kwargs():
    names = []

    def opt_name(opt, **kw):
        names.append(type(opt).__name__)
        return 0.0

    for key, value, expected in [("optimizer", "Adam", "Adam"), ("OPTIMIZER_CLASS", torch.optim.Adam, "Adam"),
                                 ("optimizer_class", "AdamW", "AdamW"), ("OPTIMIZER_FN", torch.optim.RMSprop, "RMSprop")]:
        names.clear()  # the grab also runs once before training (the store's pre-check): every call must agree
        run_one(small(**{key: value}, otherreturns={"n": opt_name}))
        assert names and set(names) == {expected}, key
    *_, state = run_one(small(momentum=0.9, nesterov=True, weight_decay=0.01, otherreturns={"s": opt_state}))
    np.testing.assert_allclose(state, [0.9, 1.0, 0.01])


def test_loss_keys_and_forwarded_ctor_kwargs():
    base = small(d_out=3, MODEL_CLASS=MLP)
    plain = run_one({**base, "loss": "CrossEntropyLoss"}, bfn=label_bfn)
    smooth = run_one({**base, "LOSS_CLASS": nn.CrossEntropyLoss, "label_smoothing": 0.4}, bfn=label_bfn)
    same = run_one({**base, "loss_class": "CrossEntropyLoss", "label_smoothing": 0.0}, bfn=label_bfn)
    assert plain[2] == same[2] != smooth[2]  # the smoothing reached the loss
    with pytest.raises(ValueError, match="NotALoss"):
        run_one({**base, "loss": "NotALoss"}, bfn=label_bfn)


def test_model_file_and_post_init_fn_keys(tmp_path):
    src = tmp_path / "mymodel.py"
    src.write_text(textwrap.dedent("""
        import torch.nn as nn
        class Tiny(nn.Module):
            def __init__(self, d_in=1, width=4, **kw):
                super().__init__()
                self.a, self.b = nn.Linear(d_in, width), nn.Linear(width, 1)
            def forward(self, x):
                return self.b(self.a(x).relu())
    """))
    kind = lambda model, **kw: float(type(model).__name__ == "Tiny")  # noqa: E731
    *_, got = run_one(small(model_file=str(src), model_name="Tiny", otherreturns={"k": kind}))
    assert got == 1.0
    calls = []
    run_one(small(POST_INIT_FN=lambda model, opt, lr: calls.append(lr)))
    assert calls == [0.05]


# --- hooks: PARAMETERIZATION and GAMMA -------------------------------------------------------------------

def readout_mult(model, **kw):
    return float(getattr(model.output_layer, "_mup_mult", 1.0))


def test_hook_without_explicit_parameterization_is_not_parameterized_on_top():
    seen = {}

    def hook(model, opt):
        seen["mult"] = readout_mult(model)
        seen["groups"] = len(opt.param_groups)

    run_one(small(post_init_fn=hook))
    assert seen == {"mult": 1.0, "groups": 1}  # sp: untouched, one group
    *_, mult = run_one(small(otherreturns={"m": readout_mult}))
    assert mult != 1.0  # without a hook the default is muP
    run_one(small(post_init_fn=hook, PARAMETERIZATION="sp"))  # explicit sp with a hook is consistent


def test_hook_and_explicit_parameterization_is_an_error_before_training():
    ran = []
    bfn = lambda bsz, gen, X=None, y=None: ran.append(bsz) or gauss_bfn(bsz, gen, X, y)  # noqa: E731
    g = small(post_init_fn=lambda model, opt: None, PARAMETERIZATION="mup")
    with pytest.raises(ConfigError, match="post_init_fn.*PARAMETERIZATION"):
        run_job_iterator([[8], [0]], ["ntrain", "trial"], g, dict(base_bfn=bfn), store=False, progress=False)
    assert ran == []


def _output_at_init(gamma, hook=None):
    """Final model output with LR 0 (so it is the initial model), uncentered, for GAMMA = gamma."""
    def out(model, X_te, **kw):
        return model(X_te).detach().cpu().numpy().ravel()
    g = small(GAMMA=gamma, LR=0.0, MAX_ITER=1, CENTER=False, otherreturns={"out": out}, mup_param="mup")
    if hook is not None:
        g["post_init_fn"] = hook
    return run_one(g)[-1]


def own_rescale_hook(model, opt, gamma=1.0, mup_param="mup", **_):
    mup.mupify(model, opt, param=mup_param)
    mup.rescale(model, gamma)
    return model, opt


def foreign_rescale_hook(model, opt, gamma=1.0, **_):
    """Applies gamma by its own means (as the original mupify library's rescale does)."""
    mup.mupify(model, opt, param="mup")
    with torch.no_grad():
        model.output_layer.weight.div_(gamma)
        model.output_layer.bias.div_(gamma)


def mupify_only_hook(model, opt, **_):
    mup.mupify(model, opt, param="mup")


@pytest.mark.parametrize("hook", [None, own_rescale_hook, foreign_rescale_hook, mupify_only_hook])
def test_gamma_divides_the_output_exactly_once(hook):
    ratio = _output_at_init(4.0, hook) / _output_at_init(1.0, hook)
    np.testing.assert_allclose(ratio, 0.25, rtol=1e-5)


def test_mupify_regroups_the_optimizer_in_place_like_parameterize():
    torch.manual_seed(0)
    a = MLP(d_in=4, width=32)
    opt = torch.optim.SGD(a.parameters(), lr=0.3, momentum=0.5)
    assert mup.mupify(a, opt, "mup-lr") is None
    torch.manual_seed(0)
    b = MLP(d_in=4, width=32)
    ref = mup.parameterize(b, "mup-lr", torch.optim.SGD, 0.3, momentum=0.5)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref.param_groups]
    assert all(g["momentum"] == 0.5 for g in opt.param_groups)
    mup.mupify(a, opt, "mup-lr")  # again: the base learning rate is remembered, not compounded
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref.param_groups]
    with pytest.raises(ValueError, match="sp"):
        mup.mupify(a, opt, "sp")


# --- train_model ---------------------------------------------------------------------------------------------

def test_train_model_returns_the_original_shapes(monkeypatch):
    calls = []
    real = trainloop_module.train_loop
    monkeypatch.setattr(trainloop_module, "train_loop", lambda *a, **k: calls.append(k) or real(*a, **k))
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    bfn = gauss_bfn(16, gen)
    X_te, y_te = gauss_bfn(32, gen)(0)
    final = train_model(MLP(d_in=DIM, width=16), bfn, lr=0.05, max_iter=6, loss_checkpoints=1e-9,
                        only_thresholds=True, X_te=X_te, y_te=y_te,
                        otherreturns={"n": lambda model, **kw: float(model.width)})
    assert isinstance(final["model"], CenteredWrapper) and final["n"] == 16.0
    assert isinstance(final["train_losses"], float) and isinstance(final["test_losses"], float)
    assert np.isnan(final["timekeys"]).all()  # never crossed: NaN (the original stored 0)
    curves = train_model(MLP(d_in=DIM, width=16), bfn, lr=0.05, max_iter=6, loss_checkpoints=[10.0, 1e-9],
                         X_te=X_te, y_te=y_te, otherreturns={"w": lambda model, **kw: model.output_layer.weight.sum()})
    assert curves["train_losses"].shape == curves["test_losses"].shape == (6,) and curves["w"].shape == (6,)
    assert curves["timekeys"][0] == 0 and np.isnan(curves["timekeys"][1])
    assert len(calls) == 2  # the one engine
    # the last test loss is the final model's
    with torch.no_grad():
        assert curves["test_losses"][-1] == pytest.approx(float(nn.MSELoss()(curves["model"](X_te).squeeze(), y_te)))


def test_train_model_optimizer_loss_hook_and_thresholds():
    gen = torch.Generator().manual_seed(0)
    bfn = label_bfn(16, gen)
    model = MLP(d_in=DIM, width=8, d_out=3)
    seen = {}

    def hook(model, opt, lr, tag):
        seen.update(opt=type(opt).__name__, lr=lr, tag=tag, nesterov=opt.param_groups[0]["nesterov"])

    train_model(model, bfn, lr=0.1, max_iter=2, percent_thresholds=[0.5], loss="CrossEntropyLoss",
                label_smoothing=0.1, momentum=0.9, nesterov=True, post_init_fn=hook, tag="x")
    assert seen == dict(opt="SGD", lr=0.1, tag="x", nesterov=True)
    inst = torch.optim.Adam(model.parameters(), lr=1e-3)
    used = []
    train_model(model, bfn, max_iter=1, loss_checkpoints=[0.1], OPTIMIZER_INSTANCE=inst, only_thresholds=True,
                LOSS_INSTANCE=nn.CrossEntropyLoss(), otherreturns={"o": lambda opt, **k: used.append(opt) or 0.0})
    assert used and all(o is inst for o in used)  # before training (the pre-check) and at the end
    with pytest.raises(ValueError, match="exactly one"):
        train_model(model, bfn, loss_checkpoints=[0.1], percent_thresholds=[0.5])


# --- results in expt-core's layout -------------------------------------------------------------------------

def test_results_are_expt_core_traces_and_keep_their_views(tmp_path):
    def norm(model, **kw):
        return model.output_layer.weight.norm()  # a 0-d tensor: comes back a float

    g = small(ONLYTHRESHOLDS=False, MAX_ITER=4, EVAL_EVERY=1, otherreturns={"norm": norm}, LOSS_CHECKPOINTS=[5.0, 1e-9])
    with _quiet():
        res = run_job_iterator([[4, 8], range(2)], ["ntrain", "trial"], g, dict(base_bfn=gauss_bfn),
                               store=str(tmp_path / "st"), executor="inprocess", progress=False)
    for trace in (res["losses"], res["timekeys"], res["extras"]["norm"]):
        assert isinstance(trace, dict) and trace["var_names"] == ["ntrain", "trial"]
        c2o = trace["config2outcome"]
        assert set(c2o) == {(4, 0), (4, 1), (8, 0), (8, 1)}
        assert all(np.shape(v) == trace["outcome_shape"] for v in c2o.values())
        assert all(isinstance(c, (int, float, str, tuple)) for key in c2o for c in key)
        back = pickle.loads(pickle.dumps(trace))
        assert back["var_names"] == trace["var_names"] and back.get(ntrain=4).shape[0] == 2
    assert res["timekeys"]["outcome_shape"] == (2,) and res["losses"]["outcome_shape"] == (5,)
    assert res["extras"]["norm"].get(ntrain=8, trial=1).shape == (5,)
    assert res.to_xarray()["grab_norm"].dims == ("ntrain", "trial", "eval_step")
    g.update(ONLYTHRESHOLDS=True)
    with _quiet():
        res = run_job_iterator([[4], range(2)], ["ntrain", "trial"], g, dict(base_bfn=gauss_bfn),
                               store=str(tmp_path / "st2"), executor="inprocess", progress=False)
    vals = list(res["extras"]["norm"]["config2outcome"].values())
    assert all(type(v) is float for v in vals) and res["extras"]["norm"]["outcome_shape"] == ()


# --- an all-failed sweep -------------------------------------------------------------------------------------

def broken_bfn(bsz, gen, X=None, y=None):
    raise RuntimeError("no data today")


def test_all_failed_sweep_raises_and_a_script_exits_with_one_line(tmp_path):
    with pytest.raises(SweepFailed, match="all 2 jobs.*no data today") as e:
        run_job_iterator([[4, 8]], ["ntrain"], small(), dict(base_bfn=broken_bfn), store=False,
                         executor="inprocess", progress=False)
    assert e.value.result.status_counts() == {"failed": 2}
    script = tmp_path / "sweep.py"
    script.write_text(textwrap.dedent("""
        from modelscape.backend.job_iterator import main
        def bfn(bsz, gen, X=None, y=None):
            raise RuntimeError("no data today")
        main([[4]], ["ntrain"], dict(MAX_ITER=2, N_TEST=4), dict(base_bfn=bfn), store=False, executor="inprocess",
             progress=False)
    """))
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=scaled(120))
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1].startswith("error: all 1 jobs of the sweep failed")
    assert "Traceback" not in p.stderr


def test_original_keys_are_read_as_schema_keys_and_conflicts_are_errors():
    from modelscape.config import canonicalize, defaults
    with _quiet():
        out = canonicalize({**defaults(), "optimizer": "Adam", "loss": "CrossEntropyLoss", "momentum": 0.9,
                            "model_name": "Net", "POST_INIT_FN": print, "WIDTH": [32]})
    assert (out["OPTIMIZER"], out["LOSS"], out["MOMENTUM"], out["MODEL_NAME"]) == ("Adam", "CrossEntropyLoss", 0.9,
                                                                                   "Net")
    assert out["post_init_fn"] is print and out["WIDTH"] == 32 and "optimizer" not in out
    with pytest.raises(ConfigError, match="optimizer.*OPTIMIZER"):
        canonicalize({"OPTIMIZER": "AdamW", "optimizer": "Adam"})
    # the original's style on top of parse_args(): args.__dict__ holds WIDTH=[8192], the script sets width
    with _quiet():
        assert canonicalize({**vars(base_args()), "width": 64})["WIDTH"] == 64
        assert canonicalize({**vars(base_args()), "WIDTH": [32], "width": [8192]})["WIDTH"] == 32


class PlainMomentum(torch.optim.Optimizer):
    """A custom optimizer muP cannot classify (not an SGD or Adam subclass), like the original's example Muon."""

    def __init__(self, params, lr=0.01, momentum=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])


def test_unknown_optimizer_is_an_error_unless_its_rule_is_declared():
    def lrs(opt, **kw):  # [groups, learning rate of each group's weight matrices (NaN: none)]
        weights = [[g["lr"] for p in g["params"] if p.ndim >= 2] for g in opt.param_groups]
        return np.array([len(opt.param_groups)] + [w[0] if w else np.nan for w in weights])
    # a wrong rule mis-scales every layer: no guessing, under the default muP as under an explicit one
    for extra in ({}, {"PARAMETERIZATION": "mup"}):
        with pytest.raises(ConfigError, match="PlainMomentum.*UPDATE_RULE='sgd'"):
            run_one(small(OPTIMIZER_CLASS=PlainMomentum, **extra))
    # the original's (mupify's) behaviour, declared: SGD's rule, factor 1 for every weight matrix under mup
    *_, got = run_job(0, (8, 0), small(OPTIMIZER_CLASS=PlainMomentum, momentum=0.5, UPDATE_RULE="sgd",
                                       otherreturns={"lr": lrs}), dict(base_bfn=gauss_bfn), ["ntrain", "trial"])
    assert got[0] > 1 and not np.isnan(got[1:]).all()  # parameterized (sp would leave one group)
    np.testing.assert_allclose(got[1:][~np.isnan(got[1:])], 0.05)


def test_worker_runs_queued_jobs_until_none_and_reports_errors():
    import queue
    from modelscape.backend.worker import worker
    jobs, results = queue.Queue(), queue.Queue()
    for item in [("job", 0, (8, 0)), (4, 1), None]:
        jobs.put(item)
    with _quiet():
        worker(0, jobs, results, small(), dict(base_bfn=gauss_bfn), ["ntrain", "trial"])
    (k1, p1), (k2, p2) = results.get_nowait(), results.get_nowait()
    assert (k1, k2) == ("ok", "ok") and p1[0] == (8, 0) and p2[0] == (4, 1) and isinstance(p1[1], np.ndarray)
    jobs.put((4, 0))
    jobs.put(None)
    with _quiet():
        worker(0, jobs, results, small(), dict(base_bfn=broken_bfn), ["ntrain", "trial"])
    kind, (job, err) = results.get_nowait()
    assert kind == "err" and job == (4, 0) and "no data today" in err
