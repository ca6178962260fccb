"""Deadlines that stretch on a busy machine.

A test that waits for something to happen (a job running, a process gone, a line in a log) polls until a
deadline only so that it fails instead of hanging for ever. On a quiet 2-core machine the event comes within
seconds; on a laptop busy with other work everything takes longer, and a fixed deadline then fails a correct
program. So every deadline here is a quiet machine's number times ``slowness()``, measured while the tests run.

``MODELSCAPE_TEST_SLOWNESS=4`` sets the factor by hand (a machine known to be slow, or a debugger).
"""
import functools
import os
import statistics
import time

__all__ = ["slowness", "scaled", "PROBE_QUIET_SECONDS"]

# The probe's median wall time on the 2-core development machine when a core was free for it (measured 0.017
# to 0.022 s at a load average of 1.1); a busier or slower machine takes longer by the factor it is slower.
PROBE_QUIET_SECONDS = 0.022


def _probe() -> float:
    """Wall time of a fixed piece of pure-Python work (one core's speed, as the scheduler shares it now)."""
    t0 = time.perf_counter()
    s = 0
    for i in range(300_000):
        s += i * i % 7
    return time.perf_counter() - t0


@functools.lru_cache(maxsize=1)
def _probed() -> float:
    return statistics.median(_probe() for _ in range(5)) / PROBE_QUIET_SECONDS


def slowness() -> float:
    """How many times slower than a quiet 2-core machine this one runs now, at least 1: the larger of the
    probe's ratio (measured once per process) and the 1-minute load average per core (read at each call, since
    the load changes during a run). ``MODELSCAPE_TEST_SLOWNESS`` overrides both."""
    forced = os.environ.get("MODELSCAPE_TEST_SLOWNESS")
    if forced:
        return max(1.0, float(forced))
    try:
        per_core = os.getloadavg()[0] / (os.cpu_count() or 1)
    except (AttributeError, OSError):  # no load average (Windows)
        per_core = 1.0
    return max(1.0, _probed(), per_core)


def scaled(seconds: float) -> float:
    """``seconds`` (enough on a quiet 2-core machine, with a margin) stretched by ``slowness()``."""
    return seconds * slowness()
