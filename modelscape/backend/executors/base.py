"""The executor interface and the unit of work it runs."""
from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Iterable, Iterator


@dataclass
class JobSpec:
    """One job: the sweep's shared context (``context_id``, the same object for every job of a sweep, so
    it is shipped to a worker once) and this job's own axis values and config overrides."""

    index: int
    axes: dict
    overrides: dict
    context_id: object  # unique per sweep (hashable)
    context: tuple = field(repr=False)  # (global_config, bfn_config)
    retries: int = 0


class Executor:
    """``submit(spec) -> Future`` of a record; ``as_completed(futures)`` yields them as they finish."""

    def submit(self, spec: JobSpec) -> Future:
        raise NotImplementedError

    def as_completed(self, futures: Iterable[Future]) -> Iterator[Future]:
        raise NotImplementedError

    def shutdown(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
