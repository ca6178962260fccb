"""The original's research helpers (modelscape.data.data / monomial / ntk_coeffs / mlp_grabs), each checked
against an independent computation: Monte Carlo for Hermite orthonormality, quadrature of the ReLU NTK for
its level coefficients, brute-force enumeration for the HEA order, torch.func Jacobians for the eNTK."""
import itertools
import math

import numpy as np
import pytest
import torch
from numpy.polynomial import hermite_e
from scipy import integrate, stats

from modelscape import mup
from modelscape.data.data import (compute_hermite_basis, get_binarized_dataset, get_hermite_polynomials,
                                  get_new_polynomial_data, get_powerlaw, get_powerlaw_target, get_synthetic_X,
                                  polynomial_batch_fn, preprocess)
from modelscape.data.mlp_grabs import (empirical_ntk, empirical_ntk_trace, get_W_gram, get_W_ii, get_W_trace,
                                       get_Win, get_Wout)
from modelscape.data.monomial import Monomial, compute_hea_eigval, generate_hea_monomials, group_by_deg_max
from modelscape.data.ntk_coeffs import get_relu_level_coeff_fn, kernel_parse_kwargs
from modelscape.model import MLP


# --- Hermite polynomials and monomial targets ------------------------------------------------------------

def test_hermite_polynomials_match_numpy_and_are_orthonormal_by_monte_carlo():
    he = get_hermite_polynomials()
    x = np.linspace(-3, 3, 7)
    for n in (1, 2, 5, 11, 20):
        np.testing.assert_allclose(he[n](x), hermite_e.hermeval(x, [0] * n + [1]), rtol=1e-9, atol=1e-6)
    z = np.random.default_rng(0).standard_normal(400_000)
    normed = [np.ones_like(z)] + [he[n](z) / math.sqrt(math.factorial(n)) for n in range(1, 5)]
    gram = np.array([[np.mean(a * b) for b in normed] for a in normed])
    np.testing.assert_allclose(gram, np.eye(5), atol=0.06)


def test_hermite_basis_columns_are_orthonormal_on_whitened_gaussian_data():
    X, _ = get_synthetic_X(d=8, N=50_000, alpha=1.0, gen=torch.Generator().manual_seed(0))
    monomials = [Monomial({}), Monomial({0: 1}), Monomial({3: 2}), Monomial({1: 1, 2: 1}), Monomial({0: 3})]
    H = compute_hermite_basis(X, monomials)  # whitened with X's own SVD; columns have norm ~1
    np.testing.assert_allclose(H.T @ H, np.eye(len(monomials)), atol=0.06)


def test_synthetic_X_has_the_power_law_covariance():
    X, eig = get_synthetic_X(d=5, N=200_000, offset=2, alpha=2.0, gen=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(eig.cpu().numpy(), get_powerlaw(5, 2.0, offset=2), rtol=1e-6)
    assert abs(get_powerlaw(5, 2.0, offset=2).sum() - 1) < 1e-12
    np.testing.assert_allclose(np.cov(X.cpu().numpy().T), np.diag(eig.cpu().numpy()), atol=2e-3)


def test_polynomial_target_is_the_hermite_of_the_whitened_coordinate():
    gen = torch.Generator().manual_seed(2)
    X_ref, eig = get_synthetic_X(d=6, N=4000, gen=gen)
    _, lambdas, Vt = torch.linalg.svd(X_ref, full_matrices=False)
    X, y = get_new_polynomial_data(lambdas, Vt, Monomial({1: 2}), dim=6, N=300, data_eigvals=eig, N_original=4000,
                                   gen=gen)
    z = (X @ Vt[1] / lambdas[1] * math.sqrt(4000)).cpu().numpy()  # the whitened coordinate along direction 1
    np.testing.assert_allclose(y, (z ** 2 - 1) / math.sqrt(2), rtol=1e-4, atol=1e-4)
    bfn = polynomial_batch_fn(lambdas, Vt, [Monomial({0: 1}), Monomial({2: 1})], 64, eig, 4000, gen=gen)
    Xb, yb = bfn(0)
    assert Xb.shape == (64, 6) and yb.shape == (64,) and yb.dtype == torch.float32
    Xo, yo = polynomial_batch_fn(lambdas, Vt, Monomial({0: 1}), 8, eig, 4000, X=Xb, y=yb)(5)
    assert torch.equal(Xo, Xb) and torch.equal(yo, yb)  # offline: the given set


def test_monomial_text_and_structure():
    m = Monomial({0: 2, 3: 1, 10: 5})
    assert m.degree() == 8 and m.max_degree() == 5 and Monomial().degree() == 0 and str(Monomial()) == "1"
    assert Monomial.from_repr(str(m)) == m and Monomial.from_repr("$1$") == Monomial()
    assert m.basis_factors() == [Monomial({0: 1})] * 2 + [Monomial({3: 1})] + [Monomial({10: 1})] * 5
    assert Monomial({0: 1}) < m and isinstance(m.copy(), Monomial)
    with pytest.raises(ValueError, match="position"):
        Monomial.from_repr("$y_{1}$")


# --- ReLU NTK level coefficients and the HEA order ----------------------------------------------------------

def _relu_ntk_by_quadrature(t, w_var, b_var, rho):
    """K(t) = w_var (E[relu(u) relu(v)] + s P(u > 0, v > 0)), (u, v) Gaussian with variances q and covariance
    s = b_var + w_var t, integrated over u with v | u Gaussian in closed form."""
    q, s = b_var + w_var * rho, b_var + w_var * t
    cond_sd = math.sqrt(q - s * s / q)
    sd = math.sqrt(q)

    def density(u):
        return stats.norm.pdf(u, scale=sd)

    def e_relu_v(u):  # E[relu(v) | u] for v | u ~ N(s u / q, cond_sd^2)
        m = s * u / q
        return m * stats.norm.cdf(m / cond_sd) + cond_sd * stats.norm.pdf(m / cond_sd)

    relu_relu = integrate.quad(lambda u: u * e_relu_v(u) * density(u), 0, 12 * sd, epsabs=1e-12)[0]
    both_pos = integrate.quad(lambda u: stats.norm.cdf(s * u / q / cond_sd) * density(u), 0, 12 * sd,
                              epsabs=1e-12)[0]
    return w_var * (relu_relu + s * both_pos)


@pytest.mark.parametrize("kwargs", [dict(weight_variance=1.0, bias_variance=1.0), dict(w_var=2.0, b_var=0.5),
                                    dict(kernel_width=2.0)])
def test_level_coefficients_are_the_taylor_coefficients_of_the_integrated_kernel(kwargs):
    eig = get_powerlaw(10, 1.5)
    coeff = get_relu_level_coeff_fn(eig, **kwargs)
    w_var, b_var = kernel_parse_kwargs(kwargs)
    q = b_var + w_var * eig.sum()
    for t in (0.0, -0.15 * q / w_var, 0.2 * q / w_var):
        series = sum(coeff(l) * t ** l / math.factorial(l) for l in range(25))
        assert series == pytest.approx(_relu_ntk_by_quadrature(t, w_var, b_var, eig.sum()), rel=1e-6, abs=1e-9)


def test_hea_monomials_are_the_top_eigenvalues_found_by_brute_force():
    eig = get_powerlaw(6, 1.2, offset=2)
    level = get_relu_level_coeff_fn(eig, weight_variance=1, bias_variance=1)
    values, monomials = generate_hea_monomials(eig, 60, level, kmax=4)
    assert monomials[0] == Monomial() and len({tuple(sorted(m.items())) for m in monomials}) == 60
    for v, m in zip(values, monomials):
        assert v == pytest.approx(compute_hea_eigval(eig, m, level)) and m.degree() <= 4
    everything = []
    for k in range(0, 5):
        for combo in itertools.combinations_with_replacement(range(6), k):
            m = Monomial()
            for i in combo:
                m[i] = m.get(i, 0) + 1
            everything.append(level(k) * np.prod([eig[i] ** e for i, e in m.items()]))
    np.testing.assert_allclose(values, sorted(everything, reverse=True)[:60], rtol=1e-12)
    groups = group_by_deg_max(monomials, stop_at_degree=2)
    assert set(groups) <= {(0, 0), (1, 1), (2, 2), (2, 1)} and all(m.degree() <= 2 for g in groups.values()
                                                                   for _, m in g)


# --- grabs ---------------------------------------------------------------------------------------------------

def test_weight_grabs():
    torch.manual_seed(0)
    m = MLP(d_in=3, width=5)
    W, b = get_Win(m)
    assert torch.equal(W, m.input_layer.weight) and W is not m.input_layer.weight and not W.requires_grad
    assert get_Win(m, detach=False)[0] is m.input_layer.weight and get_Wout(m)[0].shape == (1, 5)
    G = get_W_gram(W)
    torch.testing.assert_close(G, W.T @ W) and torch.testing.assert_close(get_W_gram(W, False), W @ W.T)
    assert get_W_trace(G) == pytest.approx(float((W ** 2).sum()))
    assert get_W_ii(G, i=1) == pytest.approx(float((W[:, 1] ** 2).sum()))
    assert get_W_ii(G, monomial=Monomial({2: 1, 0: 3})) == pytest.approx([G[0, 0].item(), G[2, 2].item()])


def test_empirical_ntk_matches_torch_func_jacobians():
    torch.manual_seed(0)
    m = MLP(d_in=4, width=16, depth=2)
    mup.parameterize(m, "mup", torch.optim.SGD, 0.1)  # multipliers live in hooks: they count too
    X = torch.randn(7, 4)
    params = {k: v.detach() for k, v in m.named_parameters()}
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(m, p, (X,)).squeeze(-1))(params)
    want = sum(j.reshape(7, -1) @ j.reshape(7, -1).T for j in jac.values())
    K = empirical_ntk(m, X)
    assert isinstance(K, np.ndarray) and K.shape == (7, 7)
    np.testing.assert_allclose(K, want.cpu().numpy(), rtol=1e-4, atol=1e-6)
    assert empirical_ntk_trace(m, X) == pytest.approx(float(np.trace(want.cpu().numpy())), rel=1e-4)


# --- datasets ------------------------------------------------------------------------------------------------

def test_binarized_dataset_reads_datasetpath(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    (tmp_path / "svhn").mkdir()
    labels = np.repeat(np.arange(10), 6)
    np.savez(tmp_path / "svhn" / "svhn_all.npz", X=rng.integers(0, 256, (60, 3, 4, 4)), y=labels)
    monkeypatch.setenv("DATASETPATH", str(tmp_path))
    X, y = get_binarized_dataset("svhn", [[1], [2, 3]], 8)
    assert X.shape == (8, 3, 4, 4) and 0 <= X.min() and X.max() <= 1
    assert sorted(y.tolist()) == [-1] * 4 + [1] * 4
    with pytest.raises(ValueError, match="only"):
        get_binarized_dataset("svhn", [[1], [2]], 20)
    with pytest.raises(ValueError, match="mnist"):
        get_binarized_dataset("mnist", None, 4)


def test_preprocess_and_powerlaw_target():
    X = torch.rand(10, 3, 4, 4)
    flat = preprocess(X.clone(), grayscale=True, center=True, normalize=True)
    assert flat.shape == (10, 16)
    torch.testing.assert_close(torch.linalg.norm(flat, dim=1), torch.ones(10))
    assert preprocess(X.clone()).shape == (10, 48)
    zca = preprocess(X.clone(), zca_strength=10.0)
    s = torch.linalg.svdvals(zca)
    assert s[0] / s[5] < torch.linalg.svdvals(X.flatten(1))[0] / torch.linalg.svdvals(X.flatten(1))[5]
    H = np.random.default_rng(0).standard_normal((50, 8))
    y = get_powerlaw_target(H, 1.5)
    assert y.shape == (50,) and np.linalg.norm(y) == pytest.approx(math.sqrt(50))
    with pytest.raises(ValueError, match="source_exp"):
        get_powerlaw_target(H, 0.5)
