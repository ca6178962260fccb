"""Serial execution in the calling process: the easiest to debug, and unprotected.

A job that segfaults, calls ``os._exit`` or ``sys.exit``, or hangs takes the whole sweep with it, and
JOB_TIMEOUT cannot be enforced here. Use it to step through a job in a debugger; sweeps use the pool.
"""
from __future__ import annotations

from concurrent.futures import Future

import torch

from modelscape.backend.executors.base import Executor, JobSpec, default_threads
from modelscape.backend.runner import run_unit

__all__ = ["InProcessExecutor"]


class InProcessExecutor(Executor):
    """Runs each job when ``as_completed`` reaches it, so every record is handed back (and stored) the
    moment its job ends, not after the whole sweep. ``threads``: torch threads for each job (0 = the idle
    cores of this machine), set for the job and restored afterwards."""

    def __init__(self, device: str = "cpu", threads: int = 0):
        self.device = device
        self.threads = threads or (default_threads(1) if device == "cpu" else 2)
        self._queue: list[tuple[JobSpec, Future]] = []
        self._running = 0

    def submit(self, spec: JobSpec) -> Future:
        fut = Future()
        fut.spec = spec
        self._queue.append((spec, fut))
        return fut

    def _run(self, spec, fut):
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        self._running = spec.size
        try:
            # the driver, in this process, hears the job's progress directly, and prints its lines above its bar
            record = run_unit(spec.context, spec.work(), self.device, self.on_live, self.on_output)
            if record.get("oom"):  # retried once, after giving the cache back
                torch.cuda.empty_cache()
                record = run_unit(spec.context, spec.work(), self.device, self.on_live, self.on_output)
        finally:
            self._running = 0
            torch.set_num_threads(before)
        fut.set_result(record)

    def as_completed(self, futures):
        wanted = {id(f) for f in futures}
        for spec, fut in list(self._queue):
            if id(fut) in wanted and not fut.done():
                self._run(spec, fut)
                self._queue.remove((spec, fut))
                yield fut

    def in_flight(self) -> int:
        return self._running

    def cancel(self) -> None:
        self._queue.clear()
