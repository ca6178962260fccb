"""muP for transformers: vector-like parameters, weight decay, GAMMA under Adam, explicit layer roles, the GPT
and its synthetic language, and agreement with Microsoft's ``mup`` package."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from modelscape import mup
from modelscape.data import markov_bfn, markov_chain, markov_entropy_rate
from modelscape.data.synthetic import powerlaw_bfn
from modelscape.models import GPT, MLP, Centered

V, T = 16, 8  # vocabulary and sequence length of the test language
CE = nn.CrossEntropyLoss()


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def gpt(width, depth=2, seed=0):
    torch.manual_seed(seed)
    return GPT(vocab_size=V, seq_len=T, width=width, depth=depth, n_heads=2, mlp_mult=2)


def language(bsz=4, seed=0):
    return markov_bfn(bsz, torch.Generator().manual_seed(seed), vocab_size=V, seq_len=T)


def group_of(opt, p):
    groups = [g for g in opt.param_groups if any(q is p for q in g["params"])]
    assert len(groups) == 1
    return groups[0]


def mult_of(model, name):
    """The forward multiplier a parameter is seen through (its layer's; 1 for norms and embeddings)."""
    module = model.get_submodule(name.rsplit(".", 1)[0])
    return getattr(module, "_mup_mult", 1.0)


def rms(t):
    return t.detach().double().pow(2).mean().sqrt().item()


# ------------------------------------------------------------------------------------------------------
# coordinate check on the GPT
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [2, 4])
def test_gpt_coordinate_check_flat_under_mup_growing_under_sp(depth):
    bfn = language()
    for opt, lr_mup, lr_sp in ((torch.optim.SGD, 0.5, 0.5), (torch.optim.Adam, 0.05, 0.003)):
        kwargs = dict(model_fn=lambda w: gpt(w, depth), batch_fn=bfn, steps=2, optimizer=opt, loss_fn=CE,
                      measure="delta")
        mu = mup.coord_check(widths=(64, 256, 1024), param="mup", lr=lr_mup, **kwargs).sel(step=2)
        spread = mu.max("width") / mu.min("width")
        assert float(spread.max()) < 1.5, f"{opt.__name__}, depth {depth}:\n{spread.to_series()}"
        assert float(mu.min()) > 1e-3  # every layer's activations do move
        sp = mup.coord_check(widths=(64, 256), param="sp", lr=lr_sp, **kwargs).sel(step=2)
        growth = (sp.sel(width=256) / sp.sel(width=64)).to_series()
        watched = [n for n in growth.index if n.endswith(("attn.proj", "fc2", "ln_f")) or n == "output_layer"]
        assert (growth[watched] > 1.5).all(), f"{opt.__name__}, depth {depth}, sp does not grow:\n{growth}"


@pytest.mark.parametrize("opt_cls,lr", [(torch.optim.SGD, 0.5), (torch.optim.Adam, 0.05)])
def test_bias_layernorm_and_embedding_updates_are_width_independent(opt_cls, lr):
    # Not the query and key biases: the key bias gets no gradient (softmax ignores a shift common to all
    # keys), and at init the query's gradient reaches it through the 1/d_head-scaled logits of still
    # uncorrelated queries and keys, which shrinks with width under any muP (Microsoft's included).
    watched = ["input_layer.weight", "pos_emb.weight", "blocks.0.ln1.weight", "blocks.0.ln1.bias",
               "blocks.0.attn.v.bias", "blocks.0.attn.proj.bias", "blocks.0.fc1.bias", "blocks.0.fc2.bias",
               "ln_f.weight", "ln_f.bias", "output_layer.bias"]
    bfn = language(16)
    changes = []
    for width in (64, 256, 1024):
        model = gpt(width, depth=1)
        opt = mup.parameterize(model, "mup", opt_cls, lr, example_input=bfn(0)[0])
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        for step in range(3):
            X, y = bfn(step)
            loss = CE(model(X).movedim(-1, 1), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        params = dict(model.named_parameters())
        changes.append([mult_of(model, n) * rms(params[n] - before[n]) for n in watched])
    changes = np.array(changes)
    assert (changes > 0).all()
    spread = changes.max(0) / changes.min(0)
    assert (spread < 1.5).all(), dict(zip(watched, spread.round(2)))


# ------------------------------------------------------------------------------------------------------
# the same rules as Microsoft's mup
# ------------------------------------------------------------------------------------------------------

def _effective(model, opt, rule, readout_mult=None):
    """Per parameter: (effective tensor, effective learning rate) as the function sees them; a parameter behind
    a multiplier ``m`` is ``m * p``, learning at ``m * lr`` (Adam) or ``m**2 * lr`` (SGD)."""
    out = {}
    for name, p in model.named_parameters():
        m = mult_of(model, name) if readout_mult is None else (readout_mult if name == "output_layer.weight" else 1.0)
        lr = group_of(opt, p)["lr"]
        out[name] = (m * p.detach(), lr * (m if rule == "adam" else m * m))
    return out


@pytest.mark.parametrize("param", ["mup", "mfp", "mup-lr"])
@pytest.mark.parametrize("rule", ["adam", "sgd"])
def test_effective_init_and_rates_equal_microsoft_mup_with_a_base_width(rule, param):
    # Absolute values, not ratios: the same sp draw, parameterized by us with a base width and by Microsoft's
    # set_base_shapes (which rescales the read-out and the biases) + MuReadout + MuAdam / MuSGD, gives every
    # parameter of the GPT the same effective tensor and learning rate, at and above the base width.
    import mup as ms  # the test extra, pinned in requirements.txt
    X = language()(0)[0]
    opt_cls, ms_opt_cls = (torch.optim.Adam, ms.MuAdam) if rule == "adam" else (torch.optim.SGD, ms.MuSGD)

    def ms_gpt(w):
        net = GPT(vocab_size=V, seq_len=T, width=w, depth=2, n_heads=2, mlp_mult=2)
        net.output_layer = ms.MuReadout(w, V)
        return net

    for width in (64, 256):
        ours = gpt(width)
        state = {k: v.clone() for k, v in ours.state_dict().items()}
        with torch.device("meta"):
            base = gpt(64)
        opt = mup.parameterize(ours, param, opt_cls, 0.3, base=base, example_input=X)
        theirs = ms_gpt(width)
        theirs.load_state_dict(state)
        ms.set_base_shapes(theirs, ms_gpt(64))
        ms_opt = ms_opt_cls(theirs.parameters(), lr=0.3)
        a = _effective(ours, opt, rule)
        b = _effective(theirs, ms_opt, rule, readout_mult=1.0 / theirs.output_layer.width_mult())
        assert a.keys() == b.keys() and len(a) == 38
        for name in a:
            torch.testing.assert_close(a[name][0], b[name][0], rtol=1e-6, atol=0, msg=f"{name}: effective init")
            assert a[name][1] == pytest.approx(b[name][1], rel=1e-12), (name, "effective lr")
        # the attention logits: sp's 1/sqrt(d_head) at the base width, 1/d_head from there (d_head 32 -> 128)
        attn = ours.blocks[0].attn
        assert attn.attn_scale == pytest.approx(32 ** -0.5 * 32 / attn.d_head)
        if width == 256:
            assert b["output_layer.weight"][1] == pytest.approx(0.3 / 4)  # the read-out learns 4x slower


# ------------------------------------------------------------------------------------------------------
# weight decay
# ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
def test_weight_decay_per_step_is_width_independent(opt_cls):
    lr, wd = 0.05, 0.1
    for width in (64, 512):
        for model, X in ((MLP(8, width, 2, 1), torch.randn(4, 8)), (gpt(width, depth=1), language()(0)[0])):
            opt = mup.parameterize(model, "mup", opt_cls, lr, weight_decay=wd, example_input=X)
            assert len(opt.param_groups) > 2
            for g in opt.param_groups:
                assert g["lr"] * g["weight_decay"] == pytest.approx(lr * wd, rel=1e-9), g["param_names"]


@pytest.mark.parametrize("opt_cls,lr", [(torch.optim.SGD, 0.5), (torch.optim.AdamW, 0.05)])
def test_each_family_is_one_network_with_weight_decay(opt_cls, lr):
    X, y = powerlaw_bfn(64, gen=torch.Generator().manual_seed(1), dim=16)(0)
    runs = {}
    for param in ("mup", "mfp", "mup-lr"):
        torch.manual_seed(0)
        model = MLP(16, 512, 2, 1)
        # (Adam's eps is the one thing that tells the three apart: their raw gradients differ in scale)
        extra = dict(momentum=0.9) if opt_cls is torch.optim.SGD else dict(eps=1e-12)
        opt = mup.parameterize(model, param, opt_cls, lr, weight_decay=0.1, **extra)
        outs = []
        for _ in range(4):
            out = model(X)
            outs.append(out.detach())
            loss = (out - y).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        runs[param] = torch.stack(outs)
    assert (runs["mup"][-1] - runs["mup"][0]).abs().max() > 1e-2
    for other in ("mfp", "mup-lr"):
        np.testing.assert_allclose(runs[other], runs["mup"], rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------------------------------------------
# GAMMA under SGD and Adam
# ------------------------------------------------------------------------------------------------------

def _gamma_changes(opt_cls, gamma, lr0):
    """Change of the output and of the last hidden layer's output in one step, under muP and GAMMA.

    Centered (f - f0, as CENTER=True does), so the loss's gradient at the output is the same for every gamma.
    """
    X, y = powerlaw_bfn(64, gen=torch.Generator().manual_seed(0), dim=16)(0)
    torch.manual_seed(0)
    net = MLP(16, 1024, 2, 1)
    opt = mup.parameterize(net, "mup", opt_cls, mup.gamma_lr(lr0, gamma, opt_cls))
    mup.rescale(net, gamma)
    model = Centered(net)
    feats = {}
    net.hidden_layers[0].register_forward_hook(lambda m, i, o: feats.__setitem__(len(feats), o.detach()))
    out0 = model(X)
    loss = (out0 - y).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    out1 = model(X)
    return np.array([rms(out1 - out0), rms(feats[1] - feats[0])])


def test_gamma_changes_output_and_features_alike_under_sgd_and_adam():
    ratios = {}
    for opt_cls, lr0 in ((torch.optim.SGD, 0.1), (torch.optim.Adam, 0.01)):
        base = _gamma_changes(opt_cls, 1.0, lr0)
        ratios[opt_cls] = {g: _gamma_changes(opt_cls, g, lr0) / base for g in (0.1, 10.0)}
    for g in (0.1, 10.0):
        sgd, adam = ratios[torch.optim.SGD][g], ratios[torch.optim.Adam][g]
        np.testing.assert_allclose(adam, sgd, rtol=0.25, err_msg=f"gamma {g}: (output, features) ratios")
    # and they are the seed's: lazy at 0.1 (features 10x slower, output as fast), richer at 10
    np.testing.assert_allclose(ratios[torch.optim.Adam][0.1], [1.0, 0.1], rtol=0.25)
    np.testing.assert_allclose(ratios[torch.optim.Adam][10.0], [0.1, 1.0], rtol=0.25)


def test_gamma_lr_per_update_rule():
    assert mup.gamma_lr(0.1, 1.0, "adam") == 0.1
    assert mup.gamma_lr(0.1, 4.0, "adam") == pytest.approx(0.1)
    assert mup.gamma_lr(0.1, 0.5, torch.optim.AdamW) == pytest.approx(0.05)
    assert mup.gamma_lr(0.1, 0.5, torch.optim.SGD) == pytest.approx(0.025)
    with pytest.raises(ValueError, match="update_rule"):
        mup.gamma_lr(0.1, 2.0, "lion")
    with pytest.raises(ValueError, match="LBFGS"):
        mup.gamma_lr(0.1, 2.0, torch.optim.LBFGS)
    assert mup.gamma_lr(0.1, 1.0, torch.optim.LBFGS) == 0.1  # gamma 1 needs no rule


# ------------------------------------------------------------------------------------------------------
# layer roles
# ------------------------------------------------------------------------------------------------------

class Backwards(nn.Module):
    """Registers its read-out first; names its roles."""

    def __init__(self, name=True):
        super().__init__()
        head, mid, body = nn.Linear(32, 1), nn.Linear(32, 32), nn.Linear(4, 32)
        if name:
            self.output_layer, self.mid, self.input_layer = head, mid, body
        else:
            self.head, self.mid, self.body = head, mid, body

    def forward(self, x):
        layers = dict(self.named_children())
        first, last = (layers["input_layer"], layers["output_layer"]) if "input_layer" in layers else \
            (layers["body"], layers["head"])
        return last(torch.relu(self.mid(torch.relu(first(x)))))


def test_roles_come_from_the_names_not_the_registration_order():
    x = torch.randn(3, 4)
    model = Backwards()
    roles = {layer.path: layer.role for layer in mup.anatomy(model, example_input=x).layers}
    assert roles == {"output_layer": "readout", "mid": "hidden", "input_layer": "readin"}
    opt = mup.parameterize(model, "mup", torch.optim.SGD, 1.0, example_input=x)
    assert group_of(opt, model.output_layer.weight)["lr"] == pytest.approx(1.0) and model.output_layer._mup_mult < 0.2

    unnamed = Backwards(name=False)
    with pytest.raises(ValueError, match=r"'head' \(Linear\).*'body' \(Linear\)"):
        mup.parameterize(unnamed, "mup", torch.optim.SGD, 1.0, example_input=x)
    with pytest.raises(ValueError, match="input_layer / output_layer"):
        mup.parameterize(unnamed, "mup", torch.optim.SGD, 1.0)
    mup.parameterize(unnamed, "mup", torch.optim.SGD, 1.0, input_layer="body", output_layer=unnamed.head,
                     example_input=x)
    assert unnamed.head._mup_mult < 0.2 and unnamed.body._mup_mult > 1

    wrong = Backwards()
    with pytest.raises(ValueError, match=r"read-in 'mid' \(Linear\).*'input_layer' \(Linear\) first"):
        mup.anatomy(wrong, input_layer="mid", example_input=x)

    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))  # registration order is call order
    assert [layer.role for layer in mup.anatomy(seq, example_input=x).layers] == ["readin", "readout"]


def test_multihead_attention_is_refused_with_what_to_use():
    model = nn.Sequential(nn.Linear(4, 8), nn.MultiheadAttention(8, 2), nn.Linear(8, 1))
    with pytest.raises(ValueError, match=r"'1' \(MultiheadAttention\).*SelfAttention"):
        mup.parameterize(model, "mup", torch.optim.SGD, 0.1)


# ------------------------------------------------------------------------------------------------------
# the GPT and its language
# ------------------------------------------------------------------------------------------------------

def test_markov_language():
    bfn = language(bsz=64)
    X, y = bfn(0)
    assert X.shape == y.shape == (64, T) and X.dtype == torch.long
    assert torch.equal(X[:, 1:], y[:, :-1])  # next-token targets
    successors, probs = markov_chain(V, 2, 4, 0)
    ctx = X[:, :-1] + V * X[:, 1:]  # (older, newer) pairs of the window
    allowed = (successors[ctx] == y[:, 1:].unsqueeze(-1)).any(-1)
    assert allowed.all()  # every transition is one the chain allows
    assert not torch.equal(bfn(1)[0], X)  # fresh sequences every step
    assert torch.equal(language(bsz=64)(0)[0], X)  # the generator decides them
    fixed = markov_bfn(8, None, X=X, y=y)
    assert fixed(5)[0] is X
    # the entropy rate is the cross-entropy of the chain's own probabilities on its sequences
    p = probs[ctx, (successors[ctx] == y[:, 1:].unsqueeze(-1)).float().argmax(-1)]
    assert -p.log().mean().item() == pytest.approx(markov_entropy_rate(V, 2, 4, 0), rel=0.1)
    with pytest.raises(ValueError, match="branching"):
        markov_chain(4, 2, 5, 0)


def test_gpt_is_causal_and_checks_its_input():
    model = gpt(32)
    X = language()(0)[0]
    out = model(X)
    assert out.shape == (4, T, V)
    X2 = X.clone()
    X2[:, 5:] = (X2[:, 5:] + 1) % V
    out2 = model(X2)
    torch.testing.assert_close(out2[:, :5], out[:, :5])
    assert not torch.allclose(out2[:, 5:], out[:, 5:])
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(2, T + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids"):
        model(torch.randn(2, T))


def test_gpt_trains_from_a_config():
    from modelscape.backend.job import run_config

    config = dict(MODEL="GPT", WIDTH=32, DEPTH=1, LR=0.05, OPTIMIZER="Adam", LOSS="cross_entropy",
                  PARAMETERIZATION="mup", ONLINE=True, N_SAMPLES=8, N_TEST=32, MAX_ITER=60,
                  LOSS_CHECKPOINTS=[1e-9], vocab_size=V, seq_len=T, order=1, branching=2)
    rec = run_config(config, dict(base_bfn=markov_bfn), quiet=True)
    assert rec["steps"] == 60
    assert rec["test_loss"] < math.log(V) - 0.3  # it learned something about the language
