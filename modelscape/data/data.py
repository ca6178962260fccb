"""Synthetic Gaussian data with a power-law spectrum, Hermite-monomial targets and dataset helpers (the
original's ``modelscape.data.data``).

``get_synthetic_X`` draws ``x ~ N(0, diag(data_eigvals))``. A monomial target is evaluated in the whitened
coordinates of a reference sample (its SVD ``X = U diag(lambdas) Vt``, so ``x Vt^T / lambdas * sqrt(N)`` has
unit variance per direction) as the product of normalised Hermite polynomials ``He_k / sqrt(k!)``, which
are orthonormal under the standard Gaussian.
"""
from __future__ import annotations

import math
import os
from functools import partial

import numpy as np
import torch

from modelscape.backend.utils import ensure_numpy, ensure_torch
from modelscape.data.monomial import Monomial, generate_hea_monomials

MAX_HERMITE_DEGREE = 20


def get_powerlaw(P, exp, offset=3, normalize=True) -> np.ndarray:
    """``(offset + k) ** -exp`` for ``k = 0..P-1``, summing to 1 if ``normalize``."""
    values = (offset + np.arange(P, dtype=float)) ** -float(exp)
    return values / values.sum() if normalize else values


def hermite(n: int, x):
    """The probabilists' Hermite polynomial ``He_n(x)`` (``He_0 = 1``, ``He_1 = x``,
    ``He_{k+1} = x He_k - k He_{k-1}``), elementwise on an array or tensor."""
    prev, cur = x * 0 + 1, x
    if n == 0:
        return prev
    for k in range(1, n):
        prev, cur = cur, x * cur - k * prev
    return cur


def get_hermite_polynomials() -> dict:
    """``{n: He_n}`` for n = 1..20, each a function of an array."""
    return {n: partial(hermite, n) for n in range(1, MAX_HERMITE_DEGREE + 1)}


def compute_hermite_basis(X, monomials, is_X_PCAd=False) -> np.ndarray:
    """``H[:, j]`` = the j-th monomial's normalised Hermite product on the rows of ``X``, divided by
    ``sqrt(N)`` (so each column has norm about 1). Unless ``is_X_PCAd``, ``X`` is first whitened with its own
    SVD (``X -> sqrt(N) U``). ``monomials``: a Monomial or a list of them. Returns an (N, len) numpy array."""
    N = X.shape[0]
    if not is_X_PCAd:
        U = torch.linalg.svd(ensure_torch(X, device="cpu"), full_matrices=False)[0]
        X = math.sqrt(N) * U
    Z = ensure_numpy(X).astype(np.float64)
    if not isinstance(monomials, list):
        monomials = [monomials]
    H = np.empty((N, len(monomials)))
    for j, m in enumerate(monomials):
        col = np.full(N, 1.0 / math.sqrt(N))
        for i, k in m.items():
            col *= hermite(int(k), Z[:, int(i)]) / math.sqrt(math.factorial(int(k)))
        H[:, j] = col
    return H


def preprocess(X, **kwargs):
    """Flatten an image batch ``(N, c, h, w)`` to ``(N, d)``. Options: ``grayscale`` (average the channels),
    ``center`` (subtract the mean image, before and after ZCA), ``normalize`` (unit-norm rows),
    ``zca_strength`` (flatten the spectrum: ``S -> S / sqrt(strength * S^2 / mean(S^2) + 1)``)."""
    X = ensure_torch(X, device=X.device if isinstance(X, torch.Tensor) else "cpu")
    X = X.mean(dim=1).flatten(1) if kwargs.get("grayscale", False) else X.flatten(1)
    if kwargs.get("center", False):
        X = X - X.mean(dim=0)
    if kwargs.get("normalize", False):
        X = X / torch.linalg.norm(X, dim=1, keepdim=True)
    strength = kwargs.get("zca_strength", 0)
    if strength:
        U, S, Vt = torch.linalg.svd(X, full_matrices=False)
        S_new = S / torch.sqrt(strength / torch.mean(S ** 2) * S ** 2 + 1)
        X = U @ torch.diag(S_new / torch.linalg.norm(S_new)) @ Vt
        if kwargs.get("center", False):
            X = X - X.mean(dim=0)
    return X


def get_binarized_dataset(dataset, classes, n_samples):
    """``(X, y)`` with ``n_samples`` images of two class groups (``classes = [c0, c1]``, default digits 0-4
    vs 5-9), half each, shuffled with numpy's global RNG, pixels in [0, 1], ``y = -1`` for ``c0`` and
    ``+1`` for ``c1``. Reads ``$DATASETPATH/cifar5m/part0.npz`` (X, Y; images NHWC), ``svhn/svhn_all.npz``
    (X, y) or ``imagenet/imagenet32.npz`` (unlabelled: returns ``(X, None)`` with X as (N, 3, 32, 32))."""
    root = os.getenv("DATASETPATH")
    if root is None:
        raise ValueError("get_binarized_dataset reads $DATASETPATH: set it to the folder holding the datasets")
    if dataset == "imagenet32":
        X = np.load(os.path.join(root, "imagenet", "imagenet32.npz"))["data"][:n_samples].astype(float)
        if len(X) != n_samples:
            raise ValueError(f"imagenet32 has only {len(X)} images, {n_samples} asked for")
        return X.reshape(n_samples, 3, 32, 32), None
    if dataset == "cifar5m":
        raw = np.load(os.path.join(root, "cifar5m", "part0.npz"))
        X, labels = raw["X"].transpose(0, 3, 1, 2), raw["Y"]
    elif dataset == "svhn":
        raw = np.load(os.path.join(root, "svhn", "svhn_all.npz"))
        X, labels = raw["X"], raw["y"]
    else:
        raise ValueError(f"dataset {dataset!r} is not supported (cifar5m, svhn, imagenet32)")
    c0, c1 = classes if classes is not None else ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])
    idx = np.concatenate([np.flatnonzero(np.isin(labels, c0))[:n_samples // 2],
                          np.flatnonzero(np.isin(labels, c1))[:n_samples // 2]])
    if len(idx) != n_samples:
        raise ValueError(f"{dataset}: only {len(idx)} images of classes {c0} and {c1} for {n_samples} asked")
    idx = np.random.permutation(idx)
    return X[idx] / 255.0, np.where(np.isin(labels[idx], c1), 1, -1)


def get_synthetic_X(d=500, N=15000, offset=3, alpha=1.5, data_eigvals=None, gen=None, **kwargs):
    """``(X, data_eigvals)``: ``N`` Gaussian samples in ``d`` dimensions with covariance
    ``diag(data_eigvals)`` (by default the normalised power law ``(offset + k) ** -alpha``), drawn with
    ``gen`` on its device."""
    device = gen.device if gen is not None else None
    if data_eigvals is None:
        data_eigvals = get_powerlaw(d, alpha, offset=offset, normalize=True)
    data_eigvals = ensure_torch(data_eigvals, device=device)
    X = torch.randn(N, len(data_eigvals), generator=gen, device=data_eigvals.device) * torch.sqrt(data_eigvals)
    return X, data_eigvals


def get_new_polynomial_data(lambdas, Vt, monomials, dim, N, data_eigvals, N_original,
                            new_X_fn=get_synthetic_X, coeffs=1, gen=None):
    """``(X, y)``: ``N`` fresh samples from ``new_X_fn`` and the monomial target on them, evaluated in the
    whitened coordinates of the reference sample (``lambdas``, ``Vt`` from its SVD, ``N_original`` rows).
    ``y`` has unit variance per monomial; several monomials are averaged."""
    X_new, _ = new_X_fn(d=dim, N=N, data_eigvals=data_eigvals, gen=gen)
    lambdas, Vt = ensure_torch(lambdas, device=X_new.device), ensure_torch(Vt, device=X_new.device)
    whitened = X_new @ Vt.T / lambdas * math.sqrt(N_original)
    y = coeffs * compute_hermite_basis(whitened, monomials, is_X_PCAd=True) * math.sqrt(N)
    if y.ndim == 2:
        y = y.mean(axis=1)
    return X_new, y


def polynomial_batch_fn(lambdas, Vt, monomials, bsz, data_eigvals, N, X=None, y=None,
                        data_creation_fn=get_new_polynomial_data, gen=None):
    """Base batch function for a monomial target: ``batch_fn(step)`` returns ``(X, y)`` as given (offline)
    or ``bsz`` fresh samples from ``data_creation_fn`` (online)."""
    lambdas, Vt, data_eigvals = (ensure_torch(t, device=gen.device if gen is not None else None)
                                 for t in (lambdas, Vt, data_eigvals))

    def batch_fn(step: int, X=X, y=y):
        if X is not None and y is not None:
            return ensure_torch(X), ensure_torch(y)
        with torch.no_grad():
            Xb, yb = data_creation_fn(lambdas=lambdas, Vt=Vt, monomials=monomials, dim=len(data_eigvals), N=bsz,
                                      data_eigvals=data_eigvals, N_original=N, gen=gen)
        device = Xb.device
        return ensure_torch(Xb, device=device), ensure_torch(yb, device=device)

    return batch_fn


def get_synthetic_dataset(X=None, data_eigvals=None, d=500, N=15000, offset=3, alpha=1.5, cutoff_mode=10000,
                          noise_size=0.1, yoffset=3, beta=1.2, normalized=True, gen=None, **kwargs):
    """A full synthetic regression problem: ``(X, y, H, monomials, hea_eigvals, v_true, data_eigvals)``.

    ``H`` holds the ``cutoff_mode`` monomials of largest HEA eigenvalue under the kernel ``kwargs['kerneltype']``
    (an object with ``get_level_coeff_fn(kernel_width=..., data_eigvals=..., **kwargs)``); the target is
    ``y = H v_true + noise`` with power-law coefficients ``v_true`` (exponent ``beta / 2``, norm ``sqrt(N)``
    if ``normalized``) and Gaussian noise of std ``noise_size``."""
    if X is None:
        X, data_eigvals = get_synthetic_X(d=d, N=N, offset=offset, alpha=alpha, gen=gen)
    kerneltype = kwargs.get("kerneltype")
    if kerneltype is None:
        raise ValueError("get_synthetic_dataset needs kerneltype=<object with get_level_coeff_fn>")
    level_fn = kerneltype.get_level_coeff_fn(kernel_width=kwargs.pop("kernel_width", 2), data_eigvals=data_eigvals,
                                             **kwargs)
    hea_eigvals, monomials = generate_hea_monomials(data_eigvals, cutoff_mode, level_fn, kmax=kwargs.get("kmax", 9))
    device = X.device
    H = ensure_torch(compute_hermite_basis(X, monomials), device=device)
    v_true = ensure_torch(get_powerlaw(H.shape[1], beta / 2, offset=yoffset, normalize=normalized), device=device)
    if normalized:
        v_true = v_true / torch.linalg.norm(v_true) * math.sqrt(N)
    noise = torch.randn(H.shape[0], generator=gen, device=device) * noise_size
    y = H @ v_true + noise
    return X, y, H, monomials, ensure_torch(hea_eigvals, device=device), v_true, data_eigvals


def get_powerlaw_target(H, source_exp, offset=6, normalizeH=False, include_noise=False):
    """A target ``y = H c`` with random signs and ``c_k^2`` a normalised power law of exponent ``source_exp``
    (> 1), rescaled to norm ``sqrt(M)``. ``include_noise`` adds noise carrying the power law's tail beyond the
    ``P`` columns of ``H``. Uses numpy's global RNG."""
    from scipy.special import zeta  # optional: scipy, only for this function

    if source_exp <= 1:
        raise ValueError(f"source_exp must be > 1 for a power-law target, got {source_exp}")
    if offset < 1:
        raise ValueError(f"offset must be >= 1, got {offset}")
    H = ensure_numpy(H)
    M, P = H.shape
    if normalizeH:
        H = H / np.linalg.norm(H, axis=0, keepdims=True)
    coeffs = np.sqrt(get_powerlaw(P, source_exp, offset=offset)) * np.random.choice([-1.0, 1.0], size=P)
    y = H @ coeffs
    if include_noise:
        total, tail = zeta(source_exp, offset), zeta(source_exp, offset + P)
        y = y / np.linalg.norm(y) + np.random.normal(0, np.sqrt(tail / (total - tail) / M), y.shape)
    return math.sqrt(M) * y / np.linalg.norm(y)


__all__ = ["get_powerlaw", "hermite", "get_hermite_polynomials", "compute_hermite_basis", "preprocess",
           "get_binarized_dataset", "get_synthetic_X", "get_new_polynomial_data", "polynomial_batch_fn",
           "get_synthetic_dataset", "get_powerlaw_target", "Monomial"]
