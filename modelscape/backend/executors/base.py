"""The executor interface and the unit of work it runs."""
from __future__ import annotations

import os
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Iterable, Iterator

__all__ = ["Executor", "JobSpec", "cpu_cores", "idle_cores", "default_threads"]


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one, as under taskset or Slurm)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def idle_cores() -> int:
    """The cores this process may use, less those busy with other work (the 1-minute load average, rounded),
    at least 1."""
    try:
        busy = round(os.getloadavg()[0])
    except (AttributeError, OSError):  # no load average (Windows)
        busy = 0
    return max(1, cpu_cores() - busy)


def default_threads(concurrent_jobs: int) -> int:
    """Torch threads per job when THREADS is 0: the idle cores shared by the jobs that run at once, at least 1.

    More threads than free cores make OpenMP threads wait on each other: on a 2-core machine shared with other
    work, a small job ran 13 to 27 times slower with 2 threads than with 1 (measured in one process); one thread
    too few costs at most the parallel speed-up."""
    return max(1, idle_cores() // max(1, concurrent_jobs))


@dataclass
class JobSpec:
    """One unit of work: the sweep's shared context (``context_id``, the same object for every unit of a sweep,
    so it is shipped to a worker once) and this unit's own part: one job's axis values and config overrides, or,
    for a fused group, its ``members`` (``(axes, overrides)`` each, trained together as one stacked model).

    ``resolved``: the context's config and the overrides are resolved already (the sweep engine resolves every
    job's config once, in the driver); otherwise the worker resolves them as ``run_config`` does.
    """

    index: int
    axes: dict
    overrides: dict
    context_id: object  # unique per sweep (hashable)
    context: tuple = field(repr=False)  # (global_config, bfn_config)
    retries: int = 0  # CUDA out-of-memory retries so far
    size: int = 1  # jobs in this unit of work (a fused group holds several); JOB_TIMEOUT scales with it
    crashes: list = field(default_factory=list)  # how each earlier attempt ended its worker (one line each)
    members: list | None = None  # a fused group: [(axes, overrides), ...]; None: the one job above
    resolved: bool = False

    def __post_init__(self):
        if self.members:
            self.size = len(self.members)

    def work(self) -> dict:
        """What a worker needs besides the context to run this unit (``runner.run_unit``'s ``work``)."""
        return {"axes": self.axes, "overrides": self.overrides, "members": self.members, "resolved": self.resolved}


class Executor:
    """``submit(spec) -> Future`` of a record; ``as_completed(futures)`` yields them as they finish.

    While a sweep runs, its driver sets ``on_live(message)`` (a running job's progress, see
    ``modelscape.backend.live``) and ``on_output(stream_name, text)`` (whole lines a job printed, prefixed with
    its axis values); an executor that can, delivers them from within ``as_completed``. None: nobody listens.
    """

    on_live = None
    on_output = None

    def submit(self, spec: JobSpec) -> Future:
        raise NotImplementedError

    def as_completed(self, futures: Iterable[Future]) -> Iterator[Future]:
        raise NotImplementedError

    def in_flight(self) -> int:
        """How many jobs are running right now (lost if the sweep is interrupted): every job of a fused group
        in flight counts, not the group once."""
        return 0

    def cancel(self) -> None:
        """Drop every job submitted and not finished (an interrupted sweep); the executor stays usable."""

    def shutdown(self, now: bool = False) -> None:
        """Release the workers; ``now`` kills them at once (an interrupted sweep) instead of asking."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
