"""A pool of spawned worker processes, each pinned to one device slot, started once and reused.

The driver talks to each worker over its own pipe and always knows which job a worker holds, so a worker
that dies (segfault, SIGKILL, out of host memory) costs exactly that job: it is recorded as failed with the
exit code, the worker is replaced, and the sweep goes on. The sweep's context (global config and bfn_config,
with whatever functions and tensors they hold) is cloudpickled once and sent once to each worker, so
functions from a notebook or ``__main__`` work and a dataset in ``bfn_config`` is not re-sent per job.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
import traceback
from collections import deque
from concurrent.futures import Future
from multiprocessing.connection import wait

import cloudpickle

from modelscape.backend.executors.base import Executor, JobSpec


def _worker_main(conn, device: str, threads: int) -> None:
    """Worker loop: receive contexts and jobs, send back records. Runs in the spawned process."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # torch's deterministic CUDA needs it
    import torch

    from modelscape.backend.job import failed_record, run_config_safe

    torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    _warm_up()
    contexts: dict[object, object] = {}
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            _quit()
        if msg[0] == "stop":
            _quit()
        if msg[0] == "context":
            try:
                contexts[msg[1]] = cloudpickle.loads(msg[2])
            except Exception as e:  # e.g. a function from a module this process cannot import
                contexts[msg[1]] = e
            continue
        _, index, context_id, payload = msg
        context = contexts[context_id]
        try:
            if isinstance(context, Exception):
                raise RuntimeError("the worker could not unpickle the sweep's config and bfn_config") from context
            overrides, axes = cloudpickle.loads(payload)
        except Exception as e:
            conn.send(("result", index, failed_record({}, e, device)))
            continue
        global_config, bfn_config = context
        record = run_config_safe({**global_config, **overrides}, bfn_config, device, axes)
        conn.send(("result", index, record))


def _quit() -> None:
    """Leave at once: the interpreter's teardown (torch's included) takes seconds and a worker has nothing to
    save, so a pool shuts down in a fraction of the time."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(0)


def _warm_up() -> None:
    """Pay torch's one-off lazy imports (the first optimizer step imports torch._dynamo, seconds) before the
    worker says it is ready, so no job's wall time carries them."""
    import torch

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.0)
    p.sum().backward()
    opt.step()


class _Worker:
    def __init__(self, ctx, device, threads):
        self.device = device
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, device, threads), daemon=True)
        self.proc.start()
        child.close()
        self.contexts: set = set()
        self.job: tuple[JobSpec, Future] | None = None
        self.ready = False

    def send_job(self, spec: JobSpec, fut: Future, context_blob: bytes):
        if spec.context_id not in self.contexts:
            self.conn.send(("context", spec.context_id, context_blob))
            self.contexts.add(spec.context_id)
        self.conn.send(("job", spec.index, spec.context_id, cloudpickle.dumps((spec.overrides, spec.axes))))
        self.job = (spec, fut)

    def stop(self, timeout=5.0):
        self.ask_stop()
        self.finish(timeout)

    def ask_stop(self):
        try:
            self.conn.send(("stop",))
        except (BrokenPipeError, OSError):
            pass

    def finish(self, timeout):
        """Wait up to ``timeout`` for the process to end, then kill it."""
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(1.0)
        self.conn.close()


class PoolExecutor(Executor):
    """Worker processes over ``slots`` (one device string per worker, e.g. ['cuda:0', 'cuda:0', 'cuda:1'])."""

    def __init__(self, slots, threads_per_worker: int | None = None):
        if not slots:
            raise ValueError("a pool needs at least one slot")
        self.slots = list(slots)
        cpu_workers = sum(s == "cpu" for s in self.slots)
        cores = os.cpu_count() or 1
        # CPU workers share the cores; a GPU worker needs few threads of its own.
        self.threads = threads_per_worker or (max(1, cores // cpu_workers) if cpu_workers else 2)
        self._ctx = mp.get_context("spawn")
        self._workers = [_Worker(self._ctx, s, self.threads) for s in self.slots]
        self._pending: deque[tuple[JobSpec, Future]] = deque()
        self._blobs: dict[object, bytes] = {}
        self.replaced = 0
        self._start_failures = 0  # workers in a row that died before they were ready

    def submit(self, spec: JobSpec) -> Future:
        if not self._workers:  # as_completed would wait forever for workers that are gone
            raise RuntimeError("this PoolExecutor has been shut down; make a new one")
        if spec.context_id not in self._blobs:
            self._blobs[spec.context_id] = cloudpickle.dumps(spec.context)
        fut = Future()
        fut.spec = spec
        self._pending.append((spec, fut))
        return fut

    def _dispatch(self):
        for w in self._workers:
            if w.ready and w.job is None and self._pending:
                spec, fut = self._pending.popleft()
                try:
                    w.send_job(spec, fut, self._blobs[spec.context_id])
                except (BrokenPipeError, OSError):
                    self._pending.appendleft((spec, fut))  # the worker is dead; _reap replaces it

    def _replace(self, w: _Worker) -> None:
        i = self._workers.index(w)
        w.stop(timeout=0.5)
        self._workers[i] = _Worker(self._ctx, w.device, self.threads)
        self.replaced += 1

    def _reap(self, w: _Worker, finished: list) -> None:
        """A worker's process ended: fail its job with the reason, start a replacement."""
        # Its pipe or sentinel reports the end before the OS has the exit status: wait for it (else "exit code None")
        w.proc.join(5.0)
        code = w.proc.exitcode
        if w.job is not None:
            spec, fut = w.job
            reason = (f"worker process for {w.device} died (exit code {code}"
                      + (f", signal {-code}" if code is not None and code < 0 else "") + ") while running this job")
            from modelscape.backend.job import failed_record
            fut.set_result(failed_record(spec.axes, RuntimeError(reason), w.device, error=reason))
            finished.append(fut)
            w.job = None
        elif not w.ready:
            # It died starting up (a bad device, an import error): replacing it forever would hang the sweep.
            self._start_failures += 1
            if self._start_failures >= 3:
                raise RuntimeError(f"worker processes for {w.device} die while starting (exit code {code}, "
                                   f"{self._start_failures} times in a row); their error output is above")
        self._replace(w)

    def _receive(self, w: _Worker, finished: list) -> None:
        try:
            msg = w.conn.recv()
        except (EOFError, OSError):
            w.proc.join(2.0)
            self._reap(w, finished)
            return
        if msg[0] == "ready":
            w.ready = True
            self._start_failures = 0
            return
        _, index, record = msg
        spec, fut = w.job
        w.job = None
        if record.get("oom") and spec.retries == 0:
            # The CUDA caching allocator of that process may be fragmented: retry once on a fresh worker.
            spec.retries += 1
            self._pending.appendleft((spec, fut))
            self._replace(w)
            return
        fut.set_result(record)
        finished.append(fut)

    def as_completed(self, futures):
        remaining = {id(f): f for f in futures}
        while remaining:
            self._dispatch()
            finished: list[Future] = []
            conns = {w.conn: w for w in self._workers}
            sentinels = {w.proc.sentinel: w for w in self._workers}
            for obj in wait(list(conns) + list(sentinels), timeout=1.0):
                if obj in conns:
                    if conns[obj] in self._workers:  # not replaced earlier in this round
                        self._receive(conns[obj], finished)
                elif sentinels[obj] in self._workers and not sentinels[obj].conn.poll():
                    self._reap(sentinels[obj], finished)
            for fut in finished:
                if remaining.pop(id(fut), None) is not None:
                    yield fut

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Block until every worker has started (torch imported, warmed up); returns the seconds waited.

        Not needed to run a sweep (jobs go to workers as they become ready); useful to time a pool apart
        from its start-up, or to make sure every worker takes part from the first job."""
        t0 = time.perf_counter()
        while not all(w.ready for w in self._workers):
            left = timeout - (time.perf_counter() - t0)
            if left <= 0:
                raise TimeoutError(f"the pool's workers were not all ready within {timeout:.0f} s")
            finished: list = []
            for conn in wait([w.conn for w in self._workers if not w.ready], timeout=min(left, 1.0)):
                w = next((w for w in self._workers if w.conn is conn), None)
                if w is not None:
                    self._receive(w, finished)
        return time.perf_counter() - t0

    def shutdown(self) -> None:
        # Ask every worker first, then wait: the workers end side by side, not one after the other.
        for w in self._workers:
            if w.ready:
                w.ask_stop()
            else:  # still importing torch (a replacement, say): there is nothing to wait for
                w.proc.kill()
        deadline = time.monotonic() + 5.0
        for w in self._workers:
            w.finish(max(0.1, deadline - time.monotonic()))
        self._workers = []
