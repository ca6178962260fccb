"""The original modelscape's queue worker, for code that drives its own processes with it.

modelscape's sweeps do not use it (``modelscape.backend.executors`` run jobs); it is ``run_job`` in a loop.
"""
from __future__ import annotations

import torch

from modelscape.backend.job import run_job
from modelscape.backend.utils import tuple_to_numpy


def worker(device_id, job_queue, result_queue, global_config, bfn_config, iterator_names=None):
    """Take jobs from ``job_queue`` until a ``None`` arrives and put ``("ok", payload)`` (``run_job``'s tuple,
    arrays as numpy) or ``("err", (job, repr(exception)))`` on ``result_queue``. An item is a job tuple or
    ``("job", index, job)``. If the CUDA device cannot be selected, puts ``("bootstrap_err", repr(e))`` and
    returns."""
    if torch.cuda.is_available():
        try:
            torch.cuda.set_device(device_id)
        except Exception as e:  # reported to the driver, which would otherwise wait forever
            result_queue.put(("bootstrap_err", repr(e)))
            return
    while True:
        item = job_queue.get()
        if item is None:
            return
        job_index, job = 0, item
        if isinstance(item, tuple) and len(item) == 3 and item[0] == "job":
            _, job_index, job = item
        try:
            payload = run_job(device_id, job, global_config, bfn_config, iterator_names, job_index=job_index)
            result_queue.put(("ok", tuple_to_numpy(payload)))
        except Exception as e:  # one bad job must not stop the worker
            result_queue.put(("err", (job, repr(e))))


__all__ = ["worker"]
