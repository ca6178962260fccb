"""Built-in models: shapes, depth, nonlinearities, and the centering wrapper."""
import pytest
import torch
from torch import nn

from modelscape.models import CNN, MLP, Centered, SelfAttention, Transformer, make_nonlinearity


def n_linear(model):
    return sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules())


@pytest.mark.parametrize("depth", [1, 3])
def test_mlp_shapes_and_depth(depth):
    m = MLP(d_in=7, width=32, depth=depth, d_out=3)
    assert m(torch.randn(5, 7)).shape == (5, 3)
    assert m(torch.randn(5, 1, 7)).shape == (5, 3)  # inputs are flattened
    assert n_linear(m) == depth + 1
    assert m.input_layer.out_features == 32 and m.output_layer.in_features == 32
    assert all(layer.in_features == layer.out_features == 32 for layer in m.hidden_layers)


def test_mlp_options():
    m = MLP(d_in=4, width=16, depth=2, bias=False, nonlinearity="tanh")
    assert all(layer.bias is None for layer in m.modules() if isinstance(layer, nn.Linear))
    assert isinstance(m.nonlin, nn.Tanh)
    lin = MLP(d_in=4, width=16, depth=2, nonlinearity="identity")
    x = torch.randn(3, 4)
    torch.testing.assert_close(lin(2 * x) + lin(torch.zeros(1, 4)), 2 * lin(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("depth", [2, 3])
def test_cnn_shapes_and_depth(depth):
    m = CNN(in_channels=3, width=8, depth=depth, d_out=4)
    assert m(torch.randn(2, 3, 10, 10)).shape == (2, 4)
    assert m(torch.randn(2, 3, 5, 7)).shape == (2, 4)
    assert sum(isinstance(x, nn.Conv2d) for x in m.modules()) == depth


@pytest.mark.parametrize("depth,heads", [(1, 1), (2, 4)])
def test_transformer_shapes_and_depth(depth, heads):
    m = Transformer(d_in=6, width=32, depth=depth, d_out=2, n_heads=heads)
    assert m(torch.randn(3, 5, 6)).shape == (3, 2)
    assert len(m.blocks) == depth


@pytest.mark.parametrize("cls,kwargs", [(MLP, {}), (CNN, {}), (Transformer, {})])
@pytest.mark.parametrize("depth", [0, -1])
def test_depth_below_one_is_an_error(cls, kwargs, depth):
    with pytest.raises(ValueError, match="depth"):
        cls(width=8, depth=depth, **kwargs)


def test_attention_heads_must_divide_width():
    with pytest.raises(ValueError, match="divisible"):
        SelfAttention(10, n_heads=3)


def test_attention_mixes_positions():
    m = Transformer(d_in=4, width=16, depth=1)
    x = torch.randn(1, 6, 4)
    y = x.clone()
    y[0, 0] += 1.0  # changing one position changes the pooled output through attention and the MLP
    assert not torch.allclose(m(x), m(y))


def test_nonlinearities():
    assert isinstance(make_nonlinearity(None), nn.ReLU)
    assert isinstance(make_nonlinearity("GELU"), nn.GELU)
    assert isinstance(make_nonlinearity(nn.SiLU), nn.SiLU)
    act = nn.Tanh()
    assert make_nonlinearity(act) is act
    with pytest.raises(ValueError, match="swishy"):
        make_nonlinearity("swishy")


@pytest.mark.parametrize("model,x", [
    (MLP(d_in=5, width=32, depth=2, d_out=2), torch.randn(9, 5)),
    (CNN(in_channels=2, width=8, depth=2, d_out=3), torch.randn(4, 2, 6, 6)),
    (Transformer(d_in=3, width=16, depth=2), torch.randn(4, 5, 3)),
])
def test_centered_model_outputs_exactly_zero_at_init_and_trains(model, x):
    c = Centered(model)
    out = c(x)
    assert out.shape == model(x).shape and torch.count_nonzero(out) == 0
    assert model(x).abs().sum() > 0
    assert all(not p.requires_grad for p in c.baseline.parameters())
    opt = torch.optim.SGD(c.parameters(), lr=0.1)
    (c(x) - 1).pow(2).mean().backward()
    assert all(p.grad is None for p in c.baseline.parameters())
    opt.step()
    assert torch.count_nonzero(c(x)) > 0
    assert torch.count_nonzero(c.baseline(x) - model(x)) > 0  # the baseline stayed at the initial model


def test_centered_caches_the_baseline_on_remembered_tensors():
    calls = []
    m = MLP(d_in=4, width=16, depth=1)
    c = Centered(m)
    c.baseline.register_forward_hook(lambda mod, i, o: calls.append(1))
    X = torch.randn(8, 4)
    c.remember(X)
    c.remember(X)
    assert len(calls) == 1
    for _ in range(5):
        assert torch.count_nonzero(c(X)) == 0
    assert len(calls) == 1  # cached
    c(X.clone())
    assert len(calls) == 2  # another tensor (even with equal values) is computed afresh
