"""muTransfer: base widths (sp to the bit at the base, Microsoft's rules from there), base shapes, bottlenecks,
custom parameters, tied embeddings, tunable multipliers, Adam's eps, Lion and update rules, the job's muP keys."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelscape import mup
from modelscape.backend.fused import train_fused, why_not_fusable
from modelscape.backend.job import prepare_job, run_config
from modelscape.config import ConfigError
from modelscape.data import markov_bfn, powerlaw_bfn
from modelscape.models import GPT, MLP

V, T = 16, 8
CE = nn.CrossEntropyLoss()
PARAMS = ("mup", "mfp", "mup-lr", "ntp", "ntp-lr")

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def gpt(width, depth=2, **kw):
    return GPT(vocab_size=V, seq_len=T, width=width, depth=depth, n_heads=2, mlp_mult=2, **kw)


def tokens(bsz=4, seed=0, step=0):
    return markov_bfn(bsz, torch.Generator().manual_seed(seed), vocab_size=V, seq_len=T)(step)


def meta(fn, *args, **kw):
    with torch.device("meta"):
        return fn(*args, **kw)


def group_of(opt, p):
    groups = [g for g in opt.param_groups if any(q is p for q in g["params"])]
    assert len(groups) == 1
    return groups[0]


def mult_of(model, name):
    return getattr(model.get_submodule(name.rsplit(".", 1)[0]), "_mup_mult", 1.0)


def rms(t):
    return t.detach().double().pow(2).mean().sqrt().item()


def one_step(model, opt, X, y, loss):
    out = model(X)
    opt.zero_grad()
    loss(out, y).backward()
    opt.step()
    return out.detach()


def mse(out, y):
    return (out - y).pow(2).mean()


def ce(out, y):
    return CE(out.movedim(-1, 1), y)


# ------------------------------------------------------------------------------------------------------
# at the base width, every parameterization is sp to the bit
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam])
def test_at_the_base_width_every_parameterization_is_sp_to_the_bit(opt_cls):
    X_mlp, y_mlp = torch.randn(16, 8, generator=torch.Generator().manual_seed(0)), torch.randn(16, 3)
    X_gpt, y_gpt = tokens()
    cases = [(lambda w: MLP(8, w, 2, 3), X_mlp, y_mlp, mse), (gpt, X_gpt, y_gpt, ce),
             (lambda w: gpt(w, tie_weights=True), X_gpt, y_gpt, ce)]
    for build, X, y, loss in cases:
        torch.manual_seed(0)
        ref = build(64)
        ref_opt = mup.parameterize(ref, "sp", opt_cls, 0.1, weight_decay=0.01)
        ref_out = [one_step(ref, ref_opt, X, y, loss) for _ in range(2)]
        for param in PARAMS:
            torch.manual_seed(0)
            model = build(64)
            opt = mup.parameterize(model, param, opt_cls, 0.1, base=meta(build, 64), probe=meta(build, 128),
                                   example_input=X, weight_decay=0.01)
            assert model._mup_readout == "output_layer"  # the rules did run (each factor 1 here)
            outs = [one_step(model, opt, X, y, loss) for _ in range(2)]
            for a, b in zip(outs, ref_out):
                assert torch.equal(a, b), (param, "output")
            for (n, p), q in zip(model.named_parameters(), ref.parameters()):
                assert torch.equal(p, q), (param, n)


def test_at_the_base_width_a_job_equals_sp_and_above_it_does_not():
    bfn = dict(base_bfn=markov_bfn, vocab_size=V, seq_len=T)
    cfg = dict(MODEL="GPT", WIDTH=32, DEPTH=1, n_heads=2, OPTIMIZER="Adam", LR=0.01, LOSS="cross_entropy",
               N_SAMPLES=8, N_TEST=16, MAX_ITER=5, LOSS_CHECKPOINTS=[1e-9], CENTER=False, ONLYTHRESHOLDS=False,
               EVAL_EVERY=1)
    sp = run_config({**cfg, "PARAMETERIZATION": "sp"}, bfn, quiet=True)
    at_base = run_config({**cfg, "PARAMETERIZATION": "mup", "BASE_WIDTH": 32}, bfn, quiet=True)
    np.testing.assert_array_equal(at_base["train_curve"], sp["train_curve"])
    np.testing.assert_array_equal(at_base["test_curve"], sp["test_curve"])
    wider_sp = run_config({**cfg, "PARAMETERIZATION": "sp", "WIDTH": 64}, bfn, quiet=True)
    wider = run_config({**cfg, "PARAMETERIZATION": "mup", "BASE_WIDTH": 32, "WIDTH": 64}, bfn, quiet=True)
    assert not np.allclose(wider["train_curve"][1:], wider_sp["train_curve"][1:])


@pytest.mark.parametrize("opt_cls,lr", [(torch.optim.SGD, 0.5), (torch.optim.Adam, 0.05)])
def test_with_a_base_width_each_family_trains_the_same_network(opt_cls, lr):
    X, y = tokens(8)
    extra = {} if opt_cls is torch.optim.SGD else dict(eps=1e-12)  # raw gradients differ in scale
    for family in (("mup", "mfp", "mup-lr"), ("ntp", "ntp-lr")):
        runs = []
        for param in family:
            torch.manual_seed(0)
            model = gpt(128)
            opt = mup.parameterize(model, param, opt_cls, lr, base=meta(gpt, 32), example_input=X, **extra)
            runs.append(torch.stack([one_step(model, opt, X, y, ce) for _ in range(4)]))
        assert (runs[0][-1] - runs[0][0]).abs().max() > 1e-2
        for other in runs[1:]:
            torch.testing.assert_close(other, runs[0], rtol=1e-3, atol=1e-4)


def test_base_shapes_by_naming_what_grows_equal_those_of_a_base_model():
    model = gpt(96)
    named = {"input_layer.weight": (1,), "pos_emb.weight": (1,), "output_layer.weight": (1,),
             "output_layer.bias": (), "*.fc1.weight": (0, 1), "*.weight": (0, -1), "*.bias": (0,)}
    by_name = mup.base_shapes(model, grows=named, base_width=32)
    by_model = mup.base_shapes(model, base=gpt(32))
    assert by_name.base == by_model.base and by_name.grows == by_model.grows
    with pytest.raises(ValueError, match="'input_layer.weight' \\(shape \\(16, 96\\)\\) matches no pattern"):
        mup.base_shapes(model, grows={"*.bias": (0,)}, base_width=32)
    with pytest.raises(ValueError, match="'input_layer.weight': dimension of size 8 .* not a whole number"):
        mup.base_shapes(MLP(8, 96, 2, 1), grows={"*": (0, 1)}, base_width=40)  # d_in does not grow
    with pytest.raises(ValueError, match="same model built at another width"):
        mup.base_shapes(model, base=MLP(8, 32, 2, 1))


# ------------------------------------------------------------------------------------------------------
# rules fixed: vector-like updates, bottlenecks, custom parameters, tied embeddings
# ------------------------------------------------------------------------------------------------------

class EmbedNet(nn.Module):
    """Embedding(32, n) -> LayerNorm -> Linear -> ReLU -> Linear(n, 10): the issue's vector-like check."""

    def __init__(self, width):
        super().__init__()
        self.width = width
        self.input_layer = nn.Embedding(32, width)
        self.ln = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)
        self.act = nn.ReLU()
        self.output_layer = nn.Linear(width, 10)

    def forward(self, x):
        return self.output_layer(self.act(self.fc(self.ln(self.input_layer(x)))))


@pytest.mark.parametrize("param,base", [("mup", None), ("mup", 128), ("mup-lr", 128), ("mfp", None)])
def test_vector_like_adam_updates_are_width_independent_output_bias_included(param, base):
    g = torch.Generator().manual_seed(0)
    X, y = torch.randint(0, 32, (64,), generator=g), torch.randint(0, 10, (64,), generator=g)
    watched = ["input_layer.weight", "ln.weight", "ln.bias", "fc.bias", "output_layer.bias"]
    changes, raw = [], []
    for width in (128, 1024):
        torch.manual_seed(0)
        model = EmbedNet(width)
        kw = {} if base is None else dict(base=meta(EmbedNet, base), probe=meta(EmbedNet, 2 * width))
        opt = mup.parameterize(model, param, torch.optim.Adam, 0.01, example_input=X, **kw)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for _ in range(3):
            one_step(model, opt, X, y, F.cross_entropy)
        params = dict(model.named_parameters())
        raw.append([rms(params[n] - before[n]) for n in watched])
        changes.append([mult_of(model, n) * r for n, r in zip(watched, raw[-1])])  # as the network sees it
    changes, raw = np.array(changes), np.array(raw)
    spread = changes.max(0) / changes.min(0)
    assert (changes > 1e-3).all() and (spread < 1.5).all(), dict(zip(watched, spread.round(2)))
    if param == "mup-lr":  # no multipliers: the raw updates are the effective ones
        assert (raw.max(0) / raw.min(0) < 1.5).all()


def test_adam_bias_rate_does_not_depend_on_the_input_dimension():
    for d_in in (4, 784):
        model = MLP(d_in, 256, 2, 1)
        opt = mup.parameterize(model, "mup", torch.optim.Adam, 1.0)
        w, b = model.hidden_layers[0].weight, model.hidden_layers[0].bias
        # a hidden weight's step moves its layer's output by lr * fan_in * rate = lr; so does its bias's
        assert group_of(opt, b)["lr"] * mult_of(model, "hidden_layers.0.bias") == pytest.approx(1.0)
        assert group_of(opt, w)["lr"] * 256 == pytest.approx(1.0)


class Bottleneck(nn.Module):
    """d_in -> width -> 8 -> width -> 1: a width -> fixed layer in the middle."""

    def __init__(self, width, d_in=16):
        super().__init__()
        self.width = width
        self.input_layer = nn.Linear(d_in, width)
        self.squeeze = nn.Linear(width, 8)
        self.expand = nn.Linear(8, width)
        self.output_layer = nn.Linear(width, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.output_layer(self.act(self.expand(self.squeeze(self.act(self.input_layer(x))))))


@pytest.mark.parametrize("opt_cls,lr", [(torch.optim.Adam, 0.05), (torch.optim.SGD, 0.5)])
def test_a_bottleneck_is_named_without_base_shapes_and_read_out_like_with_them(opt_cls, lr):
    with pytest.raises(ValueError, match="'squeeze' \\(Linear\\) maps 64 inputs to 8 outputs.*BASE_WIDTH"):
        mup.parameterize(Bottleneck(64), "mup", opt_cls, lr)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(256, 16, generator=g), torch.randn(256, 1, generator=g)
    steps = 3 if opt_cls is torch.optim.Adam else 30
    moved = []
    for width in (128, 512, 2048):
        torch.manual_seed(0)
        model = Bottleneck(width)
        opt = mup.parameterize(model, "mup", opt_cls, lr, probe=meta(Bottleneck, 2 * width))
        anat = mup.anatomy(model, shapes=mup.base_shapes(model, probe=meta(Bottleneck, 64)))
        assert [layer.role for layer in anat.layers] == ["readin", "readout", "readin", "readout"]
        assert anat.readout.path == "output_layer" and "bottleneck squeeze" in str(anat)
        z = {}
        model.squeeze.register_forward_hook(lambda m, i, o: z.__setitem__("now", o.detach()))
        model(X)
        z0 = z["now"]
        for _ in range(steps):
            one_step(model, opt, X, y, mse)
        model(X)
        moved.append(rms(z["now"] - z0))
    moved = np.array(moved)
    if opt_cls is torch.optim.Adam:
        assert moved.max() / moved.min() < 1.5, moved  # flat
    else:
        # SGD: never growing (as a hidden layer it diverged past width 1024), and flat from 512 on. Early on it
        # moves less in wider models: the gradient into a fixed-size representation comes through a muP
        # network's input gradient, which starts at ~1/sqrt(width) and becomes Theta(1) as training correlates
        # the layers behind it
        assert moved[0] >= moved.max() and moved[1] / moved[2] < 1.5 and moved.min() > 1e-3, moved


class Scaled(nn.Module):
    """An MLP with parameters of its own: a per-feature gain (vector), a temperature (scalar), a matrix."""

    def __init__(self, width):
        super().__init__()
        self.width = width
        self.input_layer = nn.Linear(4, width)
        self.gain = nn.Parameter(torch.ones(width))
        self.temp = nn.Parameter(torch.ones(()))
        self.mix = nn.Parameter(torch.randn(width, width) / math.sqrt(width))
        self.output_layer = nn.Linear(width, 1)

    def forward(self, x):
        h = torch.relu(self.input_layer(x)) * self.gain
        return self.output_layer(torch.relu(h @ self.mix.T)) * self.temp


def test_custom_parameters_are_classified_by_what_grows_or_refused():
    with pytest.raises(ValueError, match="'gain' of shape \\(32,\\).*which dimensions grow"):
        mup.parameterize(Scaled(32), "mup", torch.optim.Adam, 1.0)
    with pytest.raises(ValueError, match="'mix'.*custom matrix.*BASE_WIDTH"):
        mup.parameterize(Scaled(32), "mup", torch.optim.Adam, 1.0, probe=meta(Scaled, 64))
    model = Scaled(128)
    opt = mup.parameterize(model, "mup", torch.optim.Adam, 1.0, base=meta(Scaled, 32))
    lr = {n: group_of(opt, p)["lr"] for n, p in model.named_parameters()}
    assert lr["temp"] == 1.0 and lr["gain"] == 1.0  # fixed, and vector-like under Adam
    assert lr["mix"] == pytest.approx(1 / 4)  # a matrix: Adam lr / (fan-in growth), as a hidden weight
    anat = mup.anatomy(model, shapes=mup.base_shapes(model, base=meta(Scaled, 32)))
    kinds = {p.name: p.kind for p in anat.params}
    assert kinds["gain"] == "readin" and kinds["temp"] == "fixed" and kinds["mix"] == "hidden"


def test_tied_embeddings():
    X, y = tokens(8)
    model = gpt(256, tie_weights=True)
    assert model.output_layer.weight is model.input_layer.weight
    opt = mup.parameterize(model, "mup", torch.optim.Adam, 0.05, example_input=X)
    # the read-out uses the embedding's weight through 1/width: an effective init and Adam rate 1/width
    assert mult_of(model, "output_layer.weight") == pytest.approx(1 / 256)
    assert group_of(opt, model.input_layer.weight)["lr"] == pytest.approx(0.05)
    changes = []
    for width in (64, 512):
        torch.manual_seed(0)
        model = gpt(width, depth=1, tie_weights=True)
        opt = mup.parameterize(model, "mup", torch.optim.Adam, 0.05, example_input=X)
        out0 = one_step(model, opt, X, y, ce)
        for _ in range(2):
            one_step(model, opt, X, y, ce)
        changes.append(rms(model(X) - out0))
    assert 0.67 < changes[0] / changes[1] < 1.5, changes
    other = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 1))
    other[1].weight = other[0].weight
    with pytest.raises(ValueError, match="shares its weight.*an nn.Embedding with the read-out"):
        mup.parameterize(other, "mup", torch.optim.SGD, 0.1)
    with pytest.raises(ValueError, match="shares its weight with the embedding"):
        mup.parameterize(gpt(32, tie_weights=True), "mup", torch.optim.SGD, 0.1, readout_zero_init=True)


# ------------------------------------------------------------------------------------------------------
# tunable multipliers
# ------------------------------------------------------------------------------------------------------

def test_multipliers_and_zero_inits():
    X, _ = tokens()
    torch.manual_seed(0)
    ref = gpt(64)
    ref_opt = mup.parameterize(ref, "mup", torch.optim.Adam, 0.1, base=meta(gpt, 32), example_input=X)
    torch.manual_seed(0)
    model = gpt(64)
    opt = mup.parameterize(model, "mup", torch.optim.Adam, 0.1, base=meta(gpt, 32), example_input=X,
                           output_mult=3.0, emb_mult=2.0,
                           lr_mults={"embedding": 2.0, "hidden": 0.5, "readout": 4.0, "vector": 0.0})
    assert mult_of(model, "output_layer.weight") == pytest.approx(3 * mult_of(ref, "output_layer.weight"))
    assert mult_of(model, "input_layer.weight") == 2.0 and mult_of(model, "pos_emb.weight") == 2.0
    emb = model.input_layer(X)
    torch.testing.assert_close(emb, 2 * F.embedding(X, model.input_layer.weight))
    names = dict(model.named_parameters())
    expected = {"input_layer.weight": 2.0, "pos_emb.weight": 2.0, "blocks.0.attn.q.weight": 0.5,
                "blocks.1.fc2.weight": 0.5, "output_layer.weight": 4.0, "blocks.0.ln1.weight": 0.0,
                "blocks.0.fc1.bias": 0.0, "output_layer.bias": 0.0}
    ref_params = dict(ref.named_parameters())
    for name, factor in expected.items():
        want = group_of(ref_opt, ref_params[name])["lr"] * factor
        assert group_of(opt, names[name])["lr"] == pytest.approx(want), name
    # zero inits, and the attention multiplier is the user's (never overwritten), times the rule's scale
    torch.manual_seed(0)
    model = gpt(64, attn_mult=0.5)
    mup.parameterize(model, "mup", torch.optim.Adam, 0.1, readout_zero_init=True, query_zero_init=True,
                     example_input=X)
    assert (model.output_layer.weight == 0).all() and (model.output_layer.bias == 0).all()
    assert all((b.attn.q.weight == 0).all() and (b.attn.q.bias == 0).all() for b in model.blocks)
    attn = model.blocks[0].attn
    assert attn.attn_mult == 0.5 and attn.attn_scale == pytest.approx(1 / attn.d_head)
    with pytest.raises(ValueError, match="no attention module"):
        mup.parameterize(MLP(4, 16, 2, 1), "mup", torch.optim.SGD, 0.1, query_zero_init=True)
    with pytest.raises(ValueError, match="lr_mults names groups \\['heads'\\]"):
        mup.parameterize(MLP(4, 16, 2, 1), "mup", torch.optim.SGD, 0.1, lr_mults={"heads": 2.0})


def test_multipliers_from_the_config_and_fused_members_equal_single_jobs():
    bfn = dict(base_bfn=powerlaw_bfn, dim=8)
    common = dict(PARAMETERIZATION="mup", WIDTH=32, DEPTH=2, MAX_ITER=20, N_SAMPLES=32, N_TEST=64, OPTIMIZER="Adam",
                  LR=0.02, LOSS_CHECKPOINTS=[1e-9], ONLYTHRESHOLDS=False, EVAL_EVERY=5)
    members = [dict(BASE_WIDTH=16), dict(OUTPUT_MULT=2.0, EMB_MULT=0.5), dict(HIDDEN_LR_MULT=2.0, VECTOR_LR_MULT=0.5),
               dict(READOUT_ZERO_INIT=True, READOUT_LR_MULT=3.0), dict(EPS_SCALING=True, GAMMA=10.0), {}]
    jobs = [({**common, **m}, {"trial": 0, "i": i}) for i, m in enumerate(members)]
    ref = [run_config(c, bfn, axes=a, quiet=True) for c, a in jobs]
    assert len({round(float(r["train_loss"]), 6) for r in ref}) == len(members)  # every key changes numbers
    prepared = [prepare_job(c, bfn, axes=a, quiet=True) for c, a in jobs]
    assert all(why_not_fusable(j) is None for j in prepared)
    for r, f in zip(ref, train_fused(prepared)):
        np.testing.assert_allclose(f["train_curve"], r["train_curve"], rtol=1e-5)
    eps = {g["eps"] for g in prepared[4].opt.param_groups}
    assert len(eps) > 1 and max(eps) <= 1e-8 / 10  # per group, and divided by GAMMA
    with pytest.raises(ConfigError, match="ATTN_MULT=2.0 but model .*MLP takes no attn_mult"):
        run_config({**common, "ATTN_MULT": 2.0}, bfn, quiet=True)
    with pytest.raises(ConfigError, match="bad value for OUTPUT_MULT"):
        run_config({**common, "OUTPUT_MULT": 0}, bfn, quiet=True)


def test_attn_mult_reaches_the_gpt_from_the_config():
    bfn = dict(base_bfn=markov_bfn, vocab_size=V, seq_len=T)
    cfg = dict(MODEL="GPT", WIDTH=32, DEPTH=1, n_heads=2, OPTIMIZER="Adam", LR=0.01, LOSS="cross_entropy",
               N_SAMPLES=8, N_TEST=16, MAX_ITER=2, LOSS_CHECKPOINTS=[1e-9], ATTN_MULT=0.25, BASE_WIDTH=16)
    job = prepare_job(cfg, bfn, quiet=True)
    attn = job.model.blocks[0].attn
    assert attn.attn_mult == 0.25 and attn.attn_scale == pytest.approx(8 ** -0.5 * 8 / 16)


def test_multipliers_sweep_from_the_command_line_and_bad_values_name_their_key():
    from modelscape.backend.cli import parse_args
    args = parse_args(["--OUTPUT_MULT", "0.5", "2", "--HIDDEN_LR_MULT", "3", "--BASE_WIDTH", "64"])
    assert args.OUTPUT_MULT == [0.5, 2.0] and args.HIDDEN_LR_MULT == [3.0] and args.BASE_WIDTH == 64
    bfn = dict(base_bfn=markov_bfn, vocab_size=V, seq_len=T)
    cfg = dict(MODEL="GPT", WIDTH=32, DEPTH=1, n_heads=4, OPTIMIZER="Adam", LR=0.01, LOSS="cross_entropy",
               N_SAMPLES=8, N_TEST=16, MAX_ITER=2, LOSS_CHECKPOINTS=[1e-9])
    with pytest.raises(ConfigError, match="OUTPUT_MULT is a list .* make it a sweep axis"):
        run_config({**cfg, "OUTPUT_MULT": [0.5, 2.0]}, bfn, quiet=True)
    with pytest.raises(ConfigError, match="BASE_WIDTH=30: building .*GPT at the base width failed .*divisible"):
        prepare_job({**cfg, "BASE_WIDTH": 30}, bfn, quiet=True)


# ------------------------------------------------------------------------------------------------------
# Adam's eps, Lion, update rules
# ------------------------------------------------------------------------------------------------------

def _feature_change(gamma, eps_scaling, width=1024):
    X, y = tokens(16)
    torch.manual_seed(0)
    model = gpt(width, depth=1)
    opt = mup.parameterize(model, "mup", torch.optim.Adam, mup.gamma_lr(0.05, gamma, "adam"), example_input=X,
                           eps_scaling=eps_scaling, gamma=gamma)
    mup.rescale(model, gamma)
    h = {}
    model.blocks[0].fc1.register_forward_hook(lambda m, i, o: h.__setitem__("now", o.detach()))
    one_step(model, opt, X, y, ce)
    h0 = h["now"]
    model(X)
    return rms(h["now"] - h0)


def test_eps_scaling_keeps_gamma_exact_in_a_wide_model():
    plain = _feature_change(1000.0, False) / _feature_change(1.0, False)
    scaled = _feature_change(1000.0, True) / _feature_change(1.0, True)
    assert plain < 0.9  # eps 1e-8 is no longer negligible next to gradients 1000x smaller
    assert scaled == pytest.approx(1.0, abs=0.01)
    with pytest.raises(ValueError, match="takes no numeric eps"):
        mup.parameterize(MLP(4, 16, 2, 1), "mup", torch.optim.SGD, 0.1, eps_scaling=True)


def test_lion_and_update_rules():
    assert mup.update_rule_of(mup.Lion) == "adam"

    class Lion(torch.optim.Optimizer):  # someone else's Lion, known by its name
        pass

    class Declared(torch.optim.Optimizer):
        mup_update_rule = "sgd"

    assert mup.update_rule_of(Lion) == "adam" and mup.update_rule_of(Declared) == "sgd"
    with pytest.raises(ValueError, match="no muP learning-rate rule for optimizer .*Rprop.*update_rule='sgd'"):
        mup.parameterize(MLP(4, 16, 2, 1), "mup", torch.optim.Rprop, 0.1)
    model = MLP(4, 16, 2, 1)
    opt = torch.optim.Rprop(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="Rprop"):
        mup.mupify(model, opt, "mup")
    mup.mupify(model, opt, "mup", update_rule="sgd")  # mupify's own behaviour, declared
    assert len(opt.param_groups) > 1
    # Lion's step: sign of the interpolated momentum, decoupled decay
    p = nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    lion = mup.Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    p.grad = torch.tensor([0.5, 0.0, -4.0])
    lion.step()
    torch.testing.assert_close(p.detach(), torch.tensor([1.0, -2.0, 3.0]) * 0.95 - 0.1 * torch.tensor([1.0, 0, -1.0]))
    p.grad = torch.tensor([-1.0, 1.0, 1.0])
    m = 0.01 * torch.tensor([0.5, 0.0, -4.0])
    before = p.detach().clone()
    lion.step()
    torch.testing.assert_close(p.detach(), before * 0.95 - 0.1 * torch.sign(0.9 * m + 0.1 * p.grad))
    bfn = dict(base_bfn=powerlaw_bfn, dim=8)
    rec = run_config(dict(OPTIMIZER="Lion", LR=1e-3, WIDTH=32, MAX_ITER=5, N_SAMPLES=16, N_TEST=16,
                          LOSS_CHECKPOINTS=[1e-9]), bfn, quiet=True)
    assert rec["status"] == "not_reached" and np.isfinite(rec["train_loss"])


def test_coord_check_with_a_base_width():
    bfn = lambda s: tokens(4, step=s)  # noqa: E731
    kw = dict(model_fn=lambda w: gpt(w, depth=1), batch_fn=bfn, steps=2, optimizer=torch.optim.Adam, lr=0.01,
              loss_fn=CE, measure="delta")
    sp = mup.coord_check(widths=(32,), param="sp", **kw)
    at_base = mup.coord_check(widths=(32, 256), param="mup", base_width=32, **kw)
    np.testing.assert_array_equal(at_base.sel(width=32).values, sp.sel(width=32).values)
    spread = at_base.sel(step=2).max("width") / at_base.sel(step=2).min("width")
    assert float(spread.max()) < 1.6, spread.to_series()


def test_gpt_width_is_its_width_not_the_mlp_blocks():
    # absolute rules: the attention's and the MLP block's rates do not move when only mlp_mult changes
    rates = []
    for mlp_mult in (2, 4):
        model = GPT(vocab_size=V, seq_len=T, width=64, depth=1, n_heads=2, mlp_mult=mlp_mult)
        opt = mup.parameterize(model, "mup", torch.optim.SGD, 1.0, example_input=tokens()[0])
        assert mup.anatomy(model).width == 64
        block = model.blocks[0]
        rates.append([group_of(opt, p)["lr"] * mult_of(model, n) ** 2 for n, p in
                      (("blocks.0.attn.q.weight", block.attn.q.weight), ("blocks.0.ln1.weight", block.ln1.weight),
                       ("blocks.0.fc1.weight", block.fc1.weight))])
    assert rates[0] == pytest.approx(rates[1])
    assert rates[0][0] == pytest.approx(1.0)  # a hidden n x n weight: q = a**2 / fan_in = 64 / 64


def test_mupify_keeps_mupifys_width():
    from modelscape.model import SimpleTransformer
    torch.manual_seed(0)
    model = SimpleTransformer(d_in=8, width=16, depth=1)  # its MLP block is 4 * 16 wide
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    mup.mupify(model, opt, "mup-lr")
    lr = {n: group_of(opt, p)["lr"] for n, p in model.named_parameters()}
    assert lr["hidden_layers.0.attn.q.weight"] == pytest.approx(64 / 16)  # q = width / fan_in, width 64


def test_a_rule_composes_another_factor_per_parameter():
    # what a second dimension that grows (depth) uses: factors multiply into the width rule's numbers
    p = nn.Parameter(torch.ones(3))
    rule = mup.Rule("w", p, "hidden", None, lr=0.5, grad=0.25)
    assert rule.times(lr=0.5, grad=2.0).lr == 0.25 and rule.grad == 0.5 and rule.init is None
    assert rule.times(init=3.0).init == ("scale", 3.0)
    assert rule.times(init=2.0).init == ("scale", 6.0)
    assert mup.Rule("w", p, "hidden", ("normal", 0.1), 1.0).times(init=0.5).init == ("normal", 0.05)
    assert mup.Rule("w", p, "hidden", ("zero",), 1.0).times(init=0.5).init == ("zero",)


class NumpyMasked(nn.Module):
    """Draws a fixed mask from numpy's and Python's global RNGs in its constructor."""

    def __init__(self, width):
        import random
        super().__init__()
        self.width = width
        self.mask = torch.tensor(np.random.rand(width) > 0.5)
        self.tag = random.random()  # a constructor that draws from Python's RNG too
        self.input_layer, self.output_layer = nn.Linear(4, width), nn.Linear(width, 1)

    def forward(self, x):
        return self.output_layer(torch.relu(self.input_layer(x)) * self.mask)


def test_building_base_and_probe_models_leaves_every_global_rng_as_it_was():
    import random
    np.random.seed(0)
    random.seed(0)
    state = torch.random.get_rng_state()
    mup.build_shapes(lambda: NumpyMasked(64))
    mup.build_shapes(lambda: NumpyMasked(64), fallback_cpu=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert np.random.rand() == np.random.RandomState(0).rand() and random.random() == random.Random(0).random()
