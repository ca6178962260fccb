"""Per-layer diagnostics (``modelscape.diagnostics.LayerDiagnostics``): equal to SVD-based numbers on small layers,
labelled in the results (layer x measure, by name, across depths), and invisible to training (same numbers with
and without the grab)."""
import math
import pickle

import cloudpickle
import numpy as np
import pytest
import torch

from modelscape import mup
from modelscape.backend.cli import base_args
from modelscape.backend.job_iterator import main
from modelscape.data import powerlaw_bfn
from modelscape.diagnostics import MEASURES, LayerDiagnostics
from modelscape.models import MLP
from modelscape.utils import Labelled


def effective(module):
    s = getattr(module, "_mup_mult", 1.0) / getattr(module, "_mup_gamma", 1.0)
    return module.weight.detach().reshape(module.weight.shape[0], -1) * s


def test_measures_equal_an_svd_based_computation_on_small_layers():
    torch.manual_seed(0)
    model = MLP(d_in=8, width=16, depth=2)
    opt = mup.parameterize(model, "mup", torch.optim.SGD, 0.5, example_input=torch.randn(4, 8))
    diag = LayerDiagnostics(first_iters=300, iters=300)
    X = torch.randn(32, 8)
    first = diag(model, X_tr=X, step=0)
    assert isinstance(first, Labelled) and first.dims == ("layer", "measure")
    assert first.coords["layer"] == ["input_layer", "hidden_layers.0", "output_layer"]
    assert first.coords["measure"] == list(MEASURES)
    layers = dict(model.named_modules())
    W0 = {p: effective(layers[p]).clone() for p in first.coords["layer"]}
    for _ in range(5):
        loss = (model(X) - X[:, :1]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    inputs = {}
    hooks = [layers[p].register_forward_pre_hook(lambda m, a, p=p: inputs.setdefault(p, a[0].detach()))
             for p in W0]
    with torch.no_grad():
        model(X)
    for h in hooks:
        h.remove()
    got = diag(model, X_tr=X, step=5).values
    for k, p in enumerate(first.coords["layer"]):
        W = effective(layers[p])
        fan_out, fan_in = W.shape
        D = W - W0[p]
        sv, dsv = float(torch.linalg.matrix_norm(W, 2)), float(torch.linalg.matrix_norm(D, 2))
        x = inputs[p]
        align = float((torch.linalg.vector_norm(x @ D.T, dim=1) / (dsv * torch.linalg.vector_norm(x, dim=1))).mean())
        want = [sv, sv / math.sqrt(fan_out / fan_in), dsv, dsv / math.sqrt(fan_out / fan_in),
                float(torch.linalg.vector_norm(W - W0[p]) / torch.linalg.vector_norm(W0[p])) / 5, align]
        np.testing.assert_allclose(got[k], want, rtol=1e-4)
    assert np.isnan(first.values[:, MEASURES.index("relative_update")]).all()  # no earlier evaluation
    assert np.isnan(first.values[:, MEASURES.index("alignment")]).all()  # no change yet


def test_power_iteration_warm_starts_converge_across_evaluations():
    torch.manual_seed(1)
    model = MLP(d_in=32, width=64, depth=2)
    diag = LayerDiagnostics(first_iters=2, iters=2)  # too few at once; enough after several evaluations
    truth = [float(torch.linalg.matrix_norm(effective(m), 2)) for p, m in model.named_modules()
             if isinstance(m, torch.nn.Linear)]
    errs = []
    for step in range(20):
        errs.append(np.max(np.abs(diag(model, step=step).values[:, 0] - truth) / truth))
    assert errs[-1] < 1e-3 < errs[0]


def sweep(otherreturns, axes=([16], [0.05]), names=("WIDTH", "LR"), **cfg):
    g = vars(base_args())
    g.update(dict(MAX_ITER=12, N_SAMPLES=16, N_TEST=32, ONLYTHRESHOLDS=False, EVAL_EVERY=5, DEPTH=2,
                  LOSS_CHECKPOINTS=[1e-9], otherreturns=otherreturns, FUSE="off"), **cfg)
    return main(list(axes), list(names), g, dict(base_bfn=powerlaw_bfn, dim=8), executor="inprocess",
                store=False, progress=False)


def test_in_a_sweep_the_values_are_labelled_and_training_is_untouched():
    plain = sweep({"n": lambda model, **kw: 1.0})
    res = sweep({"n": lambda model, **kw: 1.0, "layers": LayerDiagnostics()})
    np.testing.assert_array_equal(res.records[0]["train_raw"], plain.records[0]["train_raw"])
    da = res.to_xarray()["grab_layers"]
    assert da.dims == ("WIDTH", "LR", "eval_step", "layer", "measure")
    assert list(da["layer"].values) == ["input_layer", "hidden_layers.0", "output_layer"]
    assert list(da["eval_step"].values) == [0, 5, 10, 12]
    delta = da.sel(measure="delta_spectral_norm", WIDTH=16, LR=0.05)
    assert (delta.sel(eval_step=0) == 0).all() and (delta.sel(eval_step=12) > 0).all()
    # jobs of different depths name different layers: the coordinate is their union, NaN where a job has none
    deep = sweep({"layers": LayerDiagnostics()}, axes=([1, 2],), names=("DEPTH",), WIDTH=16)
    da = deep.to_xarray()["grab_layers"]
    assert list(da["layer"].values) == ["input_layer", "output_layer", "hidden_layers.0"]
    assert np.isnan(da.sel(DEPTH=1, layer="hidden_layers.0", measure="spectral_norm")).all()
    assert np.isfinite(da.sel(DEPTH=2, layer="hidden_layers.0", measure="spectral_norm")).all()


def test_the_grab_travels_to_workers_without_its_state():
    diag = LayerDiagnostics(iters=3)
    diag(MLP(d_in=4, width=8, depth=1), step=0)
    copy = pickle.loads(cloudpickle.dumps(diag))
    assert copy.iters == 3 and len(copy._state) == 0


def test_a_labelled_grab_value_is_checked():
    with pytest.raises(ValueError, match="2 dims"):
        Labelled(np.zeros(3), ("a", "b"))
    with pytest.raises(ValueError, match="coordinate 'a' has 2 labels"):
        Labelled(np.zeros(3), ("a",), {"a": [1, 2]})
    assert Labelled(np.zeros((2, 2)), ("a", "b"), {"a": ["x", "y"]}).coords == {"a": ["x", "y"], "b": [0, 1]}


def test_labels_survive_the_store(tmp_path):
    import modelscape
    g = vars(base_args())
    g.update(dict(WIDTH=16, MAX_ITER=6, N_SAMPLES=16, N_TEST=32, ONLYTHRESHOLDS=True, LOSS_CHECKPOINTS=[1e-9],
                  otherreturns={"layers": LayerDiagnostics()}))
    main([[0.05, 0.1]], ["LR"], g, dict(base_bfn=powerlaw_bfn, dim=8), executor="inprocess", store=tmp_path / "s",
         progress=False)
    da = modelscape.load(tmp_path / "s").to_xarray()["grab_layers"]
    assert da.dims == ("LR", "layer", "measure") and list(da["measure"].values) == list(MEASURES)
    assert (da.sel(measure="delta_spectral_norm") > 0).all()
