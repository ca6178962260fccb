"""CUDA graphs for the step loop: one training step recorded once and replayed, so a small model's step costs one
launch from the CPU instead of hundreds.

A job's step (forward, loss, backward, optimizer step) on a CUDA device spends most of its time launching kernels
when the model is small; a GPU then idles while one Python process feeds it. ``GraphStep`` records the step as a
CUDA graph after a few eager warm-up steps and replays it: the batch function still runs eagerly and its output
is copied into the graph's input buffers (or, when it hands back the same tensor every step, as an offline training
set does, read in place). Test losses, grabs and observers run eagerly between replays on the very same
parameters. The numbers are those of the eager step: the same kernels run (Adam and AdamW are switched to their
``capturable`` form, which keeps their step count on the device).

A step that cannot be recorded runs eagerly, and ``train_loop`` logs once why: not on CUDA, ``CUDA_GRAPHS=off``,
an observer that acts between steps (step hooks, checkpoints at steps), a batch whose shape, dtype or device
changes (the graph's buffers are fixed), or capture itself failing (an operation that syncs with the CPU, such as
``.item()`` in a forward pass).
"""
from __future__ import annotations

import logging

import torch

from modelscape.utils import match_shapes

__all__ = ["GraphStep", "why_not_graphed", "WARMUP"]

log = logging.getLogger(__name__)

WARMUP = 3  # eager steps before capture: lazy initialisation (cuBLAS workspaces, optimizer state) happens there
_CAPTURABLE = (torch.optim.Adam, torch.optim.AdamW)


def why_not_graphed(mode: str, model: torch.nn.Module, acting_observers: list, max_iter: int) -> str | None:
    """None if a job's steps may be recorded as a CUDA graph (``mode`` is CUDA_GRAPHS), else why not."""
    if mode == "off":
        return "CUDA_GRAPHS=off"
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type != "cuda":
        return f"the model is on {device}, not CUDA"
    if acting_observers:
        return f"{', '.join(type(getattr(f, '__self__', f)).__name__ for f in acting_observers)} acts between steps"
    if max_iter <= WARMUP:
        return f"MAX_ITER={max_iter} leaves no step to replay after {WARMUP} warm-up steps"
    return None


def _signature(t) -> tuple:
    return (tuple(t.shape), t.dtype, t.device) if torch.is_tensor(t) else (type(t),)


class GraphStep:
    """The training step of one job as a CUDA graph: ``step(i, X, y)`` runs step ``i`` on batch ``(X, y)`` and
    returns its loss (a tensor on the device): eagerly for the ``WARMUP`` first steps (on a side stream, as capture
    needs), recorded at the next, replayed after. It returns None, after logging why, when the step cannot be
    recorded or replayed (the batch changed shape, capture failed): the caller steps eagerly from there on."""

    def __init__(self, model, loss_fn, opt, label: str = ""):
        self.model, self.loss_fn, self.opt, self.label = model, loss_fn, opt, label
        self.graph = None
        self.batches: list = []  # the warm-up batches: were they the same tensors every step?
        self.X = self.y = self.loss = None
        self.in_place = False  # the recorded input is the batch function's own tensor (offline data)
        for g in opt.param_groups if isinstance(opt, _CAPTURABLE) else ():
            g["capturable"] = True  # its step count lives on the device, so the step can be recorded
        self.stream = torch.cuda.Stream()

    def step(self, i: int, X, y):
        """Step ``i`` on ``(X, y)``: its loss, or None (logged) when this job must step eagerly from now on."""
        if self.graph is not None:
            loss = self.replay(X, y)
            if loss is None:
                self._fall_back(f"at step {i} the batch changed ({_signature(X)} != {_signature(self.X)}) or "
                                "is a new tensor where the recorded one was read in place")
            return loss
        if i < WARMUP:
            self.batches.append((X, y))
            return self.eager(X, y)
        same = all(bx is X and by is y for bx, by in self.batches)
        self.batches = []
        try:
            self.capture(X, y, same)
        except Exception as e:  # e.g. an op that syncs with the CPU: capture is impossible, training is not
            self.graph = None
            self._fall_back(f"capture failed: {type(e).__name__}: {e}")
            return None
        return self.replay(X, y)

    def _fall_back(self, why: str) -> None:
        log.warning("CUDA graphs: job %s steps eagerly from here: %s", self.label or "", why)

    def _step(self, X, y):
        loss = self.loss_fn(match_shapes(self.model(X), y), y)
        loss.backward()
        self.opt.step()
        return loss

    def eager(self, X, y) -> torch.Tensor:
        """One warm-up step, run on a side stream."""
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            self.opt.zero_grad(set_to_none=True)
            loss = self._step(X, y)
        torch.cuda.current_stream().wait_stream(self.stream)
        return loss.detach()

    def capture(self, X, y, same_as_before: bool) -> None:
        """Record the step. ``same_as_before``: the batch function returned these very tensors at every warm-up
        step, so they are read in place and never copied."""
        self.in_place = same_as_before
        self.X, self.y = (X, y) if same_as_before else (X.clone(), y.clone())
        self.opt.zero_grad(set_to_none=True)  # gradients are then written, not accumulated, by every replay
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self._step(self.X, self.y)

    def replay(self, X, y):
        """One step on ``(X, y)``; its loss, or None if the batch does not fit the recorded buffers."""
        if self.in_place:
            if X is not self.X or y is not self.y:
                return None
        elif _signature(X) != _signature(self.X) or _signature(y) != _signature(self.y):
            return None
        else:
            self.X.copy_(X, non_blocking=True)
            self.y.copy_(y, non_blocking=True)
        self.graph.replay()
        return self.loss.detach().clone()  # the next replay overwrites the recorded loss
