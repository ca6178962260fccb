"""Depth transfer (DEPTH_ALPHA, BASE_DEPTH): the residual-branch multipliers and the learning-rate and eps rules
inside blocks, the declaration of residual blocks and its errors, the depth coordinate check, and the physics in
test size: without the rules the residual stream's change grows with depth and the best learning rate falls; with
them the change is flat and the best learning rate stays within a grid step."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from modelscape import mup
from modelscape.backend.identity import job_identity
from modelscape.backend.job import run_config
from modelscape.config import ConfigError, canonicalize
from modelscape.data import markov_bfn
from modelscape.models import GPT, MLP

V, T = 16, 16

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def gpt(depth, width=32, seed=0):
    torch.manual_seed(seed)
    return GPT(vocab_size=V, seq_len=T, width=width, depth=depth, n_heads=2, mlp_mult=2)


def groups_by_name(opt, model):
    """``{parameter name: its optimizer group}``."""
    group = {id(p): g for g in opt.param_groups for p in g["params"]}
    return {name: group[id(p)] for name, p in model.named_parameters()}


def mult(model, path):
    return getattr(model.get_submodule(path), "_mup_mult", 1.0)


@pytest.mark.parametrize("optimizer,alpha,lr_exp", [(torch.optim.Adam, 1.0, 0.0), (torch.optim.Adam, 0.5, -0.5),
                                                    (torch.optim.SGD, 1.0, 1.0), (torch.optim.SGD, 0.5, 0.0)])
def test_branches_and_block_learning_rates_scale_by_the_rule(optimizer, alpha, lr_exp):
    depth, base = 8, 2
    plain, deep = gpt(depth), gpt(depth)
    kw = dict(eps_scaling=True) if optimizer is torch.optim.Adam else {}
    torch.manual_seed(1)  # the absolute rules draw the inits anew
    opt0 = groups_by_name(mup.parameterize(plain, "mup", optimizer, 0.01, **kw), plain)
    torch.manual_seed(1)
    opt1 = groups_by_name(mup.parameterize(deep, "mup", optimizer, 0.01, depth_alpha=alpha, base_depth=base, **kw),
                          deep)
    r = depth / base
    for i in range(depth):
        for branch in ("attn.proj", "fc2"):
            path = f"blocks.{i}.{branch}"
            assert mult(deep, path) == pytest.approx(mult(plain, path) * r ** -alpha)
        assert mult(deep, f"blocks.{i}.fc1") == mult(plain, f"blocks.{i}.fc1")  # not a branch's end
    for name, g in opt1.items():
        inside = name.startswith("blocks.")
        assert g["lr"] == pytest.approx(opt0[name]["lr"] * (r ** lr_exp if inside else 1.0)), name
        if "eps" in g:  # the gradient inside a block is seen through the branch multiplier
            assert g["eps"] == pytest.approx(opt0[name]["eps"] * (r ** -alpha if inside else 1.0)), name
    # inits are the width rules' (the multiplier, not the init, carries depth)
    for (name, p), q in zip(deep.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), name


def test_at_the_base_depth_the_rules_change_no_bit():
    losses = []
    for alpha in (0.0, 1.0):
        bfn = markov_bfn(4, torch.Generator().manual_seed(0), vocab_size=V, seq_len=T)
        model = gpt(4)
        torch.manual_seed(1)
        opt = mup.parameterize(model, "mup", torch.optim.Adam, 0.01, depth_alpha=alpha, base_depth=4)
        run = []
        for step in range(3):
            X, y = bfn(step)
            loss = nn.functional.cross_entropy(model(X).reshape(-1, V), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses.append(run)
    assert losses[0] == losses[1]


class ResBlock(nn.Module):
    residual_branches = ("out",)

    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.inner = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x):
        return x + self.out(torch.relu(self.inner(self.norm(x))))


class ResMLP(nn.Module):
    """A model of one's own whose blocks declare their residual branch."""

    def __init__(self, d_in=4, width=32, depth=3, d_out=1):
        super().__init__()
        self.width = width
        self.input_layer = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList([ResBlock(width) for _ in range(depth)])
        self.output_layer = nn.Linear(width, d_out)

    def forward(self, x):
        h = self.input_layer(x)
        for block in self.blocks:
            h = block(h)
        return self.output_layer(h)


def test_a_model_of_ones_own_declares_its_blocks_and_gets_the_rules():
    model = ResMLP(depth=3)
    assert [(p, b) for p, _, b in mup.residual_blocks(model)] == [(f"blocks.{i}", [f"blocks.{i}.out"])
                                                                   for i in range(3)]
    plain = ResMLP(depth=3)
    g0 = groups_by_name(mup.parameterize(plain, "sp", torch.optim.SGD, 0.1), plain)
    g1 = groups_by_name(mup.parameterize(model, "sp", torch.optim.SGD, 0.1, depth_alpha=1.0), model)
    assert model.blocks[2].out._mup_mult == pytest.approx(1 / 3)  # under sp too: depth is its own dimension
    assert g1["blocks.0.norm.weight"]["lr"] == pytest.approx(3 * g0["blocks.0.norm.weight"]["lr"])
    assert g1["input_layer.weight"]["lr"] == g0["input_layer.weight"]["lr"]


def test_bad_declarations_and_models_without_blocks_are_errors_that_name_them():
    class Typo(ResBlock):
        residual_branches = ("outt",)

    model = ResMLP(depth=2)
    model.blocks[1] = Typo(32)
    with pytest.raises(ValueError, match="Typo at 'blocks.1' declares residual branch 'outt'"):
        mup.residual_blocks(model)
    with pytest.raises(ValueError, match="MLP declares none.*residual_branches"):
        mup.parameterize(MLP(4, 16, 2, 1), "mup", torch.optim.SGD, 0.1, depth_alpha=1.0)
    with pytest.raises(ValueError, match="DEPTH_ALPHA.*>= 0"):
        mup.parameterize(gpt(2), "mup", torch.optim.Adam, 0.1, depth_alpha=-1.0)



def test_a_sweep_of_depth_alpha_on_a_model_without_blocks_is_refused_before_it_starts(tmp_path):
    from modelscape.backend.job_iterator import main as run_job_iterator
    from modelscape.data import powerlaw_bfn

    cfg = dict(MODEL="MLP", WIDTH=16, DEPTH=2, N_SAMPLES=8, N_TEST=8, MAX_ITER=2, ONLINE=True, LOSS_CHECKPOINTS=[1e-9])
    bfn = dict(base_bfn=powerlaw_bfn, dim=4)
    with pytest.raises(ConfigError, match="DEPTH_ALPHA=1.0 with MODEL='MLP'.*residual"):
        run_job_iterator([[0.0, 1.0]], ["DEPTH_ALPHA"], cfg, bfn, store=tmp_path / "s")
    assert not (tmp_path / "s").exists()  # nothing started, nothing stored
    # a model given as a class is known only once built: the job says so
    with pytest.raises(ConfigError, match="DEPTH_ALPHA=1.0 but model .*MLP declares no residual blocks"):
        run_config({**cfg, "MODEL": MLP, "DEPTH_ALPHA": 1.0}, bfn, quiet=True)


def test_depth_alpha_from_a_config_trains_the_gpt_with_the_rules():
    cfg = dict(MODEL="GPT", WIDTH=32, DEPTH=4, n_heads=2, OPTIMIZER="Adam", LR=0.01, LOSS="cross_entropy",
               PARAMETERIZATION="mup", ONLINE=True, N_SAMPLES=4, N_TEST=16, MAX_ITER=3, LOSS_CHECKPOINTS=[1e-9],
               vocab_size=V, seq_len=T, CENTER=False)
    recs = {a: run_config({**cfg, "DEPTH_ALPHA": a, "BASE_DEPTH": 2}, dict(base_bfn=markov_bfn), quiet=True)
            for a in (0.0, 1.0)}
    assert recs[0.0]["steps"] == recs[1.0]["steps"] == 3
    assert recs[0.0]["test_loss"] != recs[1.0]["test_loss"]
    at_base = run_config({**cfg, "DEPTH_ALPHA": 1.0, "BASE_DEPTH": 4}, dict(base_bfn=markov_bfn), quiet=True)
    assert (at_base["train_loss"], at_base["test_loss"]) == (recs[0.0]["train_loss"], recs[0.0]["test_loss"])


def test_stores_made_before_depth_alpha_keep_their_ids():
    cfg = canonicalize(dict(WIDTH=16, LR=0.1))
    before = {k: v for k, v in cfg.items() if k not in ("DEPTH_ALPHA", "BASE_DEPTH")}
    assert job_identity(cfg, {}, {"trial": 0}) == job_identity(before, {}, {"trial": 0})
    assert job_identity({**cfg, "DEPTH_ALPHA": 1.0}, {}, {"trial": 0}) != job_identity(cfg, {}, {"trial": 0})
    assert job_identity({**cfg, "BASE_DEPTH": 4}, {}, {"trial": 0}) != job_identity(cfg, {}, {"trial": 0})


def depth_check(alpha, depths=(2, 4, 8, 16)):
    bfn = markov_bfn(16, torch.Generator().manual_seed(0), vocab_size=V, seq_len=T)
    return mup.coord_check_depth(lambda d: GPT(vocab_size=V, seq_len=T, width=64, depth=d, n_heads=4), depths, bfn,
                                 steps=3, lr=0.01, depth_alpha=alpha, base_depth=2, loss_fn=nn.CrossEntropyLoss())


def test_the_depth_coordinate_check_pools_blocks_and_the_rules_keep_the_stream_flat():
    moved = {}
    for alpha in (0.0, 0.5, 1.0):
        da = depth_check(alpha)
        assert da.dims == ("depth", "step", "layer") and da.attrs["depth_alpha"] == alpha
        assert {"input_layer", "blocks.*.fc2", "blocks.*.attn.proj", "ln_f", "residual"} <= set(da.layer.values)
        assert (da.sel(step=0) == 0).all()  # a change from init
        moved[alpha] = da.sel(layer="residual", step=3).values
    # measured, the stream's change after 3 Adam steps at depths 2, 4, 8, 16: 0.47 1.00 2.07 4.49 without the
    # rules; 0.46 0.40 0.40 0.46 with alpha 1/2; 0.52 0.38 0.34 0.32 with alpha 1, whose one drop (depth 2 to 4)
    # is the shallow end: at depth 2 its branches keep multiplier 1 and dominate the stream, from 4 on it is flat
    assert moved[0.0][-1] / moved[0.0][0] > 4
    assert moved[0.5].max() / moved[0.5].min() < 1.5, moved[0.5]
    assert moved[1.0].max() / moved[1.0].min() < 2 and moved[1.0][1:].max() / moved[1.0][1:].min() < 1.5, moved[1.0]


def test_the_depth_coordinate_check_needs_residual_blocks():
    with pytest.raises(ValueError, match="residual blocks.*MLP declares none"):
        mup.coord_check_depth(lambda d: MLP(4, 16, d, 1), [2, 3], lambda s: (torch.randn(8, 4), torch.randn(8, 1)))


def test_the_best_learning_rate_stays_within_a_grid_step_from_depth_2_to_16(tmp_path):
    """Test size of the figure in docs/depth_transfer_gpt.png: GPT width 32, Adam, 150 steps, the whole pipeline."""
    from modelscape.backend.job_iterator import main as run_job_iterator
    from modelscape.transfer import drift

    cfg = dict(MODEL="GPT", OPTIMIZER="Adam", LOSS="cross_entropy", WIDTH=32, n_heads=4, mlp_mult=2,
               PARAMETERIZATION="mup", ONLINE=True, N_SAMPLES=16, N_TEST=256, MAX_ITER=150, LOSS_CHECKPOINTS=[1e-6],
               CENTER=False, BASE_DEPTH=2, vocab_size=16, seq_len=16, order=2, branching=3, VERBOSE=False)
    lrs = [2.0 ** k for k in range(-5, 0)]
    res = run_job_iterator([[0.0, 1.0], [2, 16], lrs, [0]], ["DEPTH_ALPHA", "DEPTH", "LR", "trial"], cfg,
                           {"base_bfn": markov_bfn}, store=tmp_path)
    fit = res.best("LR", metric="test_loss")
    assert not fit["at_edge"].any()
    best = {a: fit["best"].sel(DEPTH_ALPHA=a).values for a in (0.0, 1.0)}
    moves = {a: drift([2, 16], best[a]) for a in best}
    # measured: the optimum falls 0.34 octaves per doubling of depth without the rules, 0.14 with them
    assert abs(math.log2(best[1.0][1] / best[1.0][0])) < 1, best
    assert moves[0.0] < moves[1.0] - 0.1, moves
    # and the deep model trains better with them than without (1.91 against 2.18 here)
    loss = fit["fitted"]
    assert float(loss.sel(DEPTH_ALPHA=1.0, DEPTH=16)) < float(loss.sel(DEPTH_ALPHA=0.0, DEPTH=16))
    assert np.isfinite(loss.values).all()
