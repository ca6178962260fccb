"""Interventions: the user's functions called inside the step loop at chosen steps (``step_hooks``).

A config may hold ``step_hooks``, a dict ``{step: fn, (start, end): fn, ...}`` (Python only, like
``otherreturns``; not a command-line flag, and not read from ``bfn_config``). ``fn(model, opt, step, **config)``
is called:

- at step ``step``: before that step's batch is drawn and its forward pass, on the model after ``step`` updates
  (so a hook at step 0 acts on the initialization, and the loss of step ``step`` is the first to see it);
- for a key ``(start, end)``: at every step ``start <= step < end`` (half-open, like ``range``).

Several hooks due at one step run in the order of the dict. A hook gets the user's model (not the centered
wrapper), the optimizer, the step, and, by keyword, the config keys its signature names (all of them if it takes
``**kwargs``): the job's resolved config with its axis values and ``trial``, as grabs get it. It may change
parameters in place (under ``torch.no_grad()``), rescale ``opt.param_groups[i]["lr"]``, set ``requires_grad``
(freeze a layer), or change this step's gradients with ``on_next_grads``. It returns nothing: acting in place is
the only way it changes training, and a value returned is an error naming the hook.

Hooks are part of a job's identity (``identity.job_identity`` hashes their code, not their comments), so editing a
hook's body trains the job anew and a comment-only edit resumes. A job with hooks is never fused: between steps a
fused member's weights live in the stacked model, not in its module.
"""
from __future__ import annotations

import inspect
import numbers

from modelscape.config import ConfigError
from modelscape.backend.trainloop import LoopObserver

__all__ = ["check_step_hooks", "step_hooks_observers", "StepHooks", "on_next_grads"]

KEY = "step_hooks"
# What a hook receives positionally: config keys of these names are not passed to it.
HOOK_ARGS = ("model", "opt", "step")
# Keyword arguments every job gives its hooks (as its grabs) besides its config: the trial index and the function
# actually trained (``f - f0`` under CENTER).
JOB_KWARGS = ("trial", "trained_model")


def _name(fn) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _describe(key) -> str:
    return f"({key[0]}, {key[1]})" if isinstance(key, tuple) else str(key)


def _step(v) -> int | None:
    """``v`` as a step number, or None if it is not an integer (a bool is not one)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        return None
    return int(v)


def check_step_hooks(hooks, config: dict | None = None) -> dict:
    """Check a ``step_hooks`` value and return it with numpy integer keys made plain ints.

    ConfigError, naming ``step_hooks`` and the offending entry, for: a value that is not a dict; a key that is
    not a non-negative int or a pair ``(start, end)`` of them with ``start < end``; a hook that is not callable
    or whose signature cannot take ``(model, opt, step)``; a hook that requires a keyword argument ``config``
    (the job's resolved config, when given) does not hold.
    """
    if not isinstance(hooks, dict):
        raise ConfigError(f"{KEY} must be a dict {{step: fn, (start, end): fn}}, got {type(hooks).__name__} "
                          f"{hooks!r}")
    out = {}
    for key, fn in hooks.items():
        where = f"{KEY} entry {key!r}: "
        if isinstance(key, tuple):
            if len(key) != 2 or _step(key[0]) is None or _step(key[1]) is None:
                raise ConfigError(where + "a range of steps is a pair of ints (start, end)")
            norm = (_step(key[0]), _step(key[1]))
            if norm[0] < 0:
                raise ConfigError(where + f"start {norm[0]} is negative; steps count from 0")
            if norm[0] >= norm[1]:
                raise ConfigError(where + f"start {norm[0]} >= end {norm[1]}: the range [start, end) is empty")
        else:
            norm = _step(key)
            if norm is None:
                raise ConfigError(where + f"a key is a step (int) or a pair (start, end), not a "
                                          f"{type(key).__name__}")
            if norm < 0:
                raise ConfigError(where + f"step {norm} is negative; steps count from 0")
        _check_signature(fn, where, config)
        out[norm] = fn
    return out


def _check_signature(fn, where, config):
    if not callable(fn):
        raise ConfigError(where + f"the hook is a {type(fn).__name__}, not a function fn(model, opt, step, **config)")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin without a readable signature: the call itself will tell
    try:
        bound = sig.bind_partial(None, None, None)
    except TypeError:
        raise ConfigError(where + f"hook {_name(fn)}{sig} cannot take the arguments (model, opt, step)") from None
    params = sig.parameters.values()
    missing = [p.name for p in params if p.default is inspect.Parameter.empty and p.name not in bound.arguments
               and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    if config is not None:
        missing = [m for m in missing if (m not in config and m not in JOB_KWARGS) or m in HOOK_ARGS]
    if missing:
        raise ConfigError(where + f"hook {_name(fn)}{sig} requires {missing}, which "
                          + ("the config does not hold" if config is not None else "no call will give it")
                          + "; it is called as fn(model, opt, step, **config)")


def step_hooks_observers(job) -> list:
    """``[StepHooks]`` for a prepared job (``job.PreparedJob``) with ``step_hooks``; ``[]`` without."""
    hooks = job.cfg.get(KEY)
    if not hooks:
        return []
    kwargs = {k: v for k, v in job.loop_kwargs["grab_kwargs"].items() if k not in HOOK_ARGS}
    return [StepHooks(check_step_hooks(hooks, kwargs), kwargs)]


class StepHooks(LoopObserver):
    """Calls each hook of ``hooks`` (checked by ``check_step_hooks``) before the steps its key names.

    ``config`` is what hooks receive by keyword (each the keys its signature names). Between the steps where
    the set of due hooks changes, a step costs one integer comparison.
    """

    def __init__(self, hooks: dict, config: dict):
        self.hooks = [(key, fn, _kwargs_for(fn, config)) for key, fn in hooks.items()]
        self._due: list = []
        self._replan_at = 0  # the next step at which the hooks due may change

    def before_step(self, step, model, opt) -> None:
        if step >= self._replan_at:
            self._due, self._replan_at = self._plan(step)
        for key, fn, kwargs in self._due:
            _call(key, fn, model, opt, step, kwargs)

    def _plan(self, step):
        """The hooks due at ``step`` and the first later step at which that can change."""
        due, change = [], float("inf")
        for entry in self.hooks:
            key = entry[0]
            start, end = key if isinstance(key, tuple) else (key, key + 1)
            if start <= step < end:
                due.append(entry)
                change = min(change, end)
            elif start > step:
                change = min(change, start)
        return due, change


def _kwargs_for(fn, config):
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return config
    names = {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                   inspect.Parameter.KEYWORD_ONLY)}
    return {k: v for k, v in config.items() if k in names}


def _call(key, fn, model, opt, step, kwargs):
    try:
        ret = fn(model, opt, step, **kwargs)
    except Exception as e:
        raise RuntimeError(f"step hook {_describe(key)} ({_name(fn)}) raised at step {step}: "
                           f"{type(e).__name__}: {e}") from e
    if ret is not None:
        raise TypeError(f"step hook {_describe(key)} ({_name(fn)}) returned a {type(ret).__name__} at step {step}; "
                        "a hook changes the model or optimizer in place and returns nothing")


def on_next_grads(model, fn) -> None:
    """Change the gradients of the next backward pass only: call it from a step hook to act on that step's
    gradients. ``fn(name, grad)`` gets each parameter's name and gradient (before the optimizer sees it) and
    returns the gradient to use, or None to keep it. A parameter that gets no gradient in that pass keeps the
    pending change until its next one.
    """
    for name, p in model.named_parameters():
        if p.requires_grad:
            _once(p, name, fn)


def _once(p, name, fn):
    handle = None

    def hook(grad):
        handle.remove()  # one backward pass only
        new = fn(name, grad)
        return grad if new is None else new

    handle = p.register_hook(hook)
