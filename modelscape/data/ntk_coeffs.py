"""Level coefficients of the ReLU NTK (the original's ``modelscape.data.ntk_coeffs``).

One hidden ReLU layer with weight variance ``w_var`` and bias variance ``b_var`` on data whose covariance
has trace ``rho`` has pre-activations of variance ``q = b_var + w_var * rho`` and, for two inputs with dot
product ``t``, covariance ``s = b_var + w_var * t``, i.e. correlation ``c = s / q``. Its NTK as a function of
``t`` is

    K(t) = w_var * (E[relu(u) relu(v)] + s * E[relu'(u) relu'(v)]) = w_var * q / (2 pi) * G(c),
    G(c) = sqrt(1 - c^2) + 2 c (pi - arccos c)

(the arc-cosine kernels of degree 1 and 0). The level coefficient of degree l is ``K^(l)(0)``, the l-th
derivative in ``t`` at 0: ``w_var q / (2 pi) * (w_var / q)^l * G^(l)(c0)`` with ``c0 = b_var / q``. For
``l >= 2``, ``G^(l)(c) = P_l(c) / (1 - c^2)^(l - 1/2)`` with ``P_2 = 3 - 2 c^2`` and
``P_{l+1} = (1 - c^2) P_l' + (2 l - 1) c P_l``.
"""
from __future__ import annotations

import math

from numpy.polynomial import Polynomial

from modelscape.backend.utils import ensure_numpy


def kernel_parse_kwargs(kwargs: dict):
    """``(w_var, b_var)`` from ``weight_variance``/``bias_variance`` (or ``w_var``/``b_var``), both given;
    otherwise from ``kernel_width`` (default 1): ``w_var = sqrt(2 pi / (1 + 2 pi kernel_width))``,
    ``b_var = kernel_width * w_var``."""
    for w_key, b_key in (("weight_variance", "bias_variance"), ("w_var", "b_var")):
        if w_key in kwargs and b_key in kwargs:
            return float(kwargs[w_key]), float(kwargs[b_key])
    width = float(kwargs.get("kernel_width", 1.0))
    w_var = math.sqrt(2 * math.pi / (1 + 2 * math.pi * width))
    return w_var, width * w_var


def relu_ntk_G_derivative(ell: int, c: float) -> float:
    """``G^(ell)(c)`` for ``G(c) = sqrt(1 - c^2) + 2 c (pi - arccos c)``, ``|c| < 1``."""
    root = math.sqrt(max(0.0, 1.0 - c * c))
    if ell == 0:
        return root + 2.0 * c * (math.pi - math.acos(c))
    if ell == 1:
        return 2.0 * (math.pi - math.acos(c)) + (c / root if root > 0 else math.inf)
    P = Polynomial([3.0, 0.0, -2.0])
    one_minus_c2, c_poly = Polynomial([1.0, 0.0, -1.0]), Polynomial([0.0, 1.0])
    for level in range(2, ell):
        P = one_minus_c2 * P.deriv() + (2 * level - 1) * c_poly * P
    return float(P(c)) / (1.0 - c * c) ** (ell - 0.5)


def get_relu_level_coeff_fn(data_eigvals, **kwargs):
    """``eval_level_coeff(ell) -> K^(ell)(0)`` for the ReLU NTK on data with these covariance eigenvalues
    (variances from ``kernel_parse_kwargs``). Feed it to ``generate_hea_monomials``."""
    w_var, b_var = kernel_parse_kwargs(kwargs)
    q = b_var + w_var * float(ensure_numpy(data_eigvals).sum())
    c0 = b_var / q
    if abs(c0) >= 1.0:
        raise ValueError(f"b_var / q = {c0} has |c0| >= 1 (w_var = {w_var}): the kernel's derivatives are "
                         "singular there; use a positive weight variance")
    pref, scale = w_var * q / (2 * math.pi), w_var / q

    def eval_level_coeff(ell):
        return pref * scale ** int(ell) * relu_ntk_G_derivative(int(ell), c0)

    return eval_level_coeff


__all__ = ["kernel_parse_kwargs", "get_relu_level_coeff_fn", "relu_ntk_G_derivative"]
