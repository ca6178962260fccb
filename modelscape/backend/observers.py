"""What watches a job's step loop besides the loop itself: one place that decides, per prepared job, which
``LoopObserver``s (``trainloop.LoopObserver``) it gets from its config and from the process it runs in.

``train_loop`` and the fused trainer call them; each feature keeps its own module and adds one line here.
"""
from __future__ import annotations

from modelscape.backend import checkpoints
from modelscape.backend.tensorboard import tensorboard_observers
from modelscape.backend.interventions import step_hooks_observers
from modelscape.backend.live import live_observers


def job_observers(job) -> list:
    """The observers of a prepared job (``job.PreparedJob``), in the order they are called at each point.

    Interventions run first (they change the model a step sees), then what saves or reports it.
    """
    observers: list = []
    observers += step_hooks_observers(job)
    observers += checkpoints.job_observers(job)
    observers += tensorboard_observers(job)
    observers += live_observers(job)
    return observers
