"""The original modelscape's model module: ``MLP``, ``SimpleCNN``, ``SimpleTransformer`` and the centering
wrapper under their original names, signatures and attribute names.

They are built from the classes in ``modelscape.models`` where the two agree, so muP (``modelscape.mup``)
classifies their layers the same way; where the original's architecture differs (``SimpleCNN`` flattens
instead of pooling, ``SimpleTransformer`` has no residual connections) the difference is kept, so a result
obtained with the original is reproduced by the class of the same name here.
"""
from __future__ import annotations

import torch
from torch import nn

from modelscape import models
from modelscape.models import SelfAttention


class MLP(models.MLP):
    """``d_in -> width -> ... -> d_out`` with ``depth`` hidden layers: ``input_layer``, ``depth - 1``
    ``hidden_layers`` and ``output_layer``. ``forcezeros`` zeroes the read-out at init (output 0)."""

    def __init__(self, d_in=1, width=4096, depth=2, d_out=1, bias=True, nonlinearity=None, forcezeros=False):
        super().__init__(d_in=d_in, width=width, depth=depth, d_out=d_out, bias=bias, nonlinearity=nonlinearity)
        if forcezeros:
            with torch.no_grad():
                self.output_layer.weight.zero_()
                if self.output_layer.bias is not None:
                    self.output_layer.bias.zero_()

    def get_activations(self, x):
        """``(hidden, out)``: the post-nonlinearity activations of every hidden layer (a list, first layer
        first) and the model's output, from one forward pass."""
        hidden = []
        h = x.flatten(1)
        for layer in [self.input_layer, *self.hidden_layers]:
            h = self.nonlin(layer(h))
            hidden.append(h)
        return hidden, self.output_layer(h)


class SimpleCNN(models.CNN):
    """3x3 convolutions of ``width`` channels on ``(N, in_channels, img_size, img_size)`` images; unlike
    ``modelscape.models.CNN`` the last feature map is flattened (not pooled) into the linear read-out, as in
    the original, so ``img_size`` must match the images."""

    def __init__(self, in_channels=1, img_size=8, width=16, depth=2, d_out=1, bias=True):
        if depth < 2:
            raise ValueError(f"SimpleCNN depth must be >= 2, got {depth}")
        super().__init__(in_channels=in_channels, width=width, depth=depth, d_out=d_out, bias=bias)
        self.in_channels, self.img_size = in_channels, img_size
        # same slot in the module order as the pooled read-out it replaces: muP still finds it last
        self.output_layer = nn.Linear(width * img_size * img_size, d_out, bias)

    def forward(self, x):
        h = self.nonlin(self.input_layer(x))
        for layer in self.hidden_layers:
            h = self.nonlin(layer(h))
        return self.output_layer(h.flatten(1))


class SimpleTransformerBlock(nn.Module):
    """The original's block: a ReLU MLP (``width -> mlp_mult * width -> width``) then single-head
    self-attention, with no residual connection and no normalisation."""

    def __init__(self, d_model, mlp_mult=4, bias=True):
        super().__init__()
        self.fc1 = nn.Linear(d_model, mlp_mult * d_model, bias)
        self.fc2 = nn.Linear(mlp_mult * d_model, d_model, bias)
        self.nonlin = nn.ReLU()
        self.attn = SelfAttention(d_model, n_heads=1, bias=bias)

    def forward(self, x):
        return self.attn(self.fc2(self.nonlin(self.fc1(x))))


class SimpleTransformer(nn.Module):
    """The original's small transformer on ``(N, T, d_in)``: linear embedding, ``depth`` blocks, mean over
    T, linear read-out. ``seq_len`` is accepted for the original's configs and not needed."""

    def __init__(self, d_in=8, width=16, depth=2, d_out=1, mlp_mult=4, bias=True, seq_len=None):
        super().__init__()
        if depth < 1:
            raise ValueError(f"SimpleTransformer depth must be >= 1, got {depth}")
        self.d_in, self.width, self.depth, self.d_out, self.seq_len = d_in, width, depth, d_out, seq_len
        self.input_layer = nn.Linear(d_in, width, bias)
        self.hidden_layers = nn.ModuleList([SimpleTransformerBlock(width, mlp_mult, bias) for _ in range(depth)])
        self.output_layer = nn.Linear(width, d_out, bias)

    def forward(self, x):
        h = self.input_layer(x)
        for block in self.hidden_layers:
            h = block(h)
        return self.output_layer(h.mean(dim=1))


class CenteredWrapper(models.Centered):
    """``forward(x) = model(x) - baseline(x)`` with ``baseline`` a frozen copy of ``model`` taken at wrap
    time (the original's name for ``modelscape.models.Centered``). ``baseline_dtype`` keeps the baseline in
    another dtype (e.g. bfloat16 to save memory); ``recenter()`` re-snapshots the current weights."""

    def __init__(self, model: nn.Module, baseline_dtype=None):
        super().__init__(model)
        self._baseline_dtype = baseline_dtype
        if baseline_dtype is not None:
            self.baseline.to(dtype=baseline_dtype)

    @torch.no_grad()
    def recenter(self):
        """Make the current weights the new baseline (the output is 0 again)."""
        self.baseline.load_state_dict(self.model.state_dict())
        if self._baseline_dtype is not None:
            self.baseline.to(dtype=self._baseline_dtype)
        self._cache.clear()

    def remember(self, x):
        if self._baseline_dtype is None:
            super().remember(x)
        # in another dtype the baseline is recomputed each call: a low-precision copy exists to save memory

    def offset(self, x):
        if self._baseline_dtype is None:
            return super().offset(x)
        with torch.no_grad():
            return self.baseline(x.to(self._baseline_dtype)).to(x.dtype)


def centeredmodel(model: nn.Module, baseline_dtype=None) -> CenteredWrapper:
    """Wrap ``model`` so that its output is 0 at init (see ``CenteredWrapper``)."""
    return CenteredWrapper(model, baseline_dtype=baseline_dtype)


__all__ = ["MLP", "SimpleCNN", "SimpleTransformer", "SimpleTransformerBlock", "CenteredWrapper", "centeredmodel"]
