"""The step loop: batch function, loss, EMA, thresholds, grabs. Nothing else.

It knows nothing of sweeps, stores, processes or parameterizations: it receives a built model and optimizer.
At the bottom, the original modelscape's ``train_model``: its face over this loop (it builds an optimizer and a
loss from names, hence the one import of ``build``).
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Callable

import numpy as np
import torch

from modelscape.backend.build import call_post_init, ctor_kwargs, resolve_loss_class, resolve_optimizer
from modelscape.backend.graphs import GraphStep, why_not_graphed
from modelscape.backend.inputs import first_batch, first_loss, naming_the_model, nonfinite
from modelscape.model import centeredmodel
from modelscape.utils import labels_of, match_shapes, to_numpy

__all__ = ["train_loop", "LoopObserver", "LossTracker", "Evaluations", "ema_thresholds", "check_grabs",
           "observers_wanting", "read_losses", "match_shapes", "GRAB_ARGS", "train_model"]


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


log = logging.getLogger(__name__)

# What the store keeps of a grab: numbers (bool, int, float, complex) and strings, alone or in arrays.
_STORABLE_KINDS = "biufcU"
# What a grab's own arguments are called: config keys of the same name would collide with them. ``step`` is
# the number of updates the model has had.
GRAB_ARGS = ("model", "X_tr", "y_tr", "X_te", "y_te", "opt", "step")


def _grab_values(grabs, model, X_tr, y_tr, X_te, y_te, opt, grab_kwargs, step=0, labels=None):
    """Call every grab; ``{name: value}`` as the store keeps them. ``labels`` (a dict) receives the dimension
    names and coordinate labels of each grab that returns a ``Labelled`` array or a DataArray."""
    vals = {}
    for name, fn in grabs.items():
        try:
            v = fn(model=model, X_tr=X_tr, y_tr=y_tr, X_te=X_te, y_te=y_te, opt=opt, step=step, **grab_kwargs)
        except Exception as e:
            raise RuntimeError(f"grab {name!r} ({getattr(fn, '__qualname__', fn)}) raised "
                               f"{type(e).__name__}: {e}") from e
        v, lab = labels_of(v)
        if lab is not None and labels is not None:
            labels[name] = lab
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


class LossTracker:
    """The EMA of one job's train loss, its threshold crossings and its status, fed the per-step losses in order.

    ``feed(losses)`` takes the losses of the next steps (step 0 first) and returns True once the job must stop:
    at the first NaN/inf loss (status ``diverged``, the EMA keeps its last finite value) or once the EMA is
    below every threshold (status ``done``). ``crossed[j]`` is the first step whose EMA is below
    ``thresholds[j]`` (NaN while never). With ``relative`` the thresholds are fractions of the first loss.
    """

    def __init__(self, thresholds, relative: bool = False, ema_smoother: float = 0.9, keep_raw: bool = False,
                 verbose: bool = False):
        self.thresholds = np.asarray(list(thresholds), dtype=np.float64)
        self.given = self.thresholds.copy()  # as configured: fractions of the first loss when ``relative``
        self.relative = relative
        self.smoother = ema_smoother
        self.raw: list[float] | None = [] if keep_raw else None
        self.verbose = verbose
        self.ema = None
        self.crossed = np.full(len(self.thresholds), np.nan)
        self.status = "not_reached"
        self.seen = 0
        self._next = np.inf

    def feed(self, new: np.ndarray) -> bool:
        """Take the losses of steps ``seen .. seen + len(new) - 1``; True when the job must stop."""
        start = self.seen
        self.seen += len(new)
        if self.raw is not None:
            self.raw.extend(new.tolist())
        if start == 0:
            if self.relative:
                self.thresholds = self.thresholds * new[0]
            self._next = self.thresholds.max()  # the only threshold the EMA can cross first
        if self.ema is None:
            self.ema = new[0]
        s, ema, thresholds = self.smoother, self.ema, self.thresholds
        for k, v in enumerate(new):
            if not math.isfinite(v):
                self.status = "diverged"
                break
            ema = s * ema + (1.0 - s) * v
            if ema < self._next:
                self.crossed[np.isnan(self.crossed) & (ema < thresholds)] = start + k
                self._next = np.max(thresholds[np.isnan(self.crossed)], initial=-np.inf)
            if self.verbose:
                print(f"step {start + k}: loss {v:.6g}, ema {ema:.6g}")
        self.ema = ema
        if self.status != "diverged" and not np.isnan(self.crossed).any():
            self.status = "done"
        return self.status != "not_reached"

    def feed_one(self, v: float) -> bool:
        """``feed`` of one step's loss, a Python float: the same arithmetic without numpy's per-call costs, for
        the loss read back every step (SYNC_EVERY=1, the CPU's default)."""
        step = self.seen
        self.seen += 1
        if self.raw is not None:
            self.raw.append(v)
        if step == 0:
            if self.relative:
                self.thresholds = self.thresholds * v
            self._next = self.thresholds.max()
        if self.ema is None:
            self.ema = v
        if not math.isfinite(v):
            self.status = "diverged"
            return True
        s = self.smoother
        ema = self.ema = s * self.ema + (1.0 - s) * v
        if ema < self._next:
            self.crossed[np.isnan(self.crossed) & (ema < self.thresholds)] = step
            self._next = np.max(self.thresholds[np.isnan(self.crossed)], initial=-np.inf)
            if not np.isnan(self.crossed).any():
                self.status = "done"
        if self.verbose:
            print(f"step {step}: loss {v:.6g}, ema {ema:.6g}")
        return self.status != "not_reached"


class Evaluations:
    """Test losses and grabs of one job: along training (``record`` at the steps ``due`` says) and at the end.

    ``model`` is the function trained (``f - f0`` when centered), used for the test loss; ``grab_model`` is
    what grabs receive (the user's model). ``result`` assembles the job's record from its ``LossTracker``.
    """

    def __init__(self, model, loss_fn, X_te=None, y_te=None, *, curves: bool = False, eval_every: int = 100,
                 grabs: dict | None = None, grab_model=None, opt=None, grab_kwargs: dict | None = None):
        self.model, self.loss_fn, self.X_te, self.y_te = model, loss_fn, X_te, y_te
        self.curves, self.eval_every = curves, int(eval_every)
        self.grabs = dict(grabs or {})
        self.grab_model = model if grab_model is None else grab_model
        self.opt = opt
        self.grab_kwargs = dict(grab_kwargs or {})
        self.eval_steps, self.test_curve = [], []
        self.grab_trace = {name: [] for name in self.grabs}
        self.grab_labels: dict = {}  # name -> dims and coordinate labels of a grab that returns a labelled array

    def due(self, step: int) -> bool:
        """Whether step ``step`` (before its update) is recorded along the curve."""
        return self.curves and self.eval_every > 0 and step % self.eval_every == 0

    def test_loss(self) -> float:
        if self.X_te is None or self.y_te is None:
            return float("nan")
        with torch.no_grad():
            out = self.model(self.X_te)
            return float(self.loss_fn(match_shapes(out, self.y_te), self.y_te))

    def _grab(self, X, y, step):
        return _grab_values(self.grabs, self.grab_model, X, y, self.X_te, self.y_te, self.opt, self.grab_kwargs,
                            step, self.grab_labels)

    def check(self, X, y) -> None:
        """Call the grabs once on the untrained model (``check_grabs``), where step 0 is not recorded anyway."""
        if self.grabs:
            check_grabs(self.grabs, self.grab_model, X, y, self.X_te, self.y_te, self.opt, self.grab_kwargs)

    def record(self, step: int, X, y, test_loss: float | None = None) -> None:
        """Record the test loss and grabs of the model as it is now, at ``step``; ``X, y`` its current batch."""
        self.eval_steps.append(step)
        self.test_curve.append(self.test_loss() if test_loss is None else test_loss)
        if self.grabs:
            for name, v in self._grab(X, y, step).items():
                self.grab_trace[name].append(v)

    def result(self, tracker: LossTracker, steps: int, X, y) -> dict:
        """The job's record after ``steps`` steps, the model as it is now; ``X, y`` the last batch."""
        final_test = self.test_loss()
        ema = tracker.ema
        result = dict(status=tracker.status, steps=steps, thresholds=tracker.thresholds, timekeys=tracker.crossed,
                      thresholds_given=tracker.given,
                      train_loss=float(ema) if ema is not None else float("nan"), test_loss=final_test)
        if self.curves:
            raw_arr = np.asarray(tracker.raw if tracker.raw is not None else [])
            ema_curve = ema_thresholds(raw_arr, tracker.thresholds, tracker.smoother)[0] if len(raw_arr) \
                else raw_arr
            if not self.eval_steps or self.eval_steps[-1] != steps:
                self.record(steps, X, y, final_test)
            result.update(train_curve=ema_curve, train_raw=raw_arr, eval_steps=np.asarray(self.eval_steps),
                          test_curve=np.asarray(self.test_curve))
            result["grabs"] = {name: _stack(name, vals) for name, vals in self.grab_trace.items()}
        else:
            result["grabs"] = self._grab(X, y, steps) if self.grabs else {}
        if self.grab_labels:
            result["grab_dims"] = dict(self.grab_labels)
        return result


class LoopObserver:
    """Something that watches (or acts on) one job's step loop: live progress, TensorBoard, checkpoints, hooks.

    Subclasses override what they need; the loop calls only what an observer overrides (``wants``), so an
    observer costs nothing at the points it ignores. Called by ``train_loop`` and, per member, by the fused
    trainer (which calls only ``after_sync`` and ``at_end``: a job with an observer that overrides
    ``before_step`` is not fused, since a member's model does not exist as a module between steps).

    - ``before_step(step, model, opt)``: ``model`` has had ``step`` updates; batch ``step`` is about to be used.
      ``model`` is the user's model (not the centered wrapper). Runs every step: keep it cheap when idle.
    - ``after_sync(step, tracker, evals)``: the losses of steps ``< step`` have just been fed to ``tracker``
      (a ``LossTracker``); ``evals`` (``Evaluations``) holds the test losses and grabs recorded so far.
    - ``at_end(record, model, opt)``: the job's result record (``train_loop``'s dict), the trained model.

    ``fusable`` False keeps the job out of fused groups for another reason (the fused trainer steps a stacked
    optimizer, so ``opt`` at ``at_end`` holds no state of its own).

    ``optional`` True (what reports or saves: TensorBoard, live progress, checkpoints): should one of its calls
    raise (a full disk, say), the loop warns once, naming ``role`` and the error, calls ``failed(exc)`` and
    calls the observer no more; the job trains on and keeps its result. False (step hooks, which change what is
    trained): the error fails the job.
    """

    fusable = True
    optional = False
    role = "an observer"
    broken = None  # once an optional observer has failed: why

    def failed(self, exc: BaseException) -> None:
        """Called once when an ``optional`` observer's call raised ``exc``: let go of what it holds."""

    def before_step(self, step: int, model, opt) -> None:
        pass

    def after_sync(self, step: int, tracker: "LossTracker", evals: "Evaluations") -> None:
        pass

    def at_end(self, record: dict, model, opt) -> None:
        pass

    def wants(self, method: str) -> bool:
        """Whether this observer overrides ``method`` (so the loop must call it)."""
        return getattr(type(self), method) is not getattr(LoopObserver, method)


def observers_wanting(observers, method: str) -> list:
    """The bound ``method`` of each observer that overrides it; an ``optional`` observer's guarded, so that its
    failure costs the job nothing (see ``LoopObserver``)."""
    return [_Guarded(o, method) if o.optional else getattr(o, method) for o in observers or () if o.wants(method)]


class _Guarded:
    """An optional observer's method: an exception becomes one warning, and the observer is called no more."""

    def __init__(self, observer, method: str):
        self.observer, self.call = observer, getattr(observer, method)

    def __call__(self, *args) -> None:
        o = self.observer
        if o.broken is not None:
            return
        try:
            self.call(*args)
        except Exception as e:
            o.broken = f"{type(e).__name__}: {e}"
            with warnings.catch_warnings():
                warnings.simplefilter("always")  # one per job and observer, never deduplicated across jobs
                warnings.warn(f"{o.role} failed ({o.broken}); this job trains on without it and keeps its result",
                              RuntimeWarning, stacklevel=2)
            try:
                o.failed(e)
            except Exception:  # letting go is best effort: the observer is done either way
                pass


def train_loop(model: torch.nn.Module, batch_fn: Callable, opt: torch.optim.Optimizer, loss_fn: Callable, *,
                max_iter: int, thresholds, relative: bool = False, ema_smoother: float = 0.9,
                X_te=None, y_te=None, only_thresholds: bool = True, eval_every: int = 100,
                sync_every: int = 1, grabs: dict | None = None, grab_kwargs: dict | None = None,
                grab_model: torch.nn.Module | None = None, verbose: bool = False, observers=(),
                cuda_graphs: str = "off", label: str = "") -> dict:
    """Train ``model`` with ``batch_fn(step) -> (X, y)`` until the EMA train loss is below every threshold.

    Step ``i`` computes the loss of the model after ``i`` updates on batch ``i``, then updates. ``timekeys[j]``
    is the first step whose EMA train loss is below ``thresholds[j]`` (NaN if never). The job stops once all
    are crossed, after ``max_iter`` steps, or at the first NaN/inf loss (status ``diverged``). Losses are read
    back every ``sync_every`` steps so a GPU is not stalled every step; timekeys are exact regardless.

    Every grab is called once before the first update (``check_grabs``): one returning something the store
    cannot keep (None, a dict, an object) fails the job there, before any training.

    Returns a dict: status, steps, thresholds (the losses to reach), thresholds_given (as given: fractions of the
    first loss with ``relative``), timekeys, train_loss (final EMA), test_loss (final model),
    and unless ``only_thresholds``: train_curve (EMA per step), train_raw (loss per step), eval_steps,
    test_curve; grabs: ``{name: value}`` at the end, or stacked over ``eval_steps`` along the curve.

    ``observers`` (``LoopObserver``) are called before each step, after each loss read-back and at the end.

    ``cuda_graphs`` (CUDA_GRAPHS): ``"auto"`` records the step as a CUDA graph on a CUDA device where it can
    (``graphs.GraphStep``; why not is logged once), ``"off"`` never. ``label`` names the job in that log line.
    """
    sync_every = max(1, int(sync_every))
    tracker = LossTracker(thresholds, relative, ema_smoother, keep_raw=not only_thresholds, verbose=verbose)
    evals = Evaluations(model, loss_fn, X_te, y_te, curves=not only_thresholds, eval_every=eval_every,
                        grabs=grabs, grab_model=grab_model, opt=opt, grab_kwargs=grab_kwargs)
    user_model = model if grab_model is None else grab_model
    before, after, at_end = (observers_wanting(observers, m) for m in ("before_step", "after_sync", "at_end"))
    pending: list[torch.Tensor] = []
    every = eval_every if evals.curves and eval_every > 0 else 0  # evals.due, without a call per step
    graph = None
    if cuda_graphs != "off":
        why = why_not_graphed(cuda_graphs, model, before, max_iter)
        if why is None:
            graph = GraphStep(model, loss_fn, opt, label)
        elif any(p.is_cuda for p in model.parameters()):
            log.info("CUDA graphs: job %s steps eagerly: %s", label, why)
    X = y = None
    step = 0
    while step < max_iter:
        for fn in before:
            fn(step, user_model, opt)
        if step:
            X, y = batch_fn(step)
            if every and step % every == 0:
                evals.record(step, X, y)
            if graph is not None:
                loss = graph.step(step, X, y)
                if loss is None:  # logged: from here this job steps eagerly
                    graph = None
            if graph is None:
                out = model(X)
                loss = loss_fn(match_shapes(out, y), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        else:  # step 0: the batch and the model's output are checked, so bad data is named before training
            batch_fn, X, y = first_batch(batch_fn, user_model)
            with naming_the_model(user_model, X):
                if every:
                    evals.record(step, X, y)
                else:
                    evals.check(X, y)
            out, loss = first_loss(model, user_model, loss_fn, X, y, batch_fn)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        step += 1
        if sync_every == 1:  # the loss of every step, one device read each: no list, no stacking, no numpy
            stop = tracker.feed_one(loss.item())
        else:
            pending.append(loss.detach())
            if len(pending) < sync_every and step < max_iter:
                continue
            new = read_losses(pending)
            pending.clear()
            stop = tracker.feed(new)
        if tracker.status == "diverged":  # NaN that came with the data is the data's fault: say so
            _warn_data(nonfinite(X, y, batch_fn, step - 1))
        for fn in after:
            fn(step, tracker, evals)
        if stop:
            break
    result = evals.result(tracker, step, X, y)
    for fn in at_end:
        fn(result, user_model, opt)
    return result


def _warn_data(note: str | None) -> None:
    if note:
        warnings.warn(f"the job diverged with its data: {note}", stacklevel=3)


def read_losses(pending: list) -> np.ndarray:
    """Scalar loss tensors (or rows of them) -> one float64 array on the host, in one device sync."""
    if len(pending) == 1:
        return np.atleast_1d(pending[0].detach().float().cpu().numpy().astype(np.float64))
    return torch.stack(pending).float().cpu().numpy().astype(np.float64)


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
