"""Monomials over data dimensions and their Hermite-eigenstructure (HEA) eigenvalues (the original's
``modelscape.data.monomial``).

A ``Monomial`` ``{i: k, ...}`` stands for the product over ``i`` of the normalised probabilists' Hermite
polynomial ``He_k(x_i) / sqrt(k!)`` of the whitened coordinate ``x_i``. For a dot-product kernel
``K(x.x')`` on Gaussian data with covariance eigenvalues ``lambda_i``, the HEA predicts the kernel's
eigenvalue for that eigenfunction as ``K^(deg)(0) * prod_i lambda_i**k_i``, where ``K^(l)(0)`` is the
kernel's l-th "level coefficient" (``modelscape.data.ntk_coeffs``).
"""
from __future__ import annotations

import heapq

import numpy as np

from modelscape.backend.utils import ensure_numpy


class Monomial(dict):
    """``{dimension index: exponent}``; ``Monomial({})`` is the constant 1. Ordered (``<``) by degree."""

    def __lt__(self, other):
        if not isinstance(other, Monomial):
            return NotImplemented
        return self.degree() < other.degree()

    def degree(self) -> int:
        """The total degree (sum of the exponents)."""
        return int(sum(self.values()))

    def max_degree(self) -> int:
        """The largest single exponent (0 for the constant)."""
        return int(max(self.values(), default=0))

    def copy(self) -> "Monomial":
        return Monomial(self)

    def __str__(self) -> str:
        if self.degree() == 0:
            return "1"
        parts = [f"x_{{{i}}}" + (f"^{k}" if k > 1 else "") for i, k in self.items()]
        return "$" + "".join(parts) + "$"

    __repr__ = __str__

    @classmethod
    def from_repr(cls, s: str) -> "Monomial":
        """Parse what ``str`` writes (``'$x_{0}^2x_{3}$'``, ``'1'``) back into a Monomial."""
        if not isinstance(s, str):
            raise TypeError(f"from_repr expects a string, got {type(s).__name__}")
        text = s.strip().strip("$").replace(" ", "")
        out = cls()
        if text in ("", "1"):
            return out
        pos = 0

        def number():
            nonlocal pos
            start = pos
            while pos < len(text) and text[pos].isdigit():
                pos += 1
            if start == pos:
                raise ValueError(f"expected digits at position {start} of {s!r}")
            return int(text[start:pos])

        while pos < len(text):
            if not text.startswith("x_{", pos):
                raise ValueError(f"expected 'x_{{' at position {pos} of {s!r}")
            pos += 3
            idx = number()
            if pos >= len(text) or text[pos] != "}":
                raise ValueError(f"expected '}}' at position {pos} of {s!r}")
            pos += 1
            exp = 1
            if pos < len(text) and text[pos] == "^":
                pos += 1
                exp = number()
            out[idx] = out.get(idx, 0) + exp
        return out

    def basis(self, canonical: bool = True) -> dict:
        """``{index: exponent}`` as plain ints (sorted by index if ``canonical``)."""
        items = sorted(self.items()) if canonical else self.items()
        return {int(i): int(k) for i, k in items if k}

    def basis_factors(self, include_one: bool = False, canonical: bool = True) -> list:
        """Degree-one Monomials whose product is this one (``{0: 2, 3: 1}`` -> ``[x0, x0, x3]``); the
        constant gives ``[]``, or ``[Monomial({})]`` with ``include_one``."""
        if self.degree() == 0:
            return [Monomial()] if include_one else []
        return [Monomial({i: 1}) for i, k in self.basis(canonical).items() for _ in range(k)]


def compute_hea_eigval(data_eigvals, monomial: Monomial, eval_level_coeff) -> float:
    """``eval_level_coeff(degree) * prod_i data_eigvals[i] ** k_i``."""
    value = eval_level_coeff(monomial.degree())
    for i, k in monomial.items():
        value *= data_eigvals[int(i)] ** k
    return value


def generate_hea_monomials(data_eigvals, num_monomials, eval_level_coeff, kmax=10, **kwargs):
    """The ``num_monomials`` monomials of largest HEA eigenvalue (degree <= ``kmax``), largest first.

    ``data_eigvals`` must be sorted in decreasing order (as a power-law spectrum is). Returns
    ``(hea_eigvals, monomials)``: a numpy array and a list of ``Monomial``, the constant first. Extra keyword
    arguments are ignored (the original's callers pass dataset settings along).

    Search: within one degree, moving one unit of exponent from dimension i to i + 1 never increases the
    eigenvalue, so a best-first search from ``{0: k}`` (k = 1..kmax) along such moves visits monomials in
    decreasing order of eigenvalue.
    """
    try:
        num_monomials = abs(int(num_monomials))
    except (TypeError, ValueError):
        raise ValueError(f"num_monomials must be an int, got {num_monomials!r}") from None
    if num_monomials < 1:
        raise ValueError("num_monomials must be >= 1")
    eig = ensure_numpy(data_eigvals)
    d = len(eig)

    def key(m):
        return tuple(sorted(m.items()))

    monomials = [Monomial()]
    values = [compute_hea_eigval(eig, Monomial(), eval_level_coeff)]
    heap, queued, counter = [], set(), 0  # the counter breaks ties without comparing monomials
    for k in range(1, kmax + 1):
        m = Monomial({0: k})
        heapq.heappush(heap, (-compute_hea_eigval(eig, m, eval_level_coeff), counter, m))
        queued.add(key(m))
        counter += 1
    while len(monomials) < num_monomials and heap:
        neg, _, m = heapq.heappop(heap)
        monomials.append(m)
        values.append(-neg)
        for i in list(m):
            if i + 1 >= d:
                continue
            nxt = m.copy()
            nxt[i] -= 1
            if nxt[i] == 0:
                del nxt[i]
            nxt[i + 1] = nxt.get(i + 1, 0) + 1
            if key(nxt) not in queued:
                queued.add(key(nxt))
                heapq.heappush(heap, (-compute_hea_eigval(eig, nxt, eval_level_coeff), counter, nxt))
                counter += 1
    if len(monomials) < num_monomials:
        print(f"Warning: only {len(monomials)} monomials of degree <= {kmax} exist over {d} dimensions; "
              f"{num_monomials} were asked for.")
    return np.array(values), monomials


def group_by_deg_max(monomials, stop_at_degree=None, assume_sorted=False) -> dict:
    """``{(degree, max exponent): [(index, monomial), ...]}``, skipping degrees above ``stop_at_degree``
    (stopping at the first one if ``assume_sorted``, i.e. the list is in increasing degree)."""
    groups: dict = {}
    for i, m in enumerate(monomials):
        if stop_at_degree is not None and m.degree() > stop_at_degree:
            if assume_sorted:
                break
            continue
        groups.setdefault((m.degree(), m.max_degree()), []).append((i, m))
    return groups


__all__ = ["Monomial", "compute_hea_eigval", "generate_hea_monomials", "group_by_deg_max"]
