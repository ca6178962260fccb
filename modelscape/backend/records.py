"""The record contract between a worker and its driver: a failed job's record, and a unit's result split per job.

A job's record is a plain dict (``job.run_config`` says what a finished one holds). A unit of work (one job, or
a fused group trained together) comes back from its executor as one record: the job's own, a group's
``{"status": "group", "records": [...]}``, or one ``failed``/``crashed``/``timeout`` record standing for every
member when the unit failed as a whole (its worker died, or it ran out of time).

Imports nothing from modelscape, and not torch either: the pool's driver side reads these records before any
job has run.
"""
from __future__ import annotations

import sys
import traceback

__all__ = ["failed_record", "caused_by_oom", "group_record", "split_records"]


def failed_record(axes: dict | None, exc: BaseException, device="cpu", wall_time=0.0, error=None) -> dict:
    """The record of a job that raised: status ``failed``, the traceback in ``error`` (or ``error`` as given)."""
    return dict(status="failed", error=error or "".join(traceback.format_exception(exc)), axes=dict(axes or {}),
                device=str(device), wall_time=wall_time, steps=0, timekeys=None, thresholds=None,
                train_loss=float("nan"), test_loss=float("nan"), grabs={},
                oom=caused_by_oom(exc))


def caused_by_oom(exc) -> bool:
    """Whether ``exc``, or an exception it was raised from, is torch's CUDA out-of-memory error."""
    torch = sys.modules.get("torch")  # no torch loaded: no torch error either
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if oom is None:
        return False
    # a grab's OOM arrives wrapped in the trainloop's RuntimeError naming the grab
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, oom):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def group_record(records: list) -> dict:
    """The one record a fused group's unit hands back: its members' records, in order; ``oom`` set when a
    member ran out of device memory (the executor then retries the unit on a fresh worker)."""
    return {"status": "group", "records": records, "oom": any(r.get("oom") for r in records)}


def split_records(record: dict, n: int) -> list:
    """The ``n`` member records of a unit's record: those ``group_record`` holds, or, for a unit that failed as a
    whole (its worker crashed or timed out), a copy of that failure for each member."""
    if record.get("status") == "group":
        return record["records"]
    return [dict(record) for _ in range(n)]
