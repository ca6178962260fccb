"""A pool of spawned worker processes, each pinned to one device slot, started once and reused.

The driver talks to each worker over its own pipe and always knows which job a worker holds, so a job that
kills its worker (segfault, ``os._exit``, ``sys.exit``, SIGKILL, out of host memory) costs that job alone:
it is retried once on a fresh worker, and if it kills that one too it is recorded as ``crashed`` with the
exit code or signal of each attempt. A job running longer than ``job_timeout`` seconds has its worker killed
and replaced, and is recorded as ``timeout``. Workers ignore SIGINT (Ctrl-C is the driver's to handle) and
leave within about a second of their driver's death, whatever their job is doing.

The sweep's context (global config and bfn_config, with whatever functions and tensors they hold) is
cloudpickled once and sent once to each worker, so functions from a notebook or ``__main__`` work and a
dataset in ``bfn_config`` is not re-sent per job.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import Future
from multiprocessing.connection import wait

import cloudpickle

from modelscape.backend.executors.base import Executor, JobSpec, default_threads
from modelscape.backend.records import failed_record
from modelscape.backend.spawned import worker_main

__all__ = ["PoolExecutor", "CRASH_ATTEMPTS"]

# A job that killed its worker this many times is recorded as crashed (the first death may be bad luck: the
# host ran out of memory, another process's doing).
CRASH_ATTEMPTS = 2
def _exit_reason(code) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


@contextlib.contextmanager
def _spawning():
    """Around starting a worker: (1) SIGINT is blocked, and stays blocked in the new process until it ignores
    the signal itself, so a Ctrl-C while it imports torch prints no traceback (in this process it is only held
    back for the moment of the spawn); (2) the ``__main__`` module's file and spec are hidden, so the worker
    does not run the user's script again: a script without an ``if __name__ == "__main__":`` guard would start
    a sweep in every worker. Nothing a job needs is lost: the sweep's functions travel by value (cloudpickle)."""
    main = sys.modules.get("__main__")
    hidden = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    for k in hidden:
        setattr(main, k, None)
    blocked = hasattr(signal, "pthread_sigmask")
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if blocked else None
    try:
        yield
    finally:
        for k, v in hidden.items():
            setattr(main, k, v)
        if blocked:  # last: a Ctrl-C held back meanwhile is raised here
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


class _Worker:
    def __init__(self, ctx, device, threads):
        self.device = device
        self.conn, child = ctx.Pipe()
        main_thread = threading.current_thread() is threading.main_thread()
        self.proc = ctx.Process(target=worker_main, args=(child, device, threads, os.getpid(), main_thread),
                                daemon=True)
        with _spawning():
            self.proc.start()
        child.close()
        self.contexts: set = set()
        self.job: tuple[JobSpec, Future] | None = None
        self.started = 0.0  # when the current job was sent
        self.ready = False

    def send_job(self, spec: JobSpec, fut: Future, context_blob: bytes):
        if spec.context_id not in self.contexts:
            self.conn.send(("context", spec.context_id, context_blob))
            self.contexts.add(spec.context_id)
        self.conn.send(("job", spec.index, spec.context_id, cloudpickle.dumps(spec.work())))
        self.job = (spec, fut)
        self.started = time.monotonic()

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
    """Worker processes over ``slots`` (one device string per worker, e.g. ['cuda:0', 'cuda:0', 'cuda:1']).

    ``threads_per_worker``: torch threads in each worker (0 or None: the idle cores shared among the CPU workers,
    2 for a GPU worker). ``job_timeout``: seconds after which a job's worker is killed and the job recorded
    as ``timeout`` (None: no limit). The workers start at once, in the background: create the pool early and
    they import torch while the caller does other work."""

    def __init__(self, slots, threads_per_worker: int | None = None, job_timeout: float | None = None):
        if not slots:
            raise ValueError("a pool needs at least one slot")
        if job_timeout is not None and not job_timeout > 0:
            raise ValueError(f"job_timeout must be a positive number of seconds or None, got {job_timeout!r}")
        self.slots = list(slots)
        cpu_workers = sum(s == "cpu" for s in self.slots)
        # CPU workers share the cores; a GPU worker needs few threads of its own.
        self.threads = threads_per_worker or (default_threads(cpu_workers) if cpu_workers else 2)
        self.job_timeout = job_timeout
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

    def _fail(self, w: _Worker, status: str, reason: str, finished: list) -> None:
        """End the worker's job with a record of ``status`` whose error is ``reason``."""
        spec, fut = w.job
        w.job = None
        record = failed_record(spec.axes, RuntimeError(reason), w.device, time.monotonic() - w.started,
                               error=reason)
        record["status"] = status
        fut.set_result(record)
        finished.append(fut)

    def _reap(self, w: _Worker, finished: list) -> None:
        """A worker's process ended: retry its job on a fresh worker once, or record it as crashed."""
        # Its pipe or sentinel reports the end before the OS has the exit status: wait for it (else "exit code None")
        w.proc.join(5.0)
        code = w.proc.exitcode
        if w.job is not None:
            spec, fut = w.job
            spec.crashes.append(f"{_exit_reason(code)} after {time.monotonic() - w.started:.1f} s")
            if len(spec.crashes) < CRASH_ATTEMPTS:
                w.job = None
                self._pending.appendleft((spec, fut))  # the replacement below takes it first
            else:
                self._fail(w, "crashed", f"the job killed its worker process ({w.device}) {len(spec.crashes)} "
                           f"times: {'; '.join(spec.crashes)}", finished)
        elif not w.ready:
            # It died starting up (a bad device, an import error): replacing it forever would hang the sweep.
            self._start_failures += 1
            if self._start_failures >= 3:
                raise RuntimeError(f"worker processes for {w.device} die while starting ({_exit_reason(code)}, "
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
        if msg[0] == "live":
            if self.on_live is not None:
                self.on_live(msg[1])
            return
        if msg[0] == "out":
            if self.on_output is not None:
                self.on_output(msg[1], msg[2])
            else:
                print(msg[2], end="", file=sys.stderr if msg[1] == "stderr" else sys.stdout, flush=True)
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

    def _drain(self, w: _Worker, finished: list, most: int = 256) -> None:
        """Receive what the worker has sent (up to ``most`` messages: progress and output lines come often)."""
        for _ in range(most):
            if w not in self._workers or w.conn.closed:  # replaced (earlier in this round, or just now)
                return
            self._receive(w, finished)
            if w.job is None or not w.conn.poll():
                return

    def _enforce_timeout(self, finished: list) -> float:
        """Kill the workers whose job is past ``job_timeout``; return the seconds until the next deadline."""
        if self.job_timeout is None:
            return 1.0
        now = time.monotonic()
        next_deadline = 1.0
        for w in list(self._workers):
            if w.job is None:
                continue
            size = w.job[0].size  # a fused group of n jobs gets n times a job's time
            left = w.started + self.job_timeout * size - now
            if left > 0:
                next_deadline = min(next_deadline, left)
                continue
            w.proc.kill()
            what = "the job" if size == 1 else f"the fused group of {size} jobs"
            self._fail(w, "timeout", f"{what} ran past JOB_TIMEOUT={self.job_timeout:g} s"
                       + ("" if size == 1 else " per job") + f": its worker process for {w.device} was killed after "
                       f"{now - w.started:.1f} s", finished)
            self._replace(w)
        return next_deadline

    def as_completed(self, futures):
        remaining = {id(f): f for f in futures}
        while remaining:
            self._dispatch()
            finished: list[Future] = []
            wait_s = self._enforce_timeout(finished)
            conns = {w.conn: w for w in self._workers}
            sentinels = {w.proc.sentinel: w for w in self._workers}
            for obj in (wait(list(conns) + list(sentinels), timeout=max(0.01, wait_s)) if not finished else []):
                if obj in conns:
                    self._drain(conns[obj], finished)
                elif sentinels[obj] in self._workers and not sentinels[obj].conn.poll():
                    self._reap(sentinels[obj], finished)
            for fut in finished:
                if remaining.pop(id(fut), None) is not None:
                    yield fut

    def in_flight(self) -> int:
        return sum(w.job[0].size for w in self._workers if w.job is not None)

    def cancel(self) -> None:
        """Drop the jobs not started and replace the workers running one: the pool stays usable."""
        self._pending.clear()
        for w in list(self._workers):
            if w.job is not None:
                w.proc.kill()
                w.job = None
                self._replace(w)

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

    def shutdown(self, now: bool = False) -> None:
        # Ask every worker first, then wait: the workers end side by side, not one after the other.
        for w in self._workers:
            if w.ready and not now:
                w.ask_stop()
            else:  # still importing torch (a replacement, say), or interrupted: nothing to wait for
                w.proc.kill()
        deadline = time.monotonic() + 5.0
        for w in self._workers:
            w.finish(max(0.1, deadline - time.monotonic()))
        self._workers = []
