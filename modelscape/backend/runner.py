"""Run one unit of work in this process: one job, or a fused group trained together. Never raises.

Every executor calls ``run_unit`` where its jobs run (the in-process executor in the driver, a pool worker, a Ray
task), so a unit runs the same way everywhere: its progress messages and the lines it prints go to the driver
through ``on_live`` / ``on_output``, and whatever happens to a job comes back as a record (``records``).
"""
from __future__ import annotations

import time

from modelscape.backend import live
from modelscape.backend.fused import run_group
from modelscape.backend.job import run_config_safe, run_resolved_safe
from modelscape.backend.records import failed_record, group_record

__all__ = ["run_unit"]


def run_unit(context: tuple, work: dict, device="cpu", on_live=None, on_output=None) -> dict:
    """Run the unit ``work`` (``JobSpec.work()``: axes, overrides, members, resolved) with the sweep's
    ``context`` (``(config, bfn_config)``) on ``device``; return the job's record, or for a fused group
    ``records.group_record`` of its members'. ``on_live(message)`` hears its progress and ``on_output(stream,
    text)`` its printed lines, labelled with its axis values (None: nobody listens)."""
    config, bfn_config = context
    axes, members, resolved = work["axes"], work.get("members"), work.get("resolved", False)
    t0 = time.perf_counter()
    with live.capture_output(on_output), live.reporting(on_live, live.axes_label(axes)):
        if members:
            try:
                jobs = [({**config, **overrides}, member_axes) for member_axes, overrides in members]
                return group_record(run_group(jobs, bfn_config, device, resolved=resolved))
            except Exception as e:  # run_group fails jobs, not itself; should it raise anyway, the unit fails
                return failed_record({}, e, device, time.perf_counter() - t0)
        run = run_resolved_safe if resolved else run_config_safe
        return run({**config, **work["overrides"]}, bfn_config, device, axes)
