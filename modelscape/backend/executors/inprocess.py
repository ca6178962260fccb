"""Serial execution in the calling process: the easiest to debug, and the default for a single slot."""
from __future__ import annotations

from concurrent.futures import Future

import torch

from modelscape.backend.executors.base import Executor, JobSpec
from modelscape.backend.job import run_config_safe


class InProcessExecutor(Executor):
    """Runs each job when ``as_completed`` reaches it, so every record is handed back (and stored) the
    moment its job ends, not after the whole sweep."""

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._queue: list[tuple[JobSpec, Future]] = []

    def submit(self, spec: JobSpec) -> Future:
        fut = Future()
        fut.spec = spec
        self._queue.append((spec, fut))
        return fut

    def _run(self, spec, fut):
        global_config, bfn_config = spec.context
        config = {**global_config, **spec.overrides}
        record = run_config_safe(config, bfn_config, self.device, spec.axes)
        if record.get("oom"):  # retried once, after giving the cache back
            torch.cuda.empty_cache()
            record = run_config_safe(config, bfn_config, self.device, spec.axes)
        fut.set_result(record)

    def as_completed(self, futures):
        wanted = {id(f) for f in futures}
        for spec, fut in list(self._queue):
            if id(fut) in wanted and not fut.done():
                self._run(spec, fut)
                self._queue.remove((spec, fut))
                yield fut
