"""What a batch function and a model hand the step loop, checked at step 0, so that bad data or a model that
returns the wrong thing is named before the job trains (not as a raw torch error from deep in the loop, nor as a
``diverged`` job).

- ``first_batch``: the batch of step 0 must be a pair ``(X, y)`` of tensors (numpy arrays are converted, then at
  every step: floating ones to the model's dtype), not empty, every value finite. (X and y with different
  numbers of rows are left to the loss, whose error then names both: a model may take its batch along another
  axis.)
- ``first_loss``: the forward pass and the loss of step 0; an error names the model or loss, the step, and what
  it got (type, shape, dtype, device) against what the model holds. A forward that returns a tuple is named so
  (``naming_the_model`` too, around the test loss and grabs that run the model first).
- ``nonfinite``: after a job's loss turned NaN/inf at a later step, whether its data did (the loop then says so).

Each raises ``BadBatch`` or ``BadModel`` (ValueError, TypeError), whose message says what to change. Out of
memory errors pass through untouched (the executor retries them). Nothing here draws a random number or changes
a value the loop computes.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from modelscape.utils import match_shapes, qualname

__all__ = ["BadBatch", "BadModel", "describe", "first_batch", "first_loss", "naming_the_model", "nonfinite"]


class BadBatch(ValueError):
    """A batch function returned something the step loop cannot train on."""


class BadModel(TypeError):
    """A model (or loss) failed on, or returned the wrong thing for, a well-formed batch."""


def describe(v) -> str:
    """``tensor (8, 4) float32 on cpu``, ``numpy array (8, 4) float64``, ``tuple of 3``, ``None`` ..."""
    if torch.is_tensor(v):
        return f"tensor {tuple(v.shape)} {str(v.dtype).replace('torch.', '')} on {v.device}"
    if isinstance(v, np.ndarray):
        return f"numpy array {v.shape} {v.dtype}"
    if isinstance(v, (tuple, list)):
        inner = ", ".join(describe(x) for x in v[:3]) + (", ..." if len(v) > 3 else "")
        return f"{type(v).__name__} of {len(v)} ({inner})"
    return "None" if v is None else f"{type(v).__name__}"


def _held(model) -> str:
    """What the model holds: ``float32 on cpu`` (its first parameter), for messages."""
    p = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    return "no parameters" if p is None else f"{str(p.dtype).replace('torch.', '')} parameters on {p.device}"


def _target(model) -> tuple[torch.device, torch.dtype]:
    if not isinstance(model, torch.nn.Module):  # a device: where the data goes, before the model exists
        return torch.device(model or "cpu"), torch.get_default_dtype()
    p = next(iter(model.parameters()), None)
    if p is None:
        return torch.device("cpu"), torch.get_default_dtype()
    return p.device, (p.dtype if p.is_floating_point() else torch.get_default_dtype())


def _to_torch(v, device, dtype):
    if isinstance(v, (np.ndarray, np.generic)):
        t = torch.from_numpy(np.ascontiguousarray(v))
        return t.to(device=device, dtype=dtype if t.is_floating_point() else None)
    return v


class _FromNumpy:
    """A batch function whose numpy batches are handed on as tensors on the model's device (floating ones in the
    model's dtype)."""

    def __init__(self, batch_fn, device, dtype):
        self.batch_fn, self.device, self.dtype = batch_fn, device, dtype
        self.__qualname__ = getattr(batch_fn, "__qualname__", type(batch_fn).__name__)
        self.__module__ = getattr(batch_fn, "__module__", None)

    def __call__(self, step):
        X, y = self.batch_fn(step)
        return _to_torch(X, self.device, self.dtype), _to_torch(y, self.device, self.dtype)


def first_batch(batch_fn, model, step: int = 0, what: str = ""):
    """``(batch_fn, X, y)``: the batch of ``step`` (0) from ``batch_fn``, checked, and the batch function to call
    from then on (the same one, or one converting numpy batches). ``model``: the user's model (its first
    parameter's device and dtype are what numpy batches become), or a device (before the model exists: numpy
    batches become tensors there, floating ones in torch's default dtype). ``what``: which batch it is, for
    messages (``test set``). BadBatch names what is wrong."""
    name = qualname(batch_fn)
    at = f"at step {step}" + (f" (the {what})" if what else "")
    got = batch_fn(step)
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        raise BadBatch(f"batch function {name} returned {describe(got)} {at}; it must return a pair (X, y) of "
                       "tensors (or numpy arrays)")
    X, y = got
    expected = _held(model) if isinstance(model, torch.nn.Module) else f"on {_target(model)[0]}"
    for which, v in (("X", X), ("y", y)):
        if not (torch.is_tensor(v) or isinstance(v, np.ndarray)):
            raise BadBatch(f"batch function {name} returned {which} = {describe(v)} {at}; expected a tensor (or "
                           f"numpy array) the model can take ({expected})")
    if isinstance(X, np.ndarray) or isinstance(y, np.ndarray):
        device, dtype = _target(model)
        batch_fn = _FromNumpy(batch_fn, device, dtype)
        X, y = _to_torch(X, device, dtype), _to_torch(y, device, dtype)
    for which, v in (("X", X), ("y", y)):
        if v.device.type == "meta":
            raise BadBatch(f"batch function {name} returned {which} = {describe(v)} {at}: a tensor on the meta "
                           "device holds no data")
    if X.numel() == 0 or (X.ndim and X.shape[0] == 0):
        raise BadBatch(f"batch function {name} returned an empty batch {at}: X = {describe(X)}, y = {describe(y)} "
                       "(N_SAMPLES, or the size the batch function was asked for, is 0?)")
    bad = nonfinite(X, y, name, step, what)
    if bad:
        raise BadBatch(bad)
    return batch_fn, X, y


def nonfinite(X, y, batch_fn, step: int, what: str = "") -> str | None:
    """A message when X or y (of ``batch_fn``: the function, or its name) holds NaN or inf, naming how many;
    None when every value is finite."""
    name = batch_fn if isinstance(batch_fn, str) else qualname(batch_fn)
    at = f"at step {step}" + (f" (the {what})" if what else "")
    for which, v in (("X", X), ("y", y)):
        if not torch.is_tensor(v) or not (v.is_floating_point() or v.is_complex()):
            continue
        finite = torch.isfinite(v)
        if bool(finite.all()):
            continue
        nan = int(torch.isnan(v).sum())
        inf = int((~finite).sum()) - nan
        return (f"batch function {name} returned {which} = {describe(v)} holding {nan} NaN and {inf} inf of "
                f"{v.numel()} values {at}: the data is at fault, not the training")
    return None


def _oom(e) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(e, (MemoryError, oom))


def first_loss(net, model, loss_fn, X, y, batch_fn, step: int = 0):
    """``(out, loss)`` of step ``step`` (0): ``net(X)`` (the function trained: ``model``, or ``model`` centered)
    and ``loss_fn(match_shapes(out, y), y)``, as the loop computes them, with errors that name the model or the
    loss, the step, and what they got. BadModel for a forward that fails or returns something other than a
    tensor, a loss that fails or is not one number."""
    cls = type(model).__qualname__
    seen = (f"X = {describe(X)}, y = {describe(y)} from batch function {qualname(batch_fn)}; the model has "
            f"{_held(model)}")
    try:
        out = net(X)
    except Exception as e:
        if _oom(e):
            raise
        returned = _returned(model, X)
        if returned is not None:
            raise BadModel(returned) from e
        raise BadModel(f"model {cls} failed on the batch of step {step} ({seen}): {type(e).__name__}: {e}") from e
    if not torch.is_tensor(out):
        raise BadModel(_returned(model, X) or f"model {cls} returned {describe(out)} at step {step}, not a tensor")
    loss_name = qualname(loss_fn if not isinstance(loss_fn, torch.nn.Module) else type(loss_fn))
    try:
        loss = loss_fn(match_shapes(out, y), y)
    except Exception as e:
        if _oom(e):
            raise
        raise BadModel(f"loss {loss_name} failed at step {step} on the model's output {describe(out)} and y = "
                       f"{describe(y)} from batch function {qualname(batch_fn)}: {type(e).__name__}: {e}") from e
    if not torch.is_tensor(loss) or loss.numel() != 1:
        raise BadModel(f"loss {loss_name} returned {describe(loss)} at step {step}, not one number: reduce it "
                       "(reduction='mean')")
    return out, loss


@contextlib.contextmanager
def naming_the_model(model, X):
    """Around what runs the model at step 0 before the step itself (the test loss, the grabs): an error there
    from a model whose forward returns something other than a tensor becomes a BadModel that says so."""
    try:
        yield
    except (BadBatch, BadModel):
        raise
    except Exception as e:
        if _oom(e):
            raise
        returned = _returned(model, X)
        if returned is not None:
            raise BadModel(returned) from e
        raise


def _returned(model, X) -> str | None:
    """A message when ``model``'s own forward returns something other than a tensor (a tuple, say), else None.
    Runs the forward once more, without gradients, only once the step has failed."""
    try:
        with torch.no_grad():
            got = model(X)
    except Exception:
        return None
    if torch.is_tensor(got):
        return None
    return (f"model {type(model).__qualname__}'s forward returned {describe(got)}, not a tensor: the step loop takes "
            "one tensor of predictions (return the extra outputs from a method a grab calls)")
