"""Per-layer diagnostics of feature learning, as a grab: the spectral condition and the alignment of updates.

Whether a network learns features at a given width can be read off its weights (Yang, Simon and Bernstein 2023,
"A spectral condition for feature learning"): for every layer, the spectral norm of the weight and of its change
should scale like ``sqrt(fan_out / fan_in)``; and off how updates meet the layer's inputs (Everett et al. 2024):
an update aligned with the incoming activations moves the output by ``||dW||_* ||x||``, a random one by a
``1/sqrt(fan_in)`` fraction of that. ``LayerDiagnostics`` measures, per weight layer (Linear, Conv, Embedding; the
effective weight, muP multiplier and GAMMA included), along the curve:

- ``spectral_norm``: ``||W||_*``; ``spectral_ratio``: that over ``sqrt(fan_out / fan_in)``;
- ``delta_spectral_norm``: ``||W - W_0||_*`` (the change since initialisation); ``delta_ratio``: that over
  ``sqrt(fan_out / fan_in)``;
- ``relative_update``: ``||W_t - W_s||_F / (||W_s||_F (t - s))``, the relative change per step since the previous
  evaluation (step ``s``); NaN at the first;
- ``alignment``: the mean over a batch of the layer's inputs ``x`` of ``||(W - W_0) x|| / (||W - W_0||_* ||x||)``:
  1 when the change is aligned with the inputs, about ``1/sqrt(fan_in)`` when it is not (Linear layers; NaN for
  the others and at step 0).

Spectral norms come from power iteration, warm-started from the previous evaluation's singular vector (a few
matrix-vector products per layer, no SVD), so the grab is cheap enough for every evaluation
(``benchmarks/bench_diagnostics.py``). The values come back labelled (``utils.Labelled``): in the results,
``grab_<name>`` has dimensions ``layer`` (module paths) and ``measure``. The grab neither draws from nor changes
the job's random state, and leaves the model's modes and statistics as they were.

    from modelscape.diagnostics import LayerDiagnostics
    global_config["otherreturns"] = {"layers": LayerDiagnostics()}
"""
from __future__ import annotations

import math
import weakref

import numpy as np
import torch
from torch import nn

from modelscape.mup.rules import EMBEDDINGS, WEIGHT_LAYERS
from modelscape.utils import Labelled

__all__ = ["LayerDiagnostics", "MEASURES", "spectral_norm"]

MEASURES = ("spectral_norm", "spectral_ratio", "delta_spectral_norm", "delta_ratio", "relative_update", "alignment")


def spectral_norm(W: torch.Tensor, v: torch.Tensor, iters: int) -> tuple[float, torch.Tensor]:
    """``(||W||_*, v)``: the largest singular value of the matrix ``W`` by ``iters`` power iterations on
    ``W^T W`` from ``v`` (``W.shape[1]`` entries), and the right singular vector reached (to start the next
    call from)."""
    for _ in range(max(1, iters)):
        w = W.T @ (W @ v)
        n = torch.linalg.vector_norm(w)
        if n == 0:  # W is zero (no change yet) or v is in its null space: keep v to start from next time
            return float(torch.linalg.vector_norm(W @ v)), v
        v = w / n
    return float(torch.linalg.vector_norm(W @ v)), v


def _layers(model: nn.Module) -> list:
    return [(path, m) for path, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS + EMBEDDINGS)]


def _effective(module: nn.Module) -> tuple[torch.Tensor, int, int]:
    """The layer's effective weight as a ``(fan_out, fan_in)`` matrix (multiplier and GAMMA applied), with the
    fans muP uses (an embedding reads a one-hot input: fan-in 1)."""
    scale = float(getattr(module, "_mup_mult", 1.0)) / float(getattr(module, "_mup_gamma", 1.0))
    W = module.weight.detach()
    if isinstance(module, EMBEDDINGS):
        return W.T * scale, int(W.shape[1]), 1
    W = W.reshape(W.shape[0], -1)
    return W * scale, int(W.shape[0]), int(W.shape[1])


class LayerDiagnostics:
    """A grab returning ``MEASURES`` for every weight layer of the model, as a ``Labelled`` array ``(layer,
    measure)`` (see the module's docstring).

    ``iters``: power iterations per evaluation once warm; ``first_iters``: at a layer's first evaluation (a
    random start); ``max_samples``: inputs used for the alignment (the first rows of the batch); ``seed``: of
    the random starts (a private generator: the job's random numbers are untouched). One instance serves any
    number of jobs: it keeps each model's initial weights and singular vectors, keyed weakly by the model.
    """

    def __init__(self, iters: int = 4, first_iters: int = 30, max_samples: int = 256, seed: int = 0):
        self.iters, self.first_iters, self.max_samples, self.seed = iters, first_iters, max_samples, seed
        self._state = weakref.WeakKeyDictionary()

    def __getstate__(self):
        # shipped to worker processes: the settings travel, the per-model state (tensors, weak keys) does not
        return {k: v for k, v in self.__dict__.items() if k != "_state"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._state = weakref.WeakKeyDictionary()

    def __call__(self, model, X_tr=None, X_te=None, step=0, **kwargs) -> Labelled:
        state = self._state.get(model)
        if state is None:
            state = self._state[model] = {"init": {}, "prev": {}, "v": {}, "dv": {}}
        layers = _layers(model)
        inputs = self._inputs(model, layers, X_tr if X_tr is not None else X_te)
        rows = []
        for path, module in layers:
            W, fan_out, fan_in = _effective(module)
            first = path not in state["init"]
            if first:
                state["init"][path] = W.clone()
            target = math.sqrt(fan_out / fan_in)
            sigma, state["v"][path] = spectral_norm(W, self._start(state["v"], path, W), self._iters(first))
            D = W - state["init"][path]
            dsigma, state["dv"][path] = spectral_norm(D, self._start(state["dv"], path, W), self._iters(first))
            rel = math.nan
            prev = state["prev"].get(path)
            if prev is not None and step > prev[1]:
                base = float(torch.linalg.vector_norm(prev[0]))
                rel = float(torch.linalg.vector_norm(W - prev[0])) / (base * (step - prev[1])) if base else math.nan
            state["prev"][path] = (W.clone(), step)
            align = math.nan
            x = inputs.get(path)
            if x is not None and dsigma > 0:
                x = x.reshape(-1, x.shape[-1]).to(D.dtype)
                norms = torch.linalg.vector_norm(x, dim=1)
                keep = norms > 0
                if keep.any():
                    align = float((torch.linalg.vector_norm(x[keep] @ D.T, dim=1) / (dsigma * norms[keep])).mean())
            rows.append([sigma, sigma / target, dsigma, dsigma / target, rel, align])
        return Labelled(np.asarray(rows, dtype=np.float64).reshape(len(layers), len(MEASURES)), ("layer", "measure"),
                        {"layer": [p for p, _ in layers], "measure": list(MEASURES)})

    def _iters(self, first: bool) -> int:
        return self.first_iters if first else self.iters

    def _start(self, vectors: dict, path: str, W: torch.Tensor) -> torch.Tensor:
        v = vectors.get(path)
        if v is None or v.shape[0] != W.shape[1]:
            gen = torch.Generator(device="cpu").manual_seed(self.seed)
            v = torch.randn(W.shape[1], generator=gen, dtype=torch.float64).to(device=W.device, dtype=W.dtype)
        return v

    def _inputs(self, model: nn.Module, layers: list, X) -> dict:
        """Each Linear layer's input on the first ``max_samples`` rows of ``X``, from one forward pass in eval
        mode without gradients (so no statistic changes), its random numbers drawn from a forked generator."""
        linear = [(p, m) for p, m in layers if isinstance(m, nn.Linear)]
        if X is None or not linear or not torch.is_tensor(X):
            return {}
        seen = {}
        hooks = [m.register_forward_pre_hook(lambda mod, args, p=p: seen.setdefault(p, args[0].detach()))
                 for p, m in linear]
        modes = [(m, m.training) for m in model.modules()]
        cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
        try:
            model.eval()
            with torch.no_grad(), torch.random.fork_rng(devices=cuda):
                model(X[: self.max_samples])
        finally:
            for h in hooks:
                h.remove()
            for m, mode in modes:
                m.training = mode
        return seen
