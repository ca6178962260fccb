"""Jobs as Ray tasks: on a local Ray, or on a Ray cluster (``RAY_ADDRESS='auto'`` or an address).

Ray schedules: each job is one remote task asking for one CPU, or ``1 / WORKERS_PER_DEVICE`` of a GPU where
the cluster has GPUs (so several jobs share a GPU). The sweep's context (global config and bfn_config, a
dataset included) is cloudpickled and put in Ray's object store once per sweep; a worker unpickles it once
and keeps it for the later jobs of that sweep. Records come back through ``ray.wait`` and the driver
stores them. A job whose task raises, or whose worker process dies (Ray's ``WorkerCrashedError``), gets a
failed record, as in the local pool; Ray does not retry it.

While the driver listens (``on_live``/``on_output``), tasks send their progress messages and output lines,
labelled with their job's axes, to a small relay actor (no CPU of its own); the driver drains it between
``ray.wait`` calls, so the bar, ``watch`` and ``load`` see Ray's running jobs as they see the pool's.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import Future

import cloudpickle
import torch

from modelscape.backend.executors.base import Executor, JobSpec
from modelscape.backend.records import failed_record
from modelscape.backend.runner import run_unit
from modelscape.utils import require

__all__ = ["RayExecutor"]

_CONTEXTS: dict = {}  # in a Ray worker: context id -> the unpickled (global_config, bfn_config)


class _Relay:
    """A Ray actor holding the messages tasks send (``put``) until the driver takes them (``take``)."""

    def __init__(self):
        self.items = []

    def put(self, item):
        self.items.append(item)

    def take(self) -> list:
        items, self.items = self.items, []
        return items

    def sync(self):
        """Nothing: a task that waits for this knows that its earlier ``put`` calls have run."""


def _run_task(context_id, context_ref, payload, index, relay=None):
    """The Ray task: run one unit on the GPU Ray gave this task (CUDA_VISIBLE_DEVICES), else the CPU; with a
    ``relay``, its progress and output lines go there."""
    import ray  # optional package: only a Ray task (in a Ray worker) runs this

    if context_id not in _CONTEXTS:
        _CONTEXTS.clear()  # one sweep's context at a time per worker: an old dataset is not kept alive
        _CONTEXTS[context_id] = cloudpickle.loads(ray.get(context_ref[0]))
    work = cloudpickle.loads(payload)
    device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
    if relay is None:
        return run_unit(_CONTEXTS[context_id], work, device)
    try:
        # fire and forget: the task never waits on the driver
        return run_unit(_CONTEXTS[context_id], work, device, lambda m: relay.put.remote(("live", m)),
                        lambda stream, text: relay.put.remote(("out", stream, text)))
    finally:
        # An actor runs one caller's calls in order: once this returns, all of this task's messages are in
        # the relay, so the driver, draining it before it takes the record, sees them first.
        try:
            ray.get(relay.sync.remote())
        except ray.exceptions.RayError:  # the relay is gone: progress is lost, never the job's record
            pass


class RayExecutor(Executor):
    """Runs each job as a Ray task. ``address``: None starts (or reuses) a local Ray, ``'auto'`` or an
    address joins a cluster; a Ray already initialized in this process is used as it is and left running."""

    def __init__(self, address=None, workers_per_device: int = 1):
        self.ray = ray = require("ray", "ray", "ray")
        self._own = not ray.is_initialized()
        if self._own:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            # a local Ray needs no dashboard; a cluster's head has its own settings
            ray.init(address=address, **({} if address else dict(include_dashboard=False)))
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        if gpus:
            per = max(1, workers_per_device)
            options = dict(num_gpus=1.0 / per, num_cpus=0)
            parallel = gpus * per
        else:
            options = dict(num_cpus=1)
            parallel = max(1, int(resources.get("CPU", 1)))
        self.slots = ["ray"] * parallel  # the job iterator keeps about this many jobs submitted
        self._task = ray.remote(max_retries=0, **options)(_run_task)
        self._contexts: dict = {}  # context id -> ObjectRef of its cloudpickled bytes
        self._running: dict = {}  # ObjectRef -> (spec, future)
        self._relay = None  # the _Relay actor, made when the driver first listens

    def submit(self, spec: JobSpec) -> Future:
        if spec.context_id not in self._contexts:
            self._contexts = {spec.context_id: self.ray.put(cloudpickle.dumps(spec.context))}
        fut = Future()
        fut.spec = spec
        self._launch(spec, fut)
        return fut

    def _launch(self, spec, fut):
        if self._relay is None and (self.on_live is not None or self.on_output is not None):
            self._relay = self.ray.remote(num_cpus=0)(_Relay).remote()
        relay = self._relay if (self.on_live is not None or self.on_output is not None) else None
        # The context's ref goes inside a list so that Ray does not fetch and unpickle it for every task.
        ref = self._task.remote(spec.context_id, [self._contexts[spec.context_id]],
                                cloudpickle.dumps(spec.work()), spec.index, relay)
        self._running[ref] = (spec, fut)

    def _drain(self):
        """Hand the messages tasks have sent so far to ``on_live`` and ``on_output``."""
        if self._relay is None:
            return
        try:
            items = self.ray.get(self._relay.take.remote())
        except self.ray.exceptions.RayError as e:  # its node died, say: the sweep goes on without progress
            warnings.warn(f"EXECUTOR=ray: live progress stopped, its relay actor is gone ({type(e).__name__})",
                          stacklevel=2)
            self._relay, self.on_live, self.on_output = None, None, None
            return
        for item in items:
            if item[0] == "live" and self.on_live is not None:
                self.on_live(item[1])
            elif item[0] == "out" and self.on_output is not None:
                self.on_output(item[1], item[2])

    def _collect(self, ref):
        """The record of a finished task; a task that raised or lost its worker becomes a failed record.
        Returns None when the job was resubmitted (a CUDA OOM is retried once, as by the pool)."""
        spec, fut = self._running.pop(ref)
        try:
            record = self.ray.get(ref)
        except self.ray.exceptions.RayError as e:
            died = isinstance(e, (self.ray.exceptions.WorkerCrashedError, self.ray.exceptions.NodeDiedError))
            reason = ("the Ray worker process died while running this job" if died
                      else f"the Ray task failed: {type(e).__name__}: {e}")
            record = failed_record(spec.axes, e, "ray", error=reason)
        if record.get("oom") and spec.retries == 0:
            spec.retries += 1
            self._launch(spec, fut)
            return None
        fut.set_result(record)
        return fut

    def as_completed(self, futures):
        wanted = {id(f) for f in futures}
        while wanted:
            refs = [r for r, (_, f) in self._running.items() if id(f) in wanted]
            if not refs:
                return
            ready, _ = self.ray.wait(refs, num_returns=1, timeout=0.5 if self._relay is not None else 1.0)
            self._drain()  # before the records: a job's last messages come before its end
            for ref in ready:
                fut = self._collect(ref)
                if fut is not None:
                    wanted.discard(id(fut))
                    yield fut

    def in_flight(self) -> int:
        return sum(spec.size for spec, _ in self._running.values())

    def shutdown(self, now: bool = False) -> None:
        """Cancel the tasks still running (Ray kills their workers either way, so ``now`` changes nothing)
        and, for a Ray this executor started, stop it."""
        for ref in list(self._running):
            self.ray.cancel(ref, force=True)
        self._running.clear()
        self._contexts.clear()
        if self._relay is not None:
            self.ray.kill(self._relay)
            self._relay = None
        if self._own:
            self.ray.shutdown()
