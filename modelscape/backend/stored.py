"""Results read from a store: the labelled ``SweepResults`` and, from the store beside them, each job's checkpoints.

``results.py`` knows records and axes only; what a store adds (the models its checkpoints hold) is added here,
below the store that builds these results and above the checkpoints it reads.
"""
from __future__ import annotations

from modelscape.results import SweepResults

__all__ = ["StoredResults"]


class StoredResults(SweepResults):
    """``SweepResults`` of a sweep run into, or read from, a store (``store_dir``: its experiment directory), whose
    jobs' models can be loaded at their checkpoints (``checkpoint``)."""

    def checkpoint(self, step=None, *, threshold=None, optimizer: bool = False, device="cpu", model_class=None,
                   model_kwargs: dict | None = None, **axes):
        """The model of one job (named by its axis values) at a checkpoint, built as the job built it and loaded
        with the saved weights; ``(model, optimizer)`` with ``optimizer=True`` (CHECKPOINT_OPTIMIZER).

        ``step``: a step number (the model after that many updates) or ``"final"``; or ``threshold``: a value
        of LOSS_CHECKPOINTS (the model at its timekey). ``res.checkpoint(WIDTH=256, trial=0, step=500)``. Under
        CENTER the model is the Centered wrapper (what was trained).

        Nothing in the store runs: the model is built from its recorded description by its class, found by name
        in a package this process has imported (or in ``__main__``, or a MODEL_FILE this process loaded), or
        given: ``model_class=Net``. ``model_kwargs`` replace recorded constructor arguments. See
        ``modelscape.backend.checkpoints.load``.
        """
        from modelscape.backend import checkpoints  # start-up: reading a store (`modelscape ls`) needs no torch
        if self.store_dir is None:
            raise ValueError("these results come from no store, so they have no checkpoints")
        return checkpoints.load(self.record(**axes), self.store_dir, step, threshold, optimizer, device,
                                model_class=model_class, model_kwargs=model_kwargs)

