"""The step loop: batch function, loss, EMA, thresholds, grabs. Nothing else.

It knows nothing of sweeps, stores, processes or parameterizations: it receives a built model and optimizer.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from modelscape.utils import to_numpy


def ema_thresholds(losses: np.ndarray, thresholds, smoother: float, ema0: float | None = None):
    """EMA of ``losses`` and the first index at which it is below each threshold (NaN where never).

    ``ema[i] = s * ema[i-1] + (1 - s) * losses[i]`` with ``ema[-1] = ema0`` (``losses[0]`` if None), as the seed
    trainloop does. Returns ``(ema, first_index)``; thresholds keep their order.
    """
    losses = np.asarray(losses, dtype=np.float64)
    ema = np.empty_like(losses)
    prev = losses[0] if ema0 is None and len(losses) else ema0
    for i, v in enumerate(losses):
        prev = smoother * prev + (1.0 - smoother) * v
        ema[i] = prev
    first = np.full(len(thresholds), np.nan)
    for j, t in enumerate(thresholds):
        hit = np.flatnonzero(ema < t)
        if len(hit):
            first[j] = hit[0]
    return ema, first


def match_shapes(out, y):
    """``out`` reshaped to ``y``'s shape for a float target of the same size (MSE on (N,) vs (N, 1)), or
    sequence logits ``(N, T, C)`` with the classes moved to dim 1 for integer targets ``(N, T)``."""
    # MSE against y of shape (N,) or (N, 1): the seed squeezed both; reshaping keeps a batch of one intact.
    if out.shape != y.shape and out.numel() == y.numel() and y.dtype.is_floating_point:
        return out.reshape(y.shape)
    # Sequence logits (N, T, C) against class targets (N, T): cross-entropy wants the classes at dim 1.
    if out.ndim >= 3 and out.shape[:-1] == y.shape and not y.dtype.is_floating_point:
        return out.movedim(-1, 1)
    return out


def _grab_values(grabs, model, X_tr, y_tr, X_te, y_te, opt, grab_kwargs):
    vals = {}
    for name, fn in grabs.items():
        try:
            v = fn(model=model, X_tr=X_tr, y_tr=y_tr, X_te=X_te, y_te=y_te, opt=opt, **grab_kwargs)
        except Exception as e:
            raise RuntimeError(f"grab {name!r} ({getattr(fn, '__qualname__', fn)}) raised "
                               f"{type(e).__name__}: {e}") from e
        vals[name] = np.array(to_numpy(v))  # a copy: on the CPU to_numpy of a live parameter is a view
    return vals


def train_loop(model: torch.nn.Module, batch_fn: Callable, opt: torch.optim.Optimizer, loss_fn: Callable, *,
                max_iter: int, thresholds, relative: bool = False, ema_smoother: float = 0.9,
                X_te=None, y_te=None, only_thresholds: bool = True, eval_every: int = 100,
                sync_every: int = 1, grabs: dict | None = None, grab_kwargs: dict | None = None,
                grab_model: torch.nn.Module | None = None, verbose: bool = False) -> dict:
    """Train ``model`` with ``batch_fn(step) -> (X, y)`` until the EMA train loss is below every threshold.

    Step ``i`` computes the loss of the model after ``i`` updates on batch ``i``, then updates. ``timekeys[j]``
    is the first step whose EMA train loss is below ``thresholds[j]`` (NaN if never). The job stops once all
    are crossed, after ``max_iter`` steps, or at the first NaN/inf loss (status ``diverged``). Losses are read
    back every ``sync_every`` steps so a GPU is not stalled every step; timekeys are exact regardless.

    Returns a dict: status, steps, thresholds, timekeys, train_loss (final EMA), test_loss (final model),
    and unless ``only_thresholds``: train_curve (EMA per step), train_raw (loss per step), eval_steps,
    test_curve; grabs: ``{name: value}`` at the end, or stacked over ``eval_steps`` along the curve.
    """
    grabs = dict(grabs or {})
    grab_kwargs = dict(grab_kwargs or {})
    grab_model = model if grab_model is None else grab_model
    thresholds = np.asarray(list(thresholds), dtype=np.float64)
    sync_every = max(1, int(sync_every))
    eval_every = int(eval_every)
    curves = not only_thresholds
    has_test = X_te is not None and y_te is not None

    def test_loss():
        if not has_test:
            return float("nan")
        with torch.no_grad():
            out = model(X_te)
            return float(loss_fn(match_shapes(out, y_te), y_te))

    raw: list[float] = []
    pending: list[torch.Tensor] = []
    eval_steps, test_curve, grab_trace = [], [], {name: [] for name in grabs}
    ema = None
    crossed = np.full(len(thresholds), np.nan)
    status = "not_reached"
    X = y = None
    step = 0

    def record_eval(at_step, te=None):
        eval_steps.append(at_step)
        test_curve.append(test_loss() if te is None else te)
        if grabs:
            for name, v in _grab_values(grabs, grab_model, X, y, X_te, y_te, opt, grab_kwargs).items():
                grab_trace[name].append(v)

    while step < max_iter:
        X, y = batch_fn(step)
        if curves and eval_every > 0 and step % eval_every == 0:
            record_eval(step)
        out = model(X)
        loss = loss_fn(match_shapes(out, y), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        pending.append(loss.detach())
        step += 1
        if len(pending) < sync_every and step < max_iter:
            continue
        new = torch.stack(pending).float().cpu().numpy().astype(np.float64) if len(pending) > 1 \
            else np.array([pending[0].item()])
        pending.clear()
        start = step - len(new)
        if curves:
            raw.extend(new.tolist())
        if start == 0:
            if relative:
                thresholds = thresholds * new[0]
            next_threshold = thresholds.max()  # the only threshold the EMA can cross first
        if ema is None:
            ema = new[0]
        for k, v in enumerate(new):
            if not math.isfinite(v):
                status = "diverged"
                break
            ema = ema_smoother * ema + (1.0 - ema_smoother) * v
            if ema < next_threshold:
                crossed[np.isnan(crossed) & (ema < thresholds)] = start + k
                next_threshold = np.max(thresholds[np.isnan(crossed)], initial=-np.inf)
            if verbose:
                print(f"step {start + k}: loss {v:.6g}, ema {ema:.6g}")
        if status == "diverged":
            break
        if not np.isnan(crossed).any():
            status = "done"
            break

    steps_run = step
    final_test = test_loss()
    result = dict(status=status, steps=steps_run, thresholds=thresholds, timekeys=crossed,
                  train_loss=float(ema) if ema is not None else float("nan"), test_loss=final_test)
    if curves:
        raw_arr = np.asarray(raw)
        ema_curve, _ = ema_thresholds(raw_arr, thresholds, ema_smoother) if len(raw_arr) else (raw_arr, None)
        if not eval_steps or eval_steps[-1] != steps_run:
            record_eval(steps_run, final_test)
        result.update(train_curve=ema_curve, train_raw=raw_arr, eval_steps=np.asarray(eval_steps),
                      test_curve=np.asarray(test_curve))
        result["grabs"] = {name: _stack(name, vals) for name, vals in grab_trace.items()}
    else:
        result["grabs"] = _grab_values(grabs, grab_model, X, y, X_te, y_te, opt, grab_kwargs) if grabs else {}
    return result


def _stack(name, vals):
    shapes = {np.shape(v) for v in vals}
    if len(shapes) > 1:
        raise ValueError(f"grab {name!r} returned values of different shapes along training: {sorted(shapes)}")
    return np.stack(vals)
