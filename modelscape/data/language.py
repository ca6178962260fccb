"""A synthetic language for small GPTs: sequences from a random sparse Markov chain, made in the package.

The next token depends on the ``order`` tokens before it: each of the ``vocab_size**order`` contexts allows
``branching`` successor tokens, drawn at random, with random probabilities (a flat Dirichlet). A model must
look back ``order`` positions to predict well, so attention has work to do, and the best achievable loss is
the chain's entropy rate (``markov_entropy_rate``), well above zero. The chain is fixed by ``chain_seed``, the
same for every trial and job; sequences are drawn from the job's generator.

    from modelscape.data import markov_bfn
    global_config.update(MODEL="GPT", LOSS="cross_entropy", vocab_size=32, seq_len=32)
    bfn_config = dict(base_bfn=markov_bfn)

``vocab_size`` and ``seq_len`` are config keys that both ``markov_bfn`` and ``modelscape.models.GPT`` name,
so model and data agree.
"""
from __future__ import annotations

import functools

import torch

from modelscape.data.synthetic import fixed_bfn
from modelscape.models import SEQ_LEN, VOCAB_SIZE  # the GPT's defaults: model and data agree

__all__ = ["markov_chain", "markov_entropy_rate", "markov_bfn", "VOCAB_SIZE", "SEQ_LEN"]


@functools.lru_cache(maxsize=8)
def markov_chain(vocab_size: int = VOCAB_SIZE, order: int = 2, branching: int = 4, chain_seed: int = 0):
    """``(successors, probs)``, each of shape ``(vocab_size**order, branching)``: the tokens that may follow
    each context (context index = sum of ``token_i * vocab_size**i``, oldest token first) and their
    probabilities."""
    for name, value, low in (("vocab_size", vocab_size, 2), ("order", order, 1), ("branching", branching, 1)):
        if int(value) != value or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if branching > vocab_size:
        raise ValueError(f"branching={branching} is larger than vocab_size={vocab_size}")
    if vocab_size ** order > 2 ** 20:
        raise ValueError(f"vocab_size**order = {vocab_size ** order} contexts is too many for a table; lower "
                         "vocab_size or order")
    g = torch.Generator().manual_seed(chain_seed)
    n_ctx = vocab_size ** order
    successors = torch.rand(n_ctx, vocab_size, generator=g).argsort(dim=1)[:, :branching]
    weights = -torch.rand(n_ctx, branching, generator=g).log()  # Dirichlet(1, ..., 1) after normalising
    return successors, weights / weights.sum(dim=1, keepdim=True)


def markov_entropy_rate(vocab_size: int = VOCAB_SIZE, order: int = 2, branching: int = 4, chain_seed: int = 0,
                        iters: int = 200) -> float:
    """The chain's entropy rate in nats per token: the lowest cross-entropy a model of the language can reach
    (context distribution from ``iters`` steps of power iteration from uniform, as the sequences start)."""
    successors, probs = markov_chain(vocab_size, order, branching, chain_seed)
    n_ctx = vocab_size ** order
    # A context (t_1 .. t_k) followed by s becomes (t_2 .. t_k, s): drop the oldest digit, append s.
    nxt = (torch.arange(n_ctx).unsqueeze(1) // vocab_size) + successors * vocab_size ** (order - 1)
    pi = torch.full((n_ctx,), 1.0 / n_ctx, dtype=torch.float64)
    p64 = probs.double()
    for _ in range(iters):
        pi = torch.zeros_like(pi).index_add_(0, nxt.flatten(), (pi.unsqueeze(1) * p64).flatten())
    h = -(p64 * p64.clamp_min(1e-300).log()).sum(dim=1)
    return float((pi * h).sum())


def markov_bfn(bsz, gen=None, X=None, y=None, vocab_size=VOCAB_SIZE, seq_len=SEQ_LEN, order=2, branching=4,
               chain_seed=0, **kwargs):
    """Base batch function: ``batch_fn(step) -> (X, y)``, token ids of shape ``(bsz, seq_len)`` and their
    next tokens ``y`` (the sequence shifted by one), for ``LOSS='cross_entropy'``.

    Each sequence starts from ``order`` uniform random tokens and follows the chain (``markov_chain``).
    Online (``X`` is None): every call draws ``bsz`` fresh sequences from ``gen``. Offline (``X``, ``y``
    given): every step returns that fixed training set.
    """
    if X is not None and y is not None:
        return fixed_bfn(X, y)
    if int(seq_len) != seq_len or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    device = gen.device if gen is not None else torch.device("cpu")
    successors, probs = (t.to(device) for t in markov_chain(vocab_size, order, branching, chain_seed))
    place = vocab_size ** torch.arange(order, device=device)  # weight of each context position

    def batch_fn(step):
        seq = torch.empty(bsz, order + seq_len, dtype=torch.long, device=device)
        seq[:, :order] = torch.randint(0, vocab_size, (bsz, order), generator=gen, device=device)
        for t in range(order, order + seq_len):
            ctx = (seq[:, t - order:t] * place).sum(dim=1)
            pick = torch.multinomial(probs[ctx], 1, generator=gen).squeeze(1)
            seq[:, t] = successors[ctx, pick]
        # The model sees the last seq_len + 1 tokens: inputs are all but the last, targets all but the first.
        window = seq[:, order - 1:]
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()

    return batch_fn
