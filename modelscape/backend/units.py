"""A sweep's planned units of work as rows of the store: which jobs train together as one fused group.

A member's float32 rounding can depend on its group, and the groups depend on the number of workers of the run
that planned them (``plan.plan_units``), so a resumed sweep must train each missing group as the first run
planned it. The driver records its plan (``Store.record_units``) and a later run reads it back
(``Store.units``). One row per job: the job's id, its unit's key (a hash of the unit's job ids) and the unit's
size, so that a unit some of whose jobs were planned again into other units reads back as incomplete, and is not
used.
"""
from __future__ import annotations

import hashlib

__all__ = ["UNITS_SQL", "UNIT_INSERT", "UNIT_SELECT", "unit_rows", "whole_units"]

# Added to any store a writer opens (older readers ignore it), as the ``live`` table: no new schema version.
UNITS_SQL = """
CREATE TABLE IF NOT EXISTS units (
    job_id TEXT PRIMARY KEY,
    unit   TEXT NOT NULL,
    size   INTEGER NOT NULL
)
"""
UNIT_INSERT = "INSERT OR REPLACE INTO units (job_id, unit, size) VALUES (?, ?, ?)"
UNIT_SELECT = "SELECT job_id, unit, size FROM units"


def unit_rows(units) -> list[tuple]:
    """The rows recording ``units`` (lists of job ids): ``(job id, unit key, unit size)``."""
    rows = []
    for unit in units:
        ids = sorted(str(j) for j in unit)
        key = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:24]
        rows += [(j, key, len(ids)) for j in ids]
    return rows


def whole_units(rows, job_ids) -> list[list[str]]:
    """The units (lists of job ids) in ``rows`` that hold any of ``job_ids`` and whose every job is still
    recorded in them."""
    wanted = set(job_ids)
    members, sizes = {}, {}
    for job_id, key, size in rows:
        members.setdefault(key, []).append(job_id)
        sizes[key] = size
    return [sorted(ids) for key, ids in members.items()
            if len(ids) == sizes[key] and not wanted.isdisjoint(ids)]
