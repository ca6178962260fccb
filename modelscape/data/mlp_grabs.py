"""Ready grabs for MLPs (the original's ``modelscape.data.mlp_grabs``): first/last layer weights, Gram
matrices and their diagonals, and the empirical neural tangent kernel.

A grab is called as ``fn(model=..., X_tr=..., y_tr=..., X_te=..., y_te=..., opt=..., **config)``; these take
what they need by name and ignore the rest.
"""
from __future__ import annotations

import torch
from torch import nn

from modelscape.backend.utils import ensure_numpy


def _layer_params(layer: nn.Module, detach: bool):
    W, b = layer.weight, layer.bias
    if detach:
        W = W.detach().clone()
        b = b.detach().clone() if b is not None else None
    return W, b


def get_Win(model: nn.Module, *, detach: bool = True, **kwargs):
    """``(weight, bias)`` of ``model.input_layer`` (copies unless ``detach=False``; bias None if absent)."""
    return _layer_params(model.input_layer, detach)


def get_Wout(model: nn.Module, *, detach: bool = True, **kwargs):
    """``(weight, bias)`` of ``model.output_layer`` (copies unless ``detach=False``)."""
    return _layer_params(model.output_layer, detach)


def get_W_gram(W: torch.Tensor, concatenate_outside: bool = True, **kwargs) -> torch.Tensor:
    """``W^T W`` (Gram matrix over the input dimensions) if ``concatenate_outside``, else ``W W^T``."""
    return W.T @ W if concatenate_outside else W @ W.T


def get_W_ii(W: torch.Tensor, i: int | None = None, monomial=None, **kwargs):
    """The diagonal entry ``W[i, i]`` of a Gram matrix as a float, or, given a ``Monomial`` and no ``i``,
    the list of ``W[k, k]`` over the dimensions ``k`` the monomial involves."""
    if monomial is not None and i is None:
        return [W[k, k].item() for k in monomial.basis()]
    if i is None:
        raise ValueError("get_W_ii needs an index i or a monomial")
    return W[i, i].item()


def get_W_trace(W: torch.Tensor, **kwargs) -> float:
    """The trace of a (Gram) matrix, as a float."""
    return torch.trace(W).item()


def _param_gradients(model: nn.Module, X: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """The (N, P) matrix of gradients of the scalar output on each row of ``X`` w.r.t. the trainable
    parameters, one backward pass per row."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for n in range(X.shape[0]):
        out = model(X[n:n + 1])
        if out.numel() != 1:
            raise ValueError(f"empirical_ntk needs one scalar output per example; the model returns shape "
                             f"{tuple(out.shape)} for one example")
        grads = torch.autograd.grad(out.reshape(()), params, create_graph=create_graph)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def empirical_ntk(model: nn.Module, X_tr: torch.Tensor, create_graph: bool = False, **kwargs):
    """The empirical NTK ``K[i, j] = <d f(x_i)/d theta, d f(x_j)/d theta>`` of a scalar-output model on the
    rows of ``X_tr``, as an (N, N) numpy array. Puts the model in eval mode, as the original did."""
    model.eval()
    device = next(model.parameters()).device
    X = torch.as_tensor(X_tr, dtype=torch.float32, device=device) if not isinstance(X_tr, torch.Tensor) \
        else X_tr.to(device)
    J = _param_gradients(model, X, create_graph)
    return ensure_numpy(J @ J.T)


def empirical_ntk_trace(model: nn.Module, X_tr: torch.Tensor, create_graph: bool = False, **kwargs) -> float:
    """The trace of ``empirical_ntk`` (the sum of squared parameter-gradient norms)."""
    return float(empirical_ntk(model, X_tr, create_graph=create_graph, **kwargs).trace())


__all__ = ["get_Win", "get_Wout", "get_W_gram", "get_W_ii", "get_W_trace", "empirical_ntk", "empirical_ntk_trace"]
