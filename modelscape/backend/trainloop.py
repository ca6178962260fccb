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


# What the store keeps of a grab: numbers (bool, int, float, complex) and strings, alone or in arrays.
_STORABLE_KINDS = "biufcU"
# What a grab's own arguments are called: config keys of the same name would collide with them.
GRAB_ARGS = ("model", "X_tr", "y_tr", "X_te", "y_te", "opt")


def _grab_values(grabs, model, X_tr, y_tr, X_te, y_te, opt, grab_kwargs):
    vals = {}
    for name, fn in grabs.items():
        try:
            v = fn(model=model, X_tr=X_tr, y_tr=y_tr, X_te=X_te, y_te=y_te, opt=opt, **grab_kwargs)
        except Exception as e:
            raise RuntimeError(f"grab {name!r} ({getattr(fn, '__qualname__', fn)}) raised "
                               f"{type(e).__name__}: {e}") from e
        arr = np.array(to_numpy(v))  # a copy: on the CPU to_numpy of a live parameter is a view
        if arr.dtype.kind not in _STORABLE_KINDS:  # None, a dict, any object: dtype object
            raise TypeError(f"grab {name!r} ({getattr(fn, '__qualname__', fn)}) returned a {type(v).__name__}, "
                            "which cannot be stored: return a number, a string, or an array or tensor of numbers")
        vals[name] = arr.item() if arr.ndim == 0 else arr  # a number stays a number (or a str)
    return vals


def check_grabs(grabs, model, X, y, X_te, y_te, opt, grab_kwargs) -> None:
    """Call every grab once on the model as it is (before training) and raise TypeError naming a grab whose
    value cannot be stored, so a bad grab costs no training. The RNG states are put back afterwards, so the
    check changes no number of the job."""
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=cuda):
        _grab_values(grabs, model, X, y, X_te, y_te, opt, grab_kwargs)
    np.random.set_state(np_state)


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

    Every grab is called once before the first update (``check_grabs``): one returning something the store
    cannot keep (None, a dict, an object) fails the job there, before any training.

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

    record_at_start = curves and eval_every > 0
    while step < max_iter:
        X, y = batch_fn(step)
        if step == 0 and grabs and not record_at_start:  # with curves, record_eval(0) checks them just below
            check_grabs(grabs, grab_model, X, y, X_te, y_te, opt, grab_kwargs)
        if record_at_start and step % eval_every == 0:
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


# --------------------------------------------------------------------------------------------------------
# The original modelscape's face: train_model(model, batch_function, lr, ...)
# --------------------------------------------------------------------------------------------------------

def _pop_first(kwargs, *names):
    found = None
    for name in names:  # pop them all, so none is passed on to grabs as data
        value = kwargs.pop(name, None)
        found = value if found is None else found
    return found


def _fill_to(values, n):
    """``values`` (along the first axis) extended to length ``n`` with its last entry, as the original
    filled its curves after an early stop."""
    values = np.asarray(values)
    if len(values) == 0 or len(values) >= n:
        return values[:n]
    tail = np.repeat(values[-1:], n - len(values), axis=0)
    return np.concatenate([values, tail])


def train_model(model, batch_function, lr=1e-2, max_iter=int(1e3), loss_checkpoints=None, percent_thresholds=None,
                ema_smoother=0.0, X_tr=None, y_tr=None, X_te=None, y_te=None, only_thresholds=False,
                verbose=False, optimizer="SGD", loss="MSELoss", post_init_fn=None, **kwargs):
    """The original's training entry point, run by ``train_loop``.

    Builds the optimizer (``optimizer``: a torch.optim name, or ``OPTIMIZER_CLASS`` / ``optimizer_class`` /
    ``OPTIMIZER_FN``, or a ready ``OPTIMIZER_INSTANCE``) and the loss (``loss``: a torch.nn name, or
    ``LOSS_CLASS`` / ``loss_class`` / ``LOSS_FN``, or ``LOSS_INSTANCE``), each with the keyword arguments its
    constructor names (``momentum``, ``nesterov``, ``label_smoothing`` ...); runs ``post_init_fn(model, opt,
    lr, ...)`` (it may return ``(model, opt)``); wraps the model in ``CenteredWrapper``; trains with
    ``batch_function(step)`` until the EMA train loss is below every threshold (``loss_checkpoints``, or
    ``percent_thresholds`` times the first loss: exactly one of the two) or ``max_iter`` steps. No
    parameterization and no GAMMA are applied here (the original applied none either).

    Returns a dict: ``model`` (the CenteredWrapper), ``timekeys`` (first step below each threshold; NaN if
    never), ``train_losses`` and ``test_losses`` and one entry per grab in ``otherreturns``. With
    ``only_thresholds`` these are final values (EMA train loss, the final model's test loss on ``X_te``,
    NaN without one); otherwise arrays of length ``max_iter`` (EMA train loss per step, test loss and grabs
    after each step), the last value repeated after an early stop.
    """
    from modelscape.backend.job import call_post_init, ctor_kwargs, resolve_loss_class, resolve_optimizer
    from modelscape.model import centeredmodel

    if loss_checkpoints is not None and np.ndim(loss_checkpoints) == 0:
        loss_checkpoints = [loss_checkpoints]
    if percent_thresholds is not None and np.ndim(percent_thresholds) == 0:
        percent_thresholds = [percent_thresholds]
    has_abs, has_rel = bool(loss_checkpoints is not None and len(loss_checkpoints)), \
        bool(percent_thresholds is not None and len(percent_thresholds))
    if has_abs == has_rel:
        raise ValueError("train_model: give exactly one of loss_checkpoints and percent_thresholds")

    opt = _pop_first(kwargs, "OPTIMIZER_INSTANCE", "optimizer_instance")
    opt_cls = _pop_first(kwargs, "OPTIMIZER_CLASS", "optimizer_class", "OPTIMIZER_FN", "optimizer_fn")
    if opt is None:
        opt_cls = resolve_optimizer(opt_cls if opt_cls is not None else optimizer)
        opt_kwargs = ctor_kwargs(opt_cls, kwargs, skip=("params",))
        for k in opt_kwargs:
            kwargs.pop(k)
        opt = opt_cls(model.parameters(), **{"lr": lr, **opt_kwargs})
    loss_fn = _pop_first(kwargs, "LOSS_INSTANCE", "loss_instance")
    loss_cls = _pop_first(kwargs, "LOSS_CLASS", "loss_class", "LOSS_FN", "loss_fn")
    if loss_fn is None:
        loss_cls = resolve_loss_class(loss_cls if loss_cls is not None else loss)
        loss_kwargs = ctor_kwargs(loss_cls, kwargs)
        for k in loss_kwargs:
            kwargs.pop(k)
        loss_fn = loss_cls(**loss_kwargs) if isinstance(loss_cls, type) else loss_cls

    hook = post_init_fn if post_init_fn is not None else _pop_first(kwargs, "post_init_fn", "POST_INIT_FN")
    if hook is not None:
        model, opt = call_post_init(hook, model, opt, {**kwargs, "lr": lr})
    net = centeredmodel(model).to(next(model.parameters()).device)

    grabs = kwargs.get("otherreturns") or {}
    grab_kwargs = {k: v for k, v in kwargs.items() if k not in GRAB_ARGS and k != "otherreturns"}
    out = train_loop(net, batch_function, opt, loss_fn, max_iter=int(max_iter),
                     thresholds=loss_checkpoints if has_abs else percent_thresholds, relative=has_rel,
                     ema_smoother=ema_smoother, X_te=X_te, y_te=y_te, only_thresholds=only_thresholds,
                     eval_every=0 if only_thresholds else 1, grabs=grabs, grab_kwargs=grab_kwargs,
                     grab_model=model, verbose=verbose)
    result = {"model": net, "timekeys": out["timekeys"]}
    if only_thresholds:
        result.update(train_losses=out["train_loss"], test_losses=out["test_loss"], **out["grabs"])
    else:
        n = int(max_iter)
        # evaluations happen before each step and once at the end: entry k + 1 is the model after step k
        result.update(train_losses=_fill_to(out["train_curve"], n), test_losses=_fill_to(out["test_curve"][1:], n),
                      **{name: _fill_to(v[1:], n) for name, v in out["grabs"].items()})
    return result
