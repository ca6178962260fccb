"""muP: the per-layer rules, GAMMA, copies, errors, and the physics (width-stable updates, LR transfer)."""
import copy
import math
import pickle

import cloudpickle
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelscape import mup
from modelscape.data.synthetic import powerlaw_bfn
from modelscape.models import CNN, MLP, Centered, Transformer

PARAMS = ("ntp", "mup", "mfp", "ntp-lr", "mup-lr")
D_IN, D_OUT = 16, 8


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def mlp(width, seed=0, depth=2, d_in=D_IN, d_out=D_OUT):
    torch.manual_seed(seed)
    return MLP(d_in, width, depth, d_out)


def layers_of(model):
    return [model.input_layer, *model.hidden_layers, model.output_layer]


def expected(param, role, fan_in, width, rule):
    """The issue's formulas, written out independently of the implementation."""
    a = math.sqrt(width) if param in ("mup", "mfp", "mup-lr") else 1.0
    q = (a * a / fan_in) if role != "readout" else 1.0 / fan_in
    mult, lr, std = {"mup-lr": (1.0, q, math.sqrt(q) / a), "ntp-lr": (1.0, q, math.sqrt(q) / a),
                     "mup": (math.sqrt(q), 1.0, 1.0 / a),
                     "mfp": (math.sqrt(q) / a, a * a, 1.0), "ntp": (math.sqrt(q) / a, a * a, 1.0)}[param]
    if rule == "adam":
        # Adam moves the effective weight mult*W by ~lr*lr_factor*mult per entry. muP family: every layer's
        # output moves by Theta(lr), so mult*lr_factor = 1/fan_in. ntp family (kernel regime): features move
        # by lr/sqrt(width) only, the output by Theta(lr).
        if param in ("mup", "mfp", "mup-lr") or role == "readout":
            lr = 1.0 / (fan_in * mult)
        else:
            lr = 1.0 / (fan_in * math.sqrt(width) * mult)
    return mult, lr, std


def expected_bias_lr(param, role, width, rule, mult, d_in=D_IN):
    """A bias is a weight on a constant input coordinate (Tensor Programs V), seen through its layer's
    multiplier. Adam: a read-in of fan-in 1 (read-out of fan-in 1 at the read-out), effective rate
    a / sqrt(width) (1 at the read-out), independent of the data's dimension. SGD: one more input coordinate
    of the read-in, effective rate a**2 / d_in (1 / d_in at the read-out)."""
    a = math.sqrt(width) if param in ("mup", "mfp", "mup-lr") else 1.0
    if rule == "sgd":
        return (a * a if role != "readout" else 1.0) / d_in / mult ** 2
    return (a / math.sqrt(width) if role != "readout" else 1.0) / mult


def group_lr(opt, p):
    groups = [g for g in opt.param_groups if any(q is p for q in g["params"])]
    assert len(groups) == 1
    return groups[0]["lr"]


# ------------------------------------------------------------------------------------------------------
# the rules, layer by layer
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam])
@pytest.mark.parametrize("param", PARAMS)
def test_multipliers_init_and_lrs_follow_the_formulas(param, opt_cls):
    rule = "sgd" if opt_cls is torch.optim.SGD else "adam"
    base_lr = 0.05
    for width in (128, 512):
        model = mlp(width)
        opt = mup.parameterize(model, param, opt_cls, base_lr)
        x = torch.randn(32, D_IN)
        h = x
        for layer, role in zip(layers_of(model), ("readin", "hidden", "readout")):
            fan_in = layer.weight.shape[1]
            mult, lr, std = expected(param, role, fan_in, width, rule)
            # multiplier, measured from the layer's output (bias included, as in mupify)
            raw = F.linear(h, layer.weight, layer.bias)
            np.testing.assert_allclose(layer(h).detach(), mult * raw.detach(), rtol=1e-5, atol=1e-7)
            h = torch.relu(raw)
            # init std, measured
            w_std = layer.weight.detach().std().item()
            assert w_std == pytest.approx(std, rel=0.15), (param, width, role, "weight")
            assert (layer.bias == 0).all()  # biases start at 0, at every width
            # learning rate of weight and bias
            assert group_lr(opt, layer.weight) == pytest.approx(base_lr * lr, rel=1e-9), (param, width, role)
            bias_lr = expected_bias_lr(param, role, width, rule, mult)
            assert group_lr(opt, layer.bias) == pytest.approx(base_lr * bias_lr, rel=1e-9), (param, width, role)
        # ReLU gains sqrt(2)
        z = torch.randn(100)
        np.testing.assert_allclose(model.nonlin(z), math.sqrt(2) * torch.relu(z), rtol=1e-6)


def test_adam_factors_concrete_numbers():
    # mup at width 256, d_in 16: read-in multiplier sqrt(256/16)=4, effective Adam rate 1/16 -> raw 1/64;
    # hidden multiplier 1, rate 1/256; read-out multiplier 1/16, effective 1/256 -> raw 1/16.
    model = mlp(256)
    opt = mup.parameterize(model, "mup", torch.optim.AdamW, 1.0)
    assert [group_lr(opt, l.weight) for l in layers_of(model)] == pytest.approx([1 / 64, 1 / 256, 1 / 16])
    # Adam biases: effective rate 1 (a read-in of fan-in 1), raw 1 / mult: 1/4, 1, 16
    assert [group_lr(opt, l.bias) for l in layers_of(model)] == pytest.approx([1 / 4, 1, 16])
    # SGD: mup has no lr factor on weights; a bias learns like a read-in weight: effective rate 256 / 16 = 16
    # (1 / 16 at the read-out), raw rate effective / mult**2 (read-in multiplier 4, read-out 1/16)
    model = mlp(256)
    opt = mup.parameterize(model, "mup", torch.optim.SGD, 1.0)
    assert [group_lr(opt, l.weight) for l in layers_of(model)] == pytest.approx([1, 1, 1])
    assert [group_lr(opt, l.bias) for l in layers_of(model)] == pytest.approx([1, 16, 16])


def test_relu_gain_off_and_optimizer_settings_kept():
    model = mlp(64)
    opt = mup.parameterize(model, "mup", torch.optim.SGD, 0.1, relu_gain=False, momentum=0.9, weight_decay=1e-4)
    z = torch.randn(50)
    np.testing.assert_allclose(model.nonlin(z), torch.relu(z))
    assert all(g["momentum"] == 0.9 for g in opt.param_groups)
    # weight decay follows each group's lr factor: the decay per step lr * wd is the same for all
    assert all(g["lr"] * g["weight_decay"] == pytest.approx(0.1 * 1e-4) for g in opt.param_groups)
    n_params = sum(len(g["params"]) for g in opt.param_groups)
    assert n_params == len(list(model.parameters()))
    opt = mup.parameterize(mlp(64), "mup", torch.optim.Adam, 0.1, betas=(0.8, 0.9))
    assert all(g["betas"] == (0.8, 0.9) for g in opt.param_groups)


def test_sp_leaves_the_model_alone():
    model = mlp(64)
    before = copy.deepcopy(model.state_dict())
    opt = mup.parameterize(model, "sp", torch.optim.SGD, 0.1, momentum=0.5)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["lr"] == 0.1
    assert opt.param_groups[0]["momentum"] == 0.5
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(not m._forward_hooks for m in model.modules())
    # any optimizer is fine under sp
    mup.parameterize(mlp(64), "sp", torch.optim.LBFGS, 0.1)


def test_conv_and_transformer_layers():
    torch.manual_seed(0)
    cnn = CNN(in_channels=3, width=32, depth=2, d_out=2)
    opt = mup.parameterize(cnn, "mup-lr", torch.optim.SGD, 1.0)
    # mup-lr: lr factor = q = width / fan_in with fan_in = in_channels * 3 * 3
    assert group_lr(opt, cnn.input_layer.weight) == pytest.approx(32 / 27)
    assert group_lr(opt, cnn.hidden_layers[0].weight) == pytest.approx(32 / (32 * 9))
    assert group_lr(opt, cnn.output_layer.weight) == pytest.approx(1 / 32)
    assert cnn(torch.randn(2, 3, 8, 8)).shape == (2, 2)

    torch.manual_seed(0)
    tf = Transformer(d_in=8, width=32, depth=1, d_out=1, n_heads=2)
    # the model's width attribute, not the MLP block's fan-out (mlp_mult * width), which would move the
    # absolute rules when mlp_mult changes
    assert mup.anatomy(tf).width == 32
    assert mup.anatomy(tf, width=48).width == 48
    assert mup.anatomy(CNN(in_channels=3, width=8)).width == 8
    attn = tf.blocks[0].attn
    attn.attn_mult = 0.5  # the user's multiplier: never overwritten
    mup.parameterize(tf, "mup", torch.optim.Adam, 1e-2)
    assert attn.attn_scale == pytest.approx(1 / 16) and attn.attn_mult == 0.5  # muP: 1/d_head
    mup.parameterize(tf, "ntp", torch.optim.Adam, 1e-2)
    assert attn.attn_scale == pytest.approx(1 / 4) and attn.attn_mult == 0.5  # 1/sqrt(d_head)
    assert torch.isfinite(tf(torch.randn(3, 5, 8))).all()


# ------------------------------------------------------------------------------------------------------
# one function class
# ------------------------------------------------------------------------------------------------------

def _trajectory(param, opt_cls, lr, width=256, steps=3, **opt_kwargs):
    model = mlp(width)
    opt = mup.parameterize(model, param, opt_cls, lr, **opt_kwargs)
    X, y = powerlaw_bfn(64, gen=torch.Generator().manual_seed(1), dim=D_IN)(0)
    outs = []
    for _ in range(steps + 1):
        out = model(X)
        outs.append(out.detach())
        loss = ((out[:, :1] - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.stack(outs)


def test_ntp_and_mup_differ_only_by_the_readout_scale():
    width = 256
    x = torch.randn(20, D_IN)
    outs = {}
    for param in PARAMS:
        model = mlp(width)
        mup.parameterize(model, param, torch.optim.SGD, 0.1)
        outs[param] = model(x).detach()
    assert outs["ntp"].abs().mean() > 0.1
    # same draws, same effective weights everywhere but the read-out, which muP makes 1/sqrt(width) smaller
    np.testing.assert_allclose(outs["mup"], outs["ntp"] / math.sqrt(width), rtol=1e-4, atol=1e-6)
    for a, b in (("mup", "mfp"), ("mup", "mup-lr"), ("ntp", "ntp-lr")):
        np.testing.assert_allclose(outs[a], outs[b], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("opt_cls,lr", [(torch.optim.SGD, 0.5), (torch.optim.Adam, 0.05)])
def test_each_family_trains_the_same_network(opt_cls, lr):
    # multiplier, init and lr factor trade off exactly, so the trajectories coincide, not just the init
    # Adam's eps is the one thing that tells them apart (their raw gradients differ in scale): make it tiny
    extra = {} if opt_cls is torch.optim.SGD else dict(eps=1e-12)
    for family in (("mup", "mfp", "mup-lr"), ("ntp", "ntp-lr")):
        runs = [_trajectory(p, opt_cls, lr, **extra) for p in family]
        assert (runs[0][-1] - runs[0][0]).abs().max() > 1e-2  # it did train
        for other in runs[1:]:
            np.testing.assert_allclose(other, runs[0], rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------------------------------------------
# GAMMA
# ------------------------------------------------------------------------------------------------------

def test_gamma_lr_rule():
    assert mup.gamma_lr(0.1, 1.0) == pytest.approx(0.1)
    assert mup.gamma_lr(0.1, 4.0) == pytest.approx(0.4)
    assert mup.gamma_lr(0.1, 0.5) == pytest.approx(0.025)


@pytest.mark.parametrize("param", ["mup", "ntp", "sp"])
def test_rescale_divides_outputs_and_lr_follows_the_rule(param):
    x = torch.randn(10, D_IN)
    for gamma in (0.5, 4.0):
        ref = mlp(64)
        mup.parameterize(ref, param, torch.optim.SGD, 0.1)
        model = mlp(64)
        opt = mup.parameterize(model, param, torch.optim.SGD, mup.gamma_lr(0.1, gamma))
        ref_opt = mup.parameterize(mlp(64), param, torch.optim.SGD, 0.1)
        mup.rescale(model, gamma)
        np.testing.assert_allclose(model(x).detach(), ref(x).detach() / gamma, rtol=1e-5, atol=1e-7)
        mup.rescale(model, gamma)  # again: replaces, does not compound
        np.testing.assert_allclose(model(x).detach(), ref(x).detach() / gamma, rtol=1e-5, atol=1e-7)
        factor = gamma if gamma >= 1 else gamma ** 2
        for g, rg in zip(opt.param_groups, ref_opt.param_groups):
            assert g["lr"] == pytest.approx(rg["lr"] * factor)
        mup.rescale(model, 1.0)
        np.testing.assert_allclose(model(x).detach(), ref(x).detach(), rtol=1e-5, atol=1e-7)


def test_rescale_model_it_cannot_classify_divides_the_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    before = model(x).detach()
    mup.rescale(model, 2.0)
    np.testing.assert_allclose(model(x).detach(), before / 2, rtol=1e-6)
    with pytest.raises(ValueError):
        mup.rescale(model, 0.0)


# ------------------------------------------------------------------------------------------------------
# copies
# ------------------------------------------------------------------------------------------------------

def test_deepcopy_and_pickle_keep_multipliers_and_own_weights():
    model = mlp(64)
    opt = mup.parameterize(model, "mup", torch.optim.SGD, 0.5)
    mup.rescale(model, 3.0)
    x = torch.randn(16, D_IN)
    y0 = model(x).detach()
    twin = copy.deepcopy(model)
    shipped = cloudpickle.loads(cloudpickle.dumps(model))
    plain = pickle.loads(pickle.dumps(model))
    for other in (twin, shipped, plain):
        assert torch.equal(other(x).detach(), y0)
    centered = Centered(model)
    assert centered(x).abs().max() == 0
    # train the original: the copies keep their own weights and outputs
    loss = (model(x) - 1).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert not torch.allclose(model(x), y0)
    for other in (twin, shipped, plain, centered.baseline):
        assert torch.equal(other(x).detach(), y0)
    assert centered(x).abs().max() > 0
    # the copy's multipliers are its own too
    twin.output_layer.weight.data.zero_()
    twin.output_layer.bias.data.zero_()
    assert twin(x).abs().max() == 0 and model(x).abs().max() > 0


# ------------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad,kind", [
    (nn.BatchNorm1d(8), "BatchNorm1d"),
    (nn.MultiheadAttention(8, 2, batch_first=True), "MultiheadAttention"),
])
def test_unsupported_layers_are_named(bad, kind):
    model = nn.Sequential(nn.Linear(4, 8), bad, nn.Linear(8, 1))
    with pytest.raises(ValueError, match=rf"'1' \({kind}\)"):
        mup.parameterize(model, "mup", torch.optim.SGD, 0.1)


def test_other_unusable_models():
    unnamed = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 1))
    with pytest.raises(ValueError, match="input_layer / output_layer"):  # roles neither named nor checked
        mup.parameterize(unnamed, "ntp", torch.optim.SGD, 0.1)
    with pytest.raises(ValueError, match="at least two weight layers"):
        mup.parameterize(nn.Sequential(nn.Linear(4, 1)), "mup", torch.optim.SGD, 0.1)
    tied = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 1))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="shares its weight"):
        mup.parameterize(tied, "mup", torch.optim.SGD, 0.1)
    with pytest.raises(ValueError, match="unknown parameterization"):
        mup.parameterize(mlp(8), "mu-p", torch.optim.SGD, 0.1)


def test_optimizers():
    with pytest.raises(ValueError, match="LBFGS"):
        mup.parameterize(mlp(8), "mup", torch.optim.LBFGS, 0.1)

    class MyAdam(torch.optim.Adam):
        pass

    class Custom(torch.optim.SGD.__base__):  # an Optimizer that is neither SGD- nor Adam-like
        def __init__(self, params, lr):
            super().__init__(params, dict(lr=lr))

    assert mup.update_rule_of(MyAdam) == "adam"
    assert mup.update_rule_of(torch.optim.RMSprop) == "adam"
    assert mup.update_rule_of(torch.optim.SGD) == "sgd"
    with pytest.raises(ValueError, match="Custom"):
        mup.parameterize(mlp(8), "mup", Custom, 0.1)
    opt = mup.parameterize(mlp(64), "mup", Custom, 1.0, update_rule="adam")
    assert sorted(g["lr"] for g in opt.param_groups)[0] == pytest.approx(1 / 64)


# ------------------------------------------------------------------------------------------------------
# physics: width-stable updates under muP, growing ones under sp
# ------------------------------------------------------------------------------------------------------

def spectral_norm(M, iters=30):
    M = M.double()
    v = torch.randn(M.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = 0.0
    for _ in range(iters):
        u = M @ v
        u /= u.norm()
        v = M.T @ u
        s = v.norm().item()
        v /= s
    return s


def _train_and_measure(param, width, opt_cls, lr, steps=4):
    """Hidden layer after ``steps`` steps: RMS of its output, RMS of the output's change from init (same
    batch), spectral norm of the change of its effective weight (multiplier included)."""
    model = mlp(width, d_out=1)
    opt = mup.parameterize(model, param, opt_cls, lr)
    init = copy.deepcopy(model)
    hidden = model.hidden_layers[0]
    bfn = powerlaw_bfn(64, gen=torch.Generator().manual_seed(0), dim=D_IN)
    for step in range(steps):
        X, y = bfn(step)
        loss = ((model(X) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    X, _ = bfn(steps)
    with torch.no_grad():
        acts = {}
        for name, net in (("now", model), ("init", init)):
            handle = net.hidden_layers[0].register_forward_hook(lambda m, i, o, name=name: acts.__setitem__(name, o))
            net(X)
            handle.remove()
        mult = hidden(torch.eye(width))[0, 0] / F.linear(torch.eye(width), hidden.weight, hidden.bias)[0, 0]
        dW = mult * (hidden.weight - init.hidden_layers[0].weight)
    rms = lambda t: t.pow(2).mean().sqrt().item()  # noqa: E731
    return np.array([rms(acts["now"]), rms(acts["now"] - acts["init"]), spectral_norm(dW)])


WIDTHS = (64, 256, 1024)


@pytest.mark.parametrize("opt_cls,lr_sp,lr_mup", [(torch.optim.SGD, 0.5, 0.5), (torch.optim.Adam, 0.01, 0.1)])
def test_mup_updates_are_width_stable_sp_updates_grow(opt_cls, lr_sp, lr_mup):
    # columns: activation RMS, activation change RMS, spectral norm of the weight update; rows: widths
    sp = np.stack([_train_and_measure("sp", w, opt_cls, lr_sp) for w in WIDTHS])
    mu = np.stack([_train_and_measure("mup", w, opt_cls, lr_mup) for w in WIDTHS])
    spread = mu.max(0) / mu.min(0)
    assert (spread < 1.5).all(), f"muP is not width-stable:\n{mu}"
    assert (mu[:, 1] > 0.02).all()  # and it does learn features
    growth = sp[-1] / sp[0]
    assert (growth > np.array([2.0, 3.0, 3.0])).all(), f"sp does not blow up with width:\n{sp}"
    assert (np.diff(sp, axis=0) > 0).all()


def test_coord_check_and_plot(tmp_path):
    bfn = powerlaw_bfn(64, gen=torch.Generator().manual_seed(0), dim=D_IN)
    kwargs = dict(model_fn=lambda w: MLP(D_IN, w, 2, 1), widths=(64, 256, 1024), batch_fn=bfn, steps=3, lr=0.5,
                  measure="delta")
    mu = mup.coord_check(param="mup", **kwargs)
    sp = mup.coord_check(param="sp", **kwargs)
    assert mu.dims == ("width", "step", "layer")
    assert list(mu["layer"].values) == ["input_layer", "hidden_layers.0", "output_layer"]
    assert list(mu["step"].values) == [0, 1, 2, 3] and list(mu["width"].values) == [64, 256, 1024]
    assert (mu.sel(step=0) == 0).all()
    last_mu, last_sp = mu.sel(step=3), sp.sel(step=3)
    assert float((last_mu.max("width") / last_mu.min("width")).max()) < 1.6
    assert (last_sp.sel(width=1024) / last_sp.sel(width=64)).sel(layer="hidden_layers.0") > 3

    rms = mup.coord_check(lambda w: MLP(D_IN, w, 2, 1), (32, 64), lambda s: (torch.ones(4, D_IN),
                          torch.zeros(4, 1)), steps=1, param="mup", lr=0.0)
    # lr 0: nothing moves; step values are the RMS of each layer's output on the batch
    torch.manual_seed(0)  # coord_check's default seed
    model = MLP(D_IN, 32, 2, 1)
    mup.parameterize(model, "mup", torch.optim.SGD, 0.0)
    want = model.input_layer(torch.ones(4, D_IN)).pow(2).mean().sqrt().item()
    assert rms.sel(width=32, layer="input_layer").values == pytest.approx([want, want], rel=1e-5)

    fig = mup.plot_coord_check(mu, path=tmp_path / "cc.png")
    assert (tmp_path / "cc.png").stat().st_size > 10_000
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 3  # steps 1..3 (a change from init is 0 at step 0)
    assert panels[0].get_xscale() == "log" and panels[0].get_yscale() == "log"
    assert panels[0].get_ylabel() and panels[0].get_xlabel() == "width"
    assert len(panels[0].get_lines()) == 3 and fig.legends


# ------------------------------------------------------------------------------------------------------
# physics: the best learning rate transfers across width under muP
# ------------------------------------------------------------------------------------------------------

def _loss_after(param, width, lr, X, y, steps=20):
    model = mlp(width, d_out=1)
    opt = mup.parameterize(model, param, torch.optim.Adam, lr)
    losses = []
    for _ in range(steps):
        loss = ((model(X) - y) ** 2).mean()
        if not torch.isfinite(loss):
            return math.inf
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(np.mean(losses[-5:]))  # smooths Adam's step-to-step wobble


def test_best_learning_rate_transfers_under_mup_not_sp():
    X, y = powerlaw_bfn(64, gen=torch.Generator().manual_seed(0), dim=D_IN, nonlinear=True)(0)
    grids = {"sp": range(-11, -3), "mup": range(-3, 3)}  # log2(lr), each around its own optimum
    best = {}
    for param, grid in grids.items():
        for width in (64, 512):
            losses = [_loss_after(param, width, 2.0 ** k, X, y) for k in grid]
            i = int(np.argmin(losses))
            assert 0 < i < len(grid) - 1, f"{param} width {width}: optimum at the edge of the grid {losses}"
            best[param, width] = grid[i]
    shift = {p: best[p, 64] - best[p, 512] for p in grids}  # in octaves
    assert abs(shift["mup"]) <= 1, best
    assert shift["sp"] >= 2, best  # sp's best lr falls roughly like 1/width under Adam (measured: 4 octaves)
