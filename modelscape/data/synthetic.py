"""Synthetic regression with a power-law spectrum, the workhorse of scaling-law experiments."""
from __future__ import annotations

import torch

__all__ = ["powerlaw_target", "powerlaw_bfn", "fixed_bfn"]


def powerlaw_target(dim: int, alpha: float = 1.5, beta: float = 1.0, target_seed: int = 0):
    """Eigenvalues ``lambda_k = k**-alpha`` of the input covariance and a teacher ``w`` with
    ``lambda_k * w_k**2 = k**-(1 + beta)`` (random signs), the same for every trial of a sweep."""
    k = torch.arange(1, dim + 1, dtype=torch.float64)
    lambdas = k ** -alpha
    g = torch.Generator().manual_seed(target_seed)
    signs = torch.randint(0, 2, (dim,), generator=g, dtype=torch.float64) * 2 - 1
    w = signs * torch.sqrt(k ** -(1.0 + beta) / lambdas)
    return lambdas.float(), w.float()


def powerlaw_bfn(bsz, gen=None, X=None, y=None, dim=32, alpha=1.5, beta=1.0, noise=0.0, target_seed=0,
                 nonlinear=False, **kwargs):
    """Base batch function for a power-law linear (or tanh-of-linear) teacher.

    Online (``X`` is None): each call of ``batch_fn(step)`` draws ``bsz`` fresh samples from ``gen``.
    Offline (``X``, ``y`` given): every step returns that fixed training set.
    """
    if X is not None and y is not None:
        return fixed_bfn(X, y)
    device = gen.device if gen is not None else torch.device("cpu")
    lambdas, w = (t.to(device) for t in powerlaw_target(dim, alpha, beta, target_seed))
    scale = lambdas.sqrt()

    def batch_fn(step):
        Xb = torch.randn(bsz, dim, generator=gen, device=device) * scale
        yb = Xb @ w
        if nonlinear:
            yb = torch.tanh(yb)
        if noise:
            yb = yb + noise * torch.randn(bsz, generator=gen, device=device)
        return Xb, yb.unsqueeze(1)

    return batch_fn


def fixed_bfn(X, y):
    """``batch_fn`` that returns the same ``(X, y)`` tensors at every step (offline training)."""
    def batch_fn(step):
        return X, y
    return batch_fn
