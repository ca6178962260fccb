"""A pool worker's process: what a spawned worker runs, in a module that imports nothing heavy.

A spawned process imports the module of its target function before it can call it. ``executors.pool`` imports the
executors package, which imports torch and the whole engine: seconds during which no watchdog runs, so a driver
killed then left its workers starting up, alive, for the seconds torch takes to import. This module imports only
the standard library, cloudpickle and ``records``; the worker starts its driver watchdog first, then imports
torch and the engine (``runner``).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

import cloudpickle

from modelscape.backend.records import failed_record

__all__ = ["worker_main", "WATCHDOG_PERIOD"]

WATCHDOG_PERIOD = 0.5  # seconds between a worker's checks that its driver lives


def worker_main(conn, device: str, threads: int, driver_pid: int, death_signal: bool) -> None:
    """A pool worker's loop: receive contexts and jobs, send back records. Runs in the spawned process, whose
    first act is to watch its driver (before torch or the engine is imported: seconds, during which a driver
    killed now must not leave it behind)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the driver decides
    _watch_driver(driver_pid, death_signal)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # torch's deterministic CUDA needs it
    import torch  # worker start-up: after the watchdog, which must run even while torch imports

    from modelscape.backend.runner import run_unit  # worker start-up: the engine imports torch

    lock = threading.Lock()  # a thread of the job may print while the main thread sends

    def send(*msg):
        with lock:
            conn.send(msg)

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
            work = cloudpickle.loads(payload)
        except Exception as e:
            send("result", index, failed_record({}, e, device))
            continue
        try:
            # progress messages and whole output lines, labelled with the job's axes, go to the driver
            record = run_unit(context, work, device, lambda m: send("live", m),
                              lambda stream, text: send("out", stream, text))
        except SystemExit as e:
            # The job called sys.exit: end this process as that call asked, so the driver records the exit
            # code (never as a clean end of the worker, never as a result).
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)  # sys.exit("message") prints it, as Python does
            _quit(code)
        send("result", index, record)


def _watch_driver(driver_pid: int, death_signal: bool) -> None:
    """Make this worker end soon after its driver does, however it dies and whatever the job is doing.

    On Linux the kernel sends SIGKILL the moment the driver's thread that spawned us ends (asked only when that
    is the driver's main thread: another thread may end while the pool lives on). Everywhere, a daemon thread
    polls the parent pid and calls ``os._exit``, which needs no cooperation from the main thread (it may be
    stuck in ``time.sleep(1e9)`` or in a deadlock)."""
    if death_signal and sys.platform.startswith("linux"):
        try:
            import ctypes  # worker start-up: Linux only, and only in a worker
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass

    def watch():
        while os.getppid() == driver_pid:
            time.sleep(WATCHDOG_PERIOD)
        os._exit(1)

    threading.Thread(target=watch, name="modelscape-driver-watchdog", daemon=True).start()


def _quit(code: int = 0) -> None:
    """Leave at once: the interpreter's teardown (torch's included) takes seconds and a worker has nothing to
    save, so a pool shuts down in a fraction of the time."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


def _warm_up() -> None:
    """Pay torch's one-off lazy imports (the first optimizer step imports torch._dynamo, seconds) before the
    worker says it is ready, so no job's wall time carries them."""
    import torch  # worker start-up: imported by the worker after its watchdog runs

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.0)
    p.sum().backward()
    opt.step()
