"""Ready models (MLP, CNN, Transformer, GPT), each built from WIDTH and DEPTH, and the centering wrapper.

Every weight lives in an ``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding`` or ``nn.LayerNorm``, every ReLU is an
``nn.ReLU`` module, and each model names its read-in and read-out (``input_layer``, ``output_layer``), so the
parameterizations in ``modelscape.mup`` can find and classify them.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP", "CNN", "SelfAttention", "TransformerBlock", "Transformer", "GPTBlock", "GPT", "Centered",
           "BUILTIN_MODELS", "make_nonlinearity", "VOCAB_SIZE", "SEQ_LEN"]

_NONLINS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU, "identity": nn.Identity,
            "linear": nn.Identity, "sigmoid": nn.Sigmoid}


# The GPT's vocabulary and longest sequence by default; modelscape.data.markov_bfn takes the same, so that model
# and data agree when the config sets neither.
VOCAB_SIZE = 32
SEQ_LEN = 32


def make_nonlinearity(nonlinearity) -> nn.Module:
    """A name (relu, tanh, gelu, silu, identity), an nn.Module instance or class -> nn.Module."""
    if nonlinearity is None:
        return nn.ReLU()
    if isinstance(nonlinearity, nn.Module):
        return nonlinearity
    if isinstance(nonlinearity, type) and issubclass(nonlinearity, nn.Module):
        return nonlinearity()
    try:
        return _NONLINS[str(nonlinearity).lower()]()
    except KeyError:
        raise ValueError(f"unknown nonlinearity {nonlinearity!r}; use one of {sorted(_NONLINS)} "
                         "or pass an nn.Module") from None


class MLP(nn.Module):
    """``depth`` hidden layers of ``width`` units: d_in -> width (x depth) -> d_out."""

    def __init__(self, d_in=1, width=4096, depth=2, d_out=1, bias=True, nonlinearity=None):
        super().__init__()
        if depth < 1:
            raise ValueError(f"MLP depth must be >= 1, got {depth}")
        self.d_in, self.width, self.depth, self.d_out = d_in, width, depth, d_out
        self.input_layer = nn.Linear(d_in, width, bias)
        self.hidden_layers = nn.ModuleList([nn.Linear(width, width, bias) for _ in range(depth - 1)])
        self.output_layer = nn.Linear(width, d_out, bias)
        self.nonlin = make_nonlinearity(nonlinearity)

    def forward(self, x):
        h = self.nonlin(self.input_layer(x.flatten(1)))
        for layer in self.hidden_layers:
            h = self.nonlin(layer(h))
        return self.output_layer(h)


class CNN(nn.Module):
    """``depth`` 3x3 conv layers of ``width`` channels on (N, C, H, W) images, global average pool, linear out."""

    def __init__(self, in_channels=1, width=16, depth=2, d_out=1, bias=True, nonlinearity=None):
        super().__init__()
        if depth < 1:
            raise ValueError(f"CNN depth must be >= 1, got {depth}")
        self.width, self.depth, self.d_out = width, depth, d_out
        self.input_layer = nn.Conv2d(in_channels, width, 3, padding=1, bias=bias)
        self.hidden_layers = nn.ModuleList([nn.Conv2d(width, width, 3, padding=1, bias=bias)
                                            for _ in range(depth - 1)])
        self.output_layer = nn.Linear(width, d_out, bias)
        self.nonlin = make_nonlinearity(nonlinearity)

    def forward(self, x):
        h = self.nonlin(self.input_layer(x))
        for layer in self.hidden_layers:
            h = self.nonlin(layer(h))
        return self.output_layer(h.mean(dim=(2, 3)))


class SelfAttention(nn.Module):
    """Multi-head self-attention from Linear layers (``causal``: each position sees itself and the past).

    The logits ``q.k`` are multiplied by ``attn_mult * attn_scale``: ``attn_scale`` is the parameterization's
    (1/sqrt(d_head) as built; ``modelscape.mup`` sets 1/d_head under muP), ``attn_mult`` the user's tunable
    multiplier (config ATTN_MULT), which parameterize never touches."""

    def __init__(self, width, n_heads=1, bias=True, causal=False, attn_mult=1.0):
        super().__init__()
        if width % n_heads:
            raise ValueError(f"width {width} is not divisible by n_heads {n_heads}")
        self.n_heads, self.d_head, self.causal = n_heads, width // n_heads, causal
        self.q = nn.Linear(width, width, bias)
        self.k = nn.Linear(width, width, bias)
        self.v = nn.Linear(width, width, bias)
        self.proj = nn.Linear(width, width, bias)
        self.attn_scale = 1.0 / math.sqrt(self.d_head)
        self.attn_mult = float(attn_mult)

    def __setstate__(self, state):
        # pickled by 0.3, whose attn_mult was the whole scale: keep its numbers
        state.setdefault("attn_scale", 1.0)
        super().__setstate__(state)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (m(x).view(b, t, self.n_heads, self.d_head).transpose(1, 2) for m in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, scale=self.attn_mult * self.attn_scale)
        return self.proj(h.transpose(1, 2).reshape(b, t, -1))


class TransformerBlock(nn.Module):
    """Residual attention then MLP, without LayerNorm (``GPTBlock`` is the pre-LayerNorm block)."""

    residual_branches = ("attn.proj", "fc2")  # what each branch adds to the stream ends in (DEPTH_ALPHA)

    def __init__(self, width, n_heads=1, mlp_mult=2, bias=True, nonlinearity=None, attn_mult=1.0):
        super().__init__()
        self.attn = SelfAttention(width, n_heads, bias, attn_mult=attn_mult)
        self.fc1 = nn.Linear(width, mlp_mult * width, bias)
        self.fc2 = nn.Linear(mlp_mult * width, width, bias)
        self.nonlin = make_nonlinearity(nonlinearity)

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.fc2(self.nonlin(self.fc1(x)))


class Transformer(nn.Module):
    """A small transformer on (N, T, d_in) sequences: embed, ``depth`` blocks, mean-pool over T, read out."""

    def __init__(self, d_in=8, width=32, depth=2, d_out=1, n_heads=1, mlp_mult=2, bias=True, nonlinearity=None,
                 attn_mult=1.0):
        super().__init__()
        if depth < 1:
            raise ValueError(f"Transformer depth must be >= 1, got {depth}")
        self.width, self.depth, self.d_out = width, depth, d_out
        self.input_layer = nn.Linear(d_in, width, bias)
        self.blocks = nn.ModuleList([TransformerBlock(width, n_heads, mlp_mult, bias, nonlinearity, attn_mult)
                                     for _ in range(depth)])
        self.output_layer = nn.Linear(width, d_out, bias)

    def forward(self, x):
        if x.ndim != 3:
            raise ValueError(f"Transformer expects sequences of shape (N, T, d_in), got input of shape "
                             f"{tuple(x.shape)}; for flat (N, d) data use MLP or reshape to (N, T, d/T)")
        h = self.input_layer(x)
        for block in self.blocks:
            h = block(h)
        return self.output_layer(h.mean(dim=1))


class GPTBlock(nn.Module):
    """Pre-LayerNorm block: ``x + attn(ln1(x))``, then ``x + fc2(nonlin(fc1(ln2(x))))``."""

    residual_branches = ("attn.proj", "fc2")  # what each branch adds to the stream ends in (DEPTH_ALPHA)

    def __init__(self, width, n_heads=4, mlp_mult=4, bias=True, nonlinearity="gelu", attn_mult=1.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(width, bias=bias)
        self.attn = SelfAttention(width, n_heads, bias, causal=True, attn_mult=attn_mult)
        self.ln2 = nn.LayerNorm(width, bias=bias)
        self.fc1 = nn.Linear(width, mlp_mult * width, bias)
        self.fc2 = nn.Linear(mlp_mult * width, width, bias)
        self.nonlin = make_nonlinearity(nonlinearity)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(self.nonlin(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    """A decoder-only transformer: tokens (N, T) -> next-token logits (N, T, vocab_size).

    Token embedding (``input_layer``) plus position embedding, ``depth`` pre-LayerNorm blocks of causal
    attention (``n_heads`` heads of width / n_heads; the 1/d_head scale under the mup family) and an MLP of
    ``mlp_mult * width``, a final LayerNorm, and the read-out (``output_layer``). ``vocab_size`` and
    ``seq_len`` (the longest sequence it takes) come from the config keys of those names, which
    ``modelscape.data.markov_bfn`` reads too, so model and data agree. With ``LOSS='cross_entropy'`` the
    trainloop puts the classes where ``nn.CrossEntropyLoss`` wants them. ``tie_weights``: the read-out shares
    the token embedding's weight (muP gives the read-out its own multiplier). ``attn_mult``: the attention
    logits' tunable multiplier (config ATTN_MULT).
    """

    def __init__(self, vocab_size=VOCAB_SIZE, seq_len=SEQ_LEN, width=64, depth=2, n_heads=4, mlp_mult=4,
                 bias=True, nonlinearity="gelu", attn_mult=1.0, tie_weights=False):
        super().__init__()
        if depth < 1:
            raise ValueError(f"GPT depth must be >= 1, got {depth}")
        self.vocab_size, self.seq_len, self.width, self.depth = vocab_size, seq_len, width, depth
        self.input_layer = nn.Embedding(vocab_size, width)  # token embedding: the read-in
        self.pos_emb = nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList([GPTBlock(width, n_heads, mlp_mult, bias, nonlinearity, attn_mult)
                                     for _ in range(depth)])
        self.ln_f = nn.LayerNorm(width, bias=bias)
        self.output_layer = nn.Linear(width, vocab_size, bias)
        if tie_weights:
            self.output_layer.weight = self.input_layer.weight

    def forward(self, x):
        if x.ndim != 2 or x.dtype.is_floating_point:
            raise ValueError(f"GPT expects token ids of shape (N, T), got {x.dtype} input of shape "
                             f"{tuple(x.shape)}")
        t = x.shape[1]
        if t > self.seq_len:
            raise ValueError(f"sequence of length {t} is longer than the GPT's seq_len={self.seq_len}")
        h = self.input_layer(x) + self.pos_emb(torch.arange(t, device=x.device))
        for block in self.blocks:
            h = block(h)
        return self.output_layer(self.ln_f(h))


BUILTIN_MODELS = {"MLP": MLP, "CNN": CNN, "Transformer": Transformer, "GPT": GPT}


class Centered(nn.Module):
    """``f(x) - f0(x)`` where ``f0`` is a frozen copy of ``model`` taken now (so the output is 0 at init).

    ``f0`` is deterministic, so its output on a tensor that is passed again (offline: the fixed training and
    test sets) is computed once and cached; the cache holds the tensor itself so its identity stays valid.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.baseline = copy.deepcopy(model)
        for p in self.baseline.parameters():
            p.requires_grad_(False)
        self.baseline.eval()
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] = []

    def remember(self, x: torch.Tensor) -> None:
        """Cache ``f0(x)`` for a tensor that will be passed again and again."""
        if not any(x is cx for cx, _ in self._cache):
            with torch.no_grad():
                self._cache.append((x, self.baseline(x)))

    def offset(self, x):
        for cx, y0 in self._cache:
            if x is cx:
                return y0
        with torch.no_grad():
            return self.baseline(x)

    def forward(self, x):
        return self.model(x) - self.offset(x)
