"""The driver's engine: claim each job in the store, dispatch units of work to an executor, store each record.

``run_jobs`` is the loop a sweep's driver runs (``job_iterator.main`` locally, each Slurm array task on its
node): the jobs still to run are planned into units (``plan_sweep``: single jobs and fused groups, a group at most
a worker's share of the sweep, the plan recorded in the store for a resumed sweep to reuse), each job is claimed
right before its unit is submitted (so several drivers on one store share the work), and a unit's records are
stored together, in one transaction, the moment they arrive.
"""
from __future__ import annotations

import sys
import threading
import time
import uuid
import warnings
from collections import deque

from modelscape.backend import checkpoints
from modelscape.backend.beside import spill_records
from modelscape.backend.board import LiveBoard
from modelscape.backend.executors import JobSpec
from modelscape.backend.identity import jsonable
from modelscape.backend.plan import plan_units
from modelscape.backend.records import failed_record, split_records
from modelscape.backend.store import Driver, StoreError, StoreLost

__all__ = ["run_jobs", "plan_sweep", "store_location"]

_INTERNAL = ("oom",)


def run_jobs(executor, jobs, ids, codes, todo, st, context, since, claim_timeout, board=None, units=None):
    """The engine's loop: run the jobs ``todo`` (indices into ``jobs``, a list of ``(axes, overrides,
    config)``, resolved by the driver) on ``executor`` and yield ``(index, record)`` as each finishes, its record
    stored in ``st`` (None: keep nothing) the moment it arrives. ``context`` is ``(config, bfn_config)``, the
    config resolved as every job's is (each job's ``config`` is it with the job's ``overrides``). A job that
    another driver on ``st`` stored meanwhile is yielded with that driver's record. Close the generator to
    release this driver's claims early.

    A record the store refuses is kept all the same (``Store.keep``: retried, then spilled beside the store for
    the next run to import), with a warning naming the database's own error; the sweep goes on. A store whose
    file is deleted or replaced, or whose write-ahead log vanishes, stops the sweep (``StoreLost``), after the
    records this run stored have been spilled again (the lost log may have held them).

    ``board`` (a ``board.LiveBoard``; default, one without a progress bar) receives the running jobs' progress
    messages and lines of output from the executor, and writes their partial records to ``st``. ``units``: the
    sweep's units of work (``plan_sweep``), if planned already."""
    if board is None:
        every = jobs[todo[0]][2]["LIVE_EVERY"] if todo else 0
        board = LiveBoard(jobs, ids, todo, st, every)
    hooks = getattr(executor, "on_live", None), getattr(executor, "on_output", None)
    executor.on_live, executor.on_output = board.receive, board.echo
    # A fresh id per run: id(context) can be reused by a later sweep once this one's context is freed, and
    # a reused executor's workers would then run that sweep with this sweep's (stale) config.
    context_id = uuid.uuid4().hex

    where = store_location(st)

    def overrides(i):  # the worker learns the job's store id: its checkpoints and live progress are filed by it
        return {**jobs[i][1], "JOB_ID": ids[i] or "", **where}

    def spec_of(unit):
        if len(unit) == 1:
            return JobSpec(unit[0], jobs[unit[0]][0], overrides(unit[0]), context_id, context, resolved=True)
        # a fused group: its members travel together, trained as one stacked model (modelscape.backend.fused)
        return JobSpec(unit[0], {}, {}, context_id, context, members=[(jobs[i][0], overrides(i)) for i in unit],
                       resolved=True)

    # Units of work: single jobs, and groups of jobs trained together as one stacked model (FUSE)
    units = plan_sweep(executor, jobs, ids, todo, st, units)
    root = st.path.parent if st is not None else None

    def accept(i, record) -> bool:  # a record another driver stored: does it hold the checkpoints asked for here?
        return checkpoints.satisfied(record, jobs[i][2], root)

    dispatch = _dispatch(executor, spec_of, units, ids, st, since, claim_timeout, accept)
    stored = []  # this run's records in the store: spilled again should the store's file be lost
    try:
        for unit, records, ran_here in dispatch:
            if ran_here:
                for i, record in zip(unit, records):
                    for k in _INTERNAL:
                        record.pop(k, None)
                    record["job_id"] = ids[i]
                    record["axes"] = jobs[i][0]
                    if st is not None:
                        record["code"] = codes[i]
                if st is not None:  # a group's records land together: a crash never leaves part of a group
                    records = _store_records(st, records, [jobs[i][2] for i in unit], stored)
            for i, record in zip(unit, records):
                board.finished_job(i, record)
                yield i, record
        if st is not None:
            st.check_file()  # a log deleted after the last write took that write with it
    except StoreLost as e:
        raise StoreLost(f"{e}. The sweep stops here; {st.salvage()}; {_respill(st, stored)}") from None
    finally:
        executor.on_live, executor.on_output = hooks
        dispatch.close()


def plan_sweep(executor, jobs, ids, todo, st, units=None, workers: int | None = None) -> list:
    """The units of work of the jobs ``todo`` (``plan.plan_units``): fused groups of at most a worker's share of
    the sweep (``workers``: default, the executor's slots), or ``units`` if planned before (a Slurm shard's).

    The plan is recorded in the store ``st`` (None: nowhere), and the plan an earlier run recorded is reused: a
    resumed sweep trains each missing group with the members the first run gave it, whatever its number of
    workers, so its numbers are the first run's to the bit."""
    configs = [(i, jobs[i][2]) for i in range(len(jobs))]
    previous = None
    if st is not None and units is None:
        index = {job_id: i for i, job_id in enumerate(ids)}
        recorded = st.units(ids)
        if recorded:
            previous = [[index[j] for j in unit] for unit in recorded if all(j in index for j in unit)]
    workers = len(getattr(executor, "slots", None) or [None]) if workers is None else workers
    units = plan_units(configs, todo, units, workers=workers, previous=previous)
    if st is not None:
        try:
            st.record_units([[ids[i] for i in unit] for unit in units if len(unit) > 1])
        except Exception as e:  # the sweep can run without it; a resume may then group the jobs differently
            warnings.warn(f"the sweep's fused groups could not be recorded in {st.path} ({type(e).__name__}: {e}); "
                          "a resumed sweep may group its jobs differently (equal up to float32 rounding)",
                          stacklevel=2)
    return units


def store_location(st) -> dict:
    """RESULTS_DIR and EXPT_NAME naming the directory of the store ``st`` (given as a path of its own, or a shard
    file beside results.db), so that what a job files beside the store (checkpoints) lands beside it."""
    if st is None:
        return {}
    directory = st.path.resolve().parent
    # STORE_FILE keys the checkpoint folder: two store files in one folder never share checkpoints/<id>
    return {"RESULTS_DIR": str(directory.parent), "EXPT_NAME": directory.name, "STORE_FILE": st.path.name}


def _window(executor) -> int:
    """How many jobs to keep submitted (and claimed) at once: one per slot and a few queued, so that a slot
    never waits for the driver and another driver still finds most jobs unclaimed."""
    return len(getattr(executor, "slots", None) or [None]) + 2


def _dispatch(executor, spec_of, units, ids, st, since, stale_after, accept=None):
    """Run ``units`` (lists of job indices: one job, or a fused group) on ``executor``, about ``_window`` of them
    submitted at a time; yield ``(indices, records, ran_here)`` as each unit finishes (a job another driver ran:
    a unit of its own).

    With a store, each job is claimed right before its unit is submitted: a job a live driver holds is left
    out of its unit and looked at again every second, until that driver has stored it (yielded with
    ``ran_here`` False, its record read from the store) or has died (its claim is taken over and the job runs
    here, in one unit with the jobs of its unit that driver held too). A unit's claims are released once the
    caller has stored its records (on the generator's next step), and all at the end. ``accept(index, record)``
    says whether another driver's record of a job will do (it may lack the checkpoints this sweep asks for:
    then the job runs here too).
    """
    pending, waiting, inflight = deque(units), [], {}
    claims = _Claims(st, stale_after) if st is not None else None
    window, poll = _window(executor), min(1.0, stale_after / 10)
    next_poll = time.monotonic() + poll
    try:
        while pending or waiting or inflight:
            while pending and len(inflight) < window:
                claimed, busy = [], []
                for i in pending.popleft():
                    outcome = claims.claim(ids[i], since, lambda r, i=i: accept is None or accept(i, r)) \
                        if claims is not None else "claimed"
                    if outcome == "busy":
                        busy.append(i)
                    elif outcome == "stored":
                        yield [i], [claims.record(ids[i])], False
                    else:
                        claimed.append(i)
                if busy:  # together: should their driver die, they are taken over as the group it was training
                    waiting.append(busy)
                if claimed:
                    inflight[executor.submit(spec_of(claimed))] = claimed
            if inflight:
                for fut in _finished(executor, inflight):
                    unit = inflight.pop(fut)
                    yield unit, split_records(fut.result(), len(unit)), True
                    if claims is not None:
                        claims.release([ids[i] for i in unit])
            elif waiting:
                time.sleep(max(0.0, next_poll - time.monotonic()))
            if waiting and not pending and time.monotonic() >= next_poll:
                pending.extend(waiting)
                waiting.clear()
                next_poll = time.monotonic() + poll
    finally:
        if claims is not None:
            claims.close()


def _finished(executor, inflight) -> list:
    """The submitted futures that are done: those done already (an executor may finish several at once and
    hand over only the first), else the next one ``as_completed`` gives."""
    done = [f for f in inflight if f.done()]
    if done:
        return done
    for fut in executor.as_completed(list(inflight)):
        return [fut] + [f for f in inflight if f.done() and f is not fut]
    raise RuntimeError(f"the executor {executor!r} returned no result for {len(inflight)} submitted jobs")


class _Claims:
    """This driver's claims on one store, kept alive by a heartbeat thread until ``close``."""

    def __init__(self, st, stale_after):
        self.st, self.stale_after = st, stale_after
        self.driver = Driver.start()
        self.owners = set()  # other drivers already named to the user
        self.said = set()  # notes already printed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="modelscape-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self):
        while not self._stop.wait(max(0.2, self.stale_after / 6)):
            try:
                self.st.heartbeat(self.driver)
            except Exception:  # busy or closing: the next beat tries again, well within stale_after
                pass

    def claim(self, job_id, since, accept=lambda record: True) -> str:
        try:
            outcome, owner = self.st.claim(job_id, self.driver, since, self.stale_after)
            if outcome == "stored":
                found = self.st.records([job_id])
                if not found or not accept(found[0]):  # damaged, or stored without the checkpoints asked here
                    if found:
                        self._say("stored jobs without the checkpoints this sweep asks for (another driver's "
                                  "CHECKPOINTS differ): they train again here, to keep them")
                    outcome, owner = self.st.claim(job_id, self.driver, None, self.stale_after)
        except StoreLost:
            raise
        except StoreError as e:  # a full disk, a lock held too long: run the job unclaimed rather than not at all
            self._say(f"cannot claim jobs in the store ({e.__cause__ or e}): jobs run unclaimed (a second driver "
                      "on this store may train them too)")
            return "claimed"
        if owner is not None and owner["driver"] not in self.owners:
            self.owners.add(owner["driver"])
            what = ("is running jobs of this sweep: they are left to it, and taken over if it stops"
                    if outcome == "busy" else "stopped (its heartbeat or process is gone): its jobs are taken over")
            print(f"modelscape: another driver ({owner['host']} pid {owner['pid']}) {what}", file=sys.stderr)
        return outcome

    def _say(self, text):
        if text not in self.said:
            self.said.add(text)
            print(f"modelscape: {text}", file=sys.stderr)

    def record(self, job_id) -> dict:
        return self.st.records([job_id])[0]

    def release(self, job_ids=None):
        try:
            self.st.release(self.driver, job_ids)
        except StoreError as e:  # claims left behind are taken over once this driver has stopped
            self._say(f"cannot release claims in the store ({e.__cause__ or e})")

    def close(self):
        self._stop.set()
        self._thread.join()
        try:
            self.release()
        finally:
            self.driver.stop()


def _store_records(st, records, cfgs, stored=None) -> list:
    """Store a unit's records in one transaction (a crash stores all of them or none) with ``Store.keep``: a
    write the store refuses is retried, then spilled beside it, and the records come back unchanged either way.
    A record the store cannot encode (an object-dtype grab) becomes a failed job (``_store_record``)."""
    stored = [] if stored is None else stored
    for record, cfg in zip(records, cfgs):
        record["config"] = jsonable(cfg)
    try:
        _kept(st, records, st.keep(records))
        stored += records
        return records
    except OSError as e:  # neither the store nor a spill file took them: they live on in this run's results
        _kept(st, records, f"{e}: it is in the results this sweep returns only, and the next run trains it again")
        return records
    except (StoreError, ValueError) as e:
        if isinstance(e, StoreLost):
            raise
        if len(records) == 1:
            return [_refused(st, records[0], e)]
    return [_store_record(st, record, stored) for record in records]


def _store_record(st, record, stored):
    try:
        _kept(st, [record], st.keep([record]))
        stored.append(record)
        return record
    except OSError as e:
        _kept(st, [record], f"{e}: it is in the results this sweep returns only, and the next run trains it again")
        return record
    except StoreLost:
        raise
    except (StoreError, ValueError) as e:
        return _refused(st, record, e)


def _kept(st, records, note) -> None:
    """Warn, once per unit, when the records are not in the store itself (``note``: where they went, and why)."""
    if note is not None:
        axes = ", ".join(str(r["axes"]) for r in records)
        warnings.warn(f"job {axes}: the result {note}", stacklevel=4)


def _refused(st, record, e):
    """A record the store cannot encode becomes a failed job, in memory and (where possible) on disk."""
    failed = failed_record(record["axes"], e, record.get("device", "cpu"), record.get("wall_time", 0.0),
                           error=f"the result could not be stored: {type(e).__name__}: {e}")
    failed.pop("oom", None)
    failed.update(job_id=record["job_id"], config=record["config"])
    warnings.warn(f"job {record['axes']}: {failed['error']}", stacklevel=4)
    try:
        st.keep([failed])
    except (StoreError, OSError):
        pass  # the store itself is broken: the sweep's results still come back in memory
    return failed


def _respill(st, stored) -> str:
    try:
        where = spill_records(st.path, stored)
    except OSError as e:
        return f"the {len(stored)} results it had stored could not be spilled ({e}): they are lost"
    if not stored:
        return "it had stored no result"
    return (f"the {len(stored)} results it had stored were spilled to {where}: the next run on {st.path} imports "
            "them")
