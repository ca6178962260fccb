"""The sweep: expand the cartesian product, skip what is stored, claim, dispatch, collect, store, report."""
from __future__ import annotations

import itertools
import numbers
import os
import sys
import threading
import time
import uuid
import warnings
from collections import deque

from modelscape.backend import checkpoints
from modelscape.config import ALIASES, BY_NAME, ConfigError, canonicalize, check_job_config, close_matches, \
    signature_names
from modelscape.backend.executors import JobSpec, make_executor
from modelscape.backend.fused import group_overrides, plan_units, split_records
from modelscape.backend.job import consumers
from modelscape.backend.live import LiveBoard
from modelscape.backend.tensorboard import require_tensorboard, start_sweep as start_tensorboard
from modelscape.results import SweepResults, axis_label

# Axis names understood by name, as in the seed: the sample-size axis and the trial axis.
AXIS_ALIASES = {"ntrain": "N_SAMPLES", "n_train": "N_SAMPLES", "bsz": "N_SAMPLES", "n_samples": "N_SAMPLES",
                "lr": "LR", "gamma": "GAMMA", "TRIAL": "trial", "trials": "trial", **ALIASES}
TRIAL = "trial"
_INTERNAL = ("oom",)


class SweepFailed(RuntimeError):
    """Every job of a sweep failed. ``.result`` holds the SweepResults (each record's ``error`` has its
    traceback). A script that does not catch it ends with this one line on stderr and exit status 1."""

    def __init__(self, message, result=None):
        super().__init__(message)
        self.result = result


def _one_line_for_sweep_failed(previous):
    def hook(exc_type, exc, tb):
        if issubclass(exc_type, SweepFailed):
            print(f"error: {exc}", file=sys.stderr)
        else:
            previous(exc_type, exc, tb)
    hook._modelscape = True
    return hook


if not getattr(sys.excepthook, "_modelscape", False):
    # scripts written for the original end with their sweep: an all-failed sweep must stop them with a clear
    # line and a non-zero status, not a page of traceback (the errors were already summarised) nor exit 0
    sys.excepthook = _one_line_for_sweep_failed(sys.excepthook)


def axis_target(name: str, known: set) -> str:
    """The config key an axis writes: a schema name, ``trial``, or a user key some consumer names."""
    if name == TRIAL or name in BY_NAME:
        return name
    if name in AXIS_ALIASES:
        return AXIS_ALIASES[name]
    if name in known:
        return name
    close = close_matches(name)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"unknown axis name {name!r}: it is not a hyperparameter, not 'trial', and no model class, "
                      f"batch function or grab has a parameter of that name{hint}")


def _materialize(iterators, iterator_names):
    # Without names no axis could reach anything (the old default iter_0, iter_1 ... is no known name).
    if iterator_names is None or isinstance(iterator_names, (str, bytes)):
        raise TypeError(f"iterator_names is {iterator_names!r}: give a list with one name per iterator, e.g. "
                        "['WIDTH', 'LR', 'trial']")
    iterators = list(iterators)
    if len(iterator_names) != len(iterators):
        raise ValueError(f"{len(iterators)} iterators but {len(iterator_names)} iterator_names "
                         f"({list(iterator_names)}); give one name per iterator")
    if len(set(iterator_names)) != len(iterator_names):
        raise ValueError(f"iterator_names repeat a name: {list(iterator_names)}")
    values = []
    for name, it in zip(iterator_names, iterators):
        if isinstance(it, (str, bytes)) or not hasattr(it, "__iter__"):
            raise TypeError(f"iterator {name!r} is {it!r}, not a list, range or generator of values")
        vals = list(it)
        if not vals:
            raise ValueError(f"iterator {name!r} is empty: the sweep would run no job")
        if name == TRIAL and not all(isinstance(v, numbers.Integral) for v in vals):
            raise TypeError(f"the trial axis takes integers (its seeds derive from them), got {vals!r}")
        labels = [axis_label(v) for v in vals]
        repeated = [lab for k, lab in enumerate(labels) if lab in labels[:k]]
        if repeated:
            raise ValueError(f"iterator {name!r} repeats the value(s) {repeated} (as coordinate labels): every job "
                             "of a sweep must be a different combination")
        values.append(vals)
    return list(iterator_names), values


def main(iterators, iterator_names=None, global_config=None, bfn_config=None, use_mp=None, *,
         executor=None, store=None, resume=None, progress=True):
    """Run every combination of the iterators and return the labelled results (``SweepResults``).

    Args:
        iterators: lists, ranges or generators of axis values, e.g. ``[widths, lrs, range(NUM_TRIALS)]``.
        iterator_names: one name per iterator. A name is a hyperparameter (``WIDTH``, ``LR``, ``GAMMA`` ...),
            the sample-size axis (``N_SAMPLES``; aliases ``ntrain``, ``bsz``), the trial axis (``trial``), or
            a parameter of the model class, base batch function or a grab.
        global_config: the hyperparameters (``vars(parse_args())``), ``otherreturns`` grabs and user keys.
        bfn_config: ``base_bfn`` (or ``bfn_file`` + ``bfn_name``) and the batch function's arguments.
        use_mp: the seed's switch: True = worker pool, False = in-process, None = EXECUTOR from the config.
        executor: an ``Executor`` instance, or ``'auto' | 'pool'`` (each job in a worker process: the default)
            or ``'inprocess'`` (for debugging: unprotected from a job that crashes or hangs).
        store: a path, a ``Store``, None (RESULTS_DIR/EXPT_NAME from the config) or False (keep nothing).
        resume: skip jobs already stored as done (default: RESUME from the config).
        progress: show a progress bar and the closing summary.

    Each job's config is a copy of ``global_config`` updated with its axis values. Its seeds derive from
    SEED and its trial only, so results do not depend on the executor or the number of workers.

    Ctrl-C stops the sweep with one line (jobs done, jobs lost in flight): exit status 130 from a script, a
    ``KeyboardInterrupt`` in an interactive session. The stored jobs are kept; a re-run resumes.

    Raises ``SweepFailed`` (results attached) if every job failed.
    """
    global_config = dict(global_config or {})
    bfn_config = dict(bfn_config or {})
    # Start the workers first: they spawn and import torch (seconds) while this process validates and hashes.
    if use_mp is not None and executor is None:
        executor = "pool" if use_mp else "inprocess"
    own_executor = executor is None or isinstance(executor, str)
    if own_executor:
        executor = _make_executor(executor, global_config)
    try:
        return _run_sweep(iterators, iterator_names, global_config, bfn_config, executor, own_executor, store,
                          resume, progress)
    finally:
        if own_executor and executor != "slurm":
            executor.shutdown()


def _make_executor(kind, global_config):
    """The executor the config asks for, from its execution keys alone (checked here, before the rest);
    ``"slurm"`` as it is, since Slurm takes the whole sweep (``executors.slurm``), not single jobs."""
    keys = ("EXECUTOR", "DEVICES", "WORKERS_PER_DEVICE", "THREADS", "JOB_TIMEOUT", "RAY_ADDRESS")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # said once, by the full validation that follows
        cfg = canonicalize({k: v for k, v in global_config.items() if k in keys}, where="global_config")
    check_job_config(cfg)
    kind = kind or cfg["EXECUTOR"]
    if kind == "slurm":
        return kind
    return make_executor(kind, cfg["DEVICES"], cfg["WORKERS_PER_DEVICE"], cfg["THREADS"], cfg["JOB_TIMEOUT"],
                         cfg["RAY_ADDRESS"])


def _run_sweep(iterators, iterator_names, global_config, bfn_config, executor, own_executor, store, resume,
               progress):
    names, values = _materialize(iterators, iterator_names)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fns = consumers(global_config, bfn_config)
        known = set().union(*(signature_names(f) for f in fns)) if fns else set()
        targets = {n: axis_target(n, known) for n in names}
        # Validate the global config and every job's config before anything runs: a typo costs seconds.
        base = canonicalize(global_config, fns, where="global_config", extra_known=targets.values())
    for w in caught:
        warnings.warn(w.message, w.category, stacklevel=2)
    jobs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # said once above for the global config
        for combo in itertools.product(*values):
            axes = dict(zip(names, combo))
            # trial too, so that a model, batch function or grab that names ``trial`` receives it
            overrides = {targets[n]: v for n, v in axes.items()}
            cfg = canonicalize({**base, **overrides}, fns, where=f"job {axes}", extra_known=targets.values())
            check_job_config(cfg)
            jobs.append((axes, overrides, cfg))

    check_names(jobs)
    checkpoints.check_sweep([cfg for _, _, cfg in jobs], store is not False)
    if any(cfg.get("TENSORBOARD") for _, _, cfg in jobs):
        require_tensorboard()  # before the store exists: a missing extra leaves nothing behind
    if resume is None:
        resume = base["RESUME"]
    st, own_store = _open_store(store, base)
    # TENSORBOARD=True: tensorboard installed, the experiment's hparams summary written where the jobs write
    where = _store_location(st)
    start_tensorboard([(axes, overrides, {**cfg, **where}) for axes, overrides, cfg in jobs])
    store_dir = st.path.parent if st is not None else None
    ids, codes = _identities(st, jobs, bfn_config)
    since = time.time()  # records written from now on by another driver count as this sweep's
    if st is not None:
        labels = [[axis_label(v) for v in vals] for vals in values]
        st.begin_sweep(names, labels, ids, meta=sweep_meta(base, set(targets.values())))
    records = _stored_records(st, ids, base["RETRY_FAILED"]) if resume else {}
    if store_dir is not None:  # checkpoints are not part of a job's identity: a job lacking some runs again
        records = checkpoints.keep_satisfied(records, jobs, ids, store_dir)
    todo = [i for i, job_id in enumerate(ids) if job_id is None or job_id not in records]
    if executor == "slurm":  # the whole sweep goes to Slurm array tasks, each running run_jobs on its node
        from modelscape.backend.executors.slurm import run_sweep
        try:
            records.update(run_sweep(jobs, ids, codes, todo, st, (global_config, bfn_config), base))
        finally:
            if own_store:
                st.close()
        return _result(names, values, ids, records, progress, store_dir)

    board = LiveBoard(jobs, ids, todo, st, base["LIVE_EVERY"], bar=progress,
                      stored=[r["status"] for r in records.values()])
    run = None
    try:
        run = run_jobs(executor, jobs, ids, codes, todo, st, (global_config, bfn_config), since,
                       base["CLAIM_TIMEOUT"], board)
        for i, record in run:
            records[ids[i] if ids[i] is not None else i] = record
    except KeyboardInterrupt:
        board.close()
        lost = executor.in_flight()
        if own_executor:
            executor.shutdown(now=True)
        else:  # a pool the caller passed in stays theirs, and usable
            executor.cancel()
        _interrupted(len(records), len(jobs), lost, st is not None, after_bar=progress)
    finally:
        if run is not None:
            run.close()  # stops the heartbeat and releases this driver's claims now, even on an error
        board.close()
        if own_store:
            st.close()
    return _result(names, values, ids, records, progress, store_dir)


def _result(names, values, ids, records, progress, store_dir=None) -> SweepResults:
    """The sweep's SweepResults in product order (``records`` keyed by job id, or by index without a store);
    ``SweepFailed`` if every job failed."""
    order = ids if ids and ids[0] is not None else list(range(len(ids)))
    result = SweepResults(names, values, [records[k] for k in order if k in records], store_dir=store_dir)
    if progress:
        print(summary(result), file=sys.stderr)
        disk = checkpoints.disk_line(store_dir) if store_dir is not None else None
        if disk:
            print(disk, file=sys.stderr)
    if result.records and all(r["status"] == "failed" for r in result.records):
        first = (result.failed()[0].get("error") or "").strip().splitlines()
        raise SweepFailed(f"all {len(result.records)} jobs of the sweep failed; the first with: "
                          f"{first[-1] if first else 'unknown error'}", result)
    return result


def run_jobs(executor, jobs, ids, codes, todo, st, context, since, claim_timeout, board=None, units=None):
    """The engine's loop: run the jobs ``todo`` (indices into ``jobs``, a list of ``(axes, overrides,
    config)``) on ``executor`` and yield ``(index, record)`` as each finishes, its record stored in ``st``
    (None: keep nothing) the moment it arrives. ``context`` is ``(global_config, bfn_config)``. A job that
    another driver on ``st`` stored meanwhile is yielded with that driver's record. Close the generator to
    release this driver's claims early.

    ``board`` (a ``live.LiveBoard``; default, one without a progress bar) receives the running jobs' progress
    messages and lines of output from the executor, and writes their partial records to ``st``. ``units``: the
    sweep's units of work (``fused.plan_units``), if planned already."""
    if board is None:
        every = jobs[todo[0]][2]["LIVE_EVERY"] if todo else 0
        board = LiveBoard(jobs, ids, todo, st, every)
    hooks = getattr(executor, "on_live", None), getattr(executor, "on_output", None)
    executor.on_live, executor.on_output = board.receive, board.echo
    # A fresh id per run: id(context) can be reused by a later sweep once this one's context is freed, and
    # a reused executor's workers would then run that sweep with this sweep's (stale) config.
    context_id = uuid.uuid4().hex

    where = _store_location(st)

    def overrides(i):  # the worker learns the job's store id: its checkpoints and live progress are filed by it
        return {**jobs[i][1], "JOB_ID": ids[i] or "", **where}

    def spec_of(unit):
        if len(unit) == 1:
            return JobSpec(unit[0], jobs[unit[0]][0], overrides(unit[0]), context_id, context)
        # a fused group travels as one job (modelscape.backend.fused)
        return JobSpec(unit[0], {}, group_overrides([(jobs[i][0], overrides(i)) for i in unit]), context_id,
                       context, size=len(unit))

    # Units of work: single jobs, and groups of jobs trained together as one stacked model (FUSE)
    units = plan_units([(i, jobs[i][2]) for i in range(len(jobs))], todo, units)
    dispatch = _dispatch(executor, spec_of, units, ids, st, since, claim_timeout)
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
                    records = _store_records(st, records, [jobs[i][2] for i in unit])
            for i, record in zip(unit, records):
                board.finished_job(i, record)
                yield i, record
    finally:
        executor.on_live, executor.on_output = hooks
        dispatch.close()


def _store_location(st) -> dict:
    """RESULTS_DIR and EXPT_NAME naming the directory of the store ``st`` (given as a path of its own, or a shard
    file beside results.db), so that what a job files beside the store (checkpoints) lands beside it."""
    if st is None:
        return {}
    directory = st.path.resolve().parent
    return {"RESULTS_DIR": str(directory.parent), "EXPT_NAME": directory.name}


def check_names(jobs) -> None:
    """Resolve every job's OPTIMIZER, LOSS and MODEL before anything runs (ConfigError naming the key, the
    value and the choices); each distinct value is resolved once."""
    from modelscape.backend.job import resolve_names
    seen = set()
    for _, _, cfg in jobs:
        key = tuple(repr(cfg.get(k)) for k in ("OPTIMIZER", "LOSS", "MODEL", "MODEL_FILE", "MODEL_NAME"))
        if key not in seen:
            seen.add(key)
            resolve_names(cfg)


def _identities(st, jobs, bfn_config):
    """``(ids, code versions)`` per job: their identities in the store and the code fingerprints of the user
    functions each job runs (None without a store)."""
    if st is None:
        return [None] * len(jobs), [None] * len(jobs)
    from modelscape.backend.store import code_versions, identity_cache, job_identity
    with identity_cache():  # a dataset in bfn_config, and each function's code, is hashed once, not once per job
        ids, codes = [], []
        for axes, _, cfg in jobs:
            code = {**bfn_config, **_file_code(cfg, bfn_config)}
            ids.append(job_identity(cfg, code, axes))
            codes.append(code_versions(cfg, code))
    if len(set(ids)) != len(ids):
        raise ConfigError("two jobs of this sweep have the same identity: an axis repeats a value, or an "
                          "axis changes nothing the job sees")
    return ids, codes


def _file_code(cfg, bfn_config) -> dict:
    """The functions a job loads from files (``bfn_file``/``bfn_name``, ``MODEL_FILE``/``MODEL_NAME``), so that
    their code, not only the file's name, enters the job's identity."""
    from modelscape.backend.job import get_base_bfn, get_model_class
    out = {}
    if bfn_config.get("base_bfn") is None and bfn_config.get("bfn_file"):
        out["bfn_file_code"] = get_base_bfn(bfn_config)
    if cfg.get("MODEL_FILE"):
        out["model_file_code"] = get_model_class(cfg)
    return out


def _stored_records(st, ids, retry_failed=False) -> dict:
    """``{job id: record}`` of this sweep's jobs that a resume skips (see ``Store.done_ids``) and that are
    readable, in the store's file or a shard file beside it (``StoreUnion``); a damaged row is left out (with
    a warning), so its job runs again."""
    if st is None:
        return {}
    from modelscape.backend.store import StoreUnion
    with StoreUnion(st.path) as union:
        done = union.done_ids(retry_failed)
        return {r["job_id"]: r for r in union.records([j for j in ids if j in done])}


def sweep_meta(base: dict, axis_keys: set) -> dict:
    """What a sweep records besides its jobs: the command line, the time, provenance (git commit, versions,
    host) and the hyperparameters every job shares (``fixed``)."""
    from modelscape.backend.store import NON_RESULT_KEYS, jsonable, provenance
    fixed = {k: v for k, v in base.items() if k in BY_NAME and k not in axis_keys and k not in NON_RESULT_KEYS}
    return {"argv": sys.argv, "time": time.time(), "provenance": provenance(), "fixed": jsonable(fixed)}


def _window(executor) -> int:
    """How many jobs to keep submitted (and claimed) at once: one per slot and a few queued, so that a slot
    never waits for the driver and another driver still finds most jobs unclaimed."""
    return len(getattr(executor, "slots", None) or [None]) + 2


def _dispatch(executor, spec_of, units, ids, st, since, stale_after):
    """Run ``units`` (lists of job indices: one job, or a fused group) on ``executor``, about ``_window`` of them
    submitted at a time; yield ``(indices, records, ran_here)`` as each unit finishes (a job another driver ran:
    a unit of its own).

    With a store, each job is claimed right before its unit is submitted: a job a live driver holds is left
    out of its unit and looked at again every second, until that driver has stored it (yielded with
    ``ran_here`` False, its record read from the store) or has died (its claim is taken over and the job runs
    here, in one unit with the jobs of its unit that driver held too). A unit's claims are released once the caller has stored its records (on the generator's
    next step), and all at the end.
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
                    outcome = claims.claim(ids[i], since) if claims is not None else "claimed"
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
        from modelscape.backend.store import Driver
        self.st, self.stale_after = st, stale_after
        self.driver = Driver.start()
        self.owners = set()  # other drivers already named to the user
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="modelscape-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self):
        while not self._stop.wait(max(0.2, self.stale_after / 6)):
            try:
                self.st.heartbeat(self.driver)
            except Exception:  # busy or closing: the next beat tries again, well within stale_after
                pass

    def claim(self, job_id, since) -> str:
        outcome, owner = self.st.claim(job_id, self.driver, since, self.stale_after)
        if outcome == "stored" and not self.st.records([job_id]):  # its record is damaged: run it again
            outcome, owner = self.st.claim(job_id, self.driver, None, self.stale_after)
        if owner is not None and owner["driver"] not in self.owners:
            self.owners.add(owner["driver"])
            what = ("is running jobs of this sweep: they are left to it, and taken over if it stops"
                    if outcome == "busy" else "stopped (its heartbeat or process is gone): its jobs are taken over")
            print(f"modelscape: another driver ({owner['host']} pid {owner['pid']}) {what}", file=sys.stderr)
        return outcome

    def record(self, job_id) -> dict:
        return self.st.records([job_id])[0]

    def release(self, job_ids):
        self.st.release(self.driver, job_ids)

    def close(self):
        self._stop.set()
        self._thread.join()
        try:
            self.st.release(self.driver)
        finally:
            self.driver.stop()


def _interrupted(n_done, n_jobs, lost, stored, after_bar):
    """Ctrl-C: one line instead of a traceback; exit status 130 (SIGINT's) from a script, and the
    KeyboardInterrupt itself in an interactive session (a notebook's cell stops as usual)."""
    what = "re-run to resume" if stored else "nothing was stored (store=False)"
    start = "" if after_bar else "\n"  # else after the terminal's ^C
    print(f"{start}interrupted: {n_done} of {n_jobs} jobs done, {lost} lost in flight; {what}", file=sys.stderr,
          flush=True)
    if _interactive():
        raise KeyboardInterrupt
    raise SystemExit(130)


def _interactive() -> bool:
    if hasattr(sys, "ps1") or sys.flags.interactive:
        return True
    ipython = sys.modules.get("IPython")
    return ipython is not None and getattr(ipython, "get_ipython", lambda: None)() is not None


def _open_store(store, cfg):
    """``(store, opened_here)``: the caller's Store as it is, or one opened on a path (closed after the sweep)."""
    if store is False:
        return None, False
    from modelscape.backend.store import Store
    if isinstance(store, Store):
        return store, False
    if store is None:
        store = os.path.join(cfg["RESULTS_DIR"], cfg["EXPT_NAME"])
    return Store(store), True


def _store_records(st, records, cfgs) -> list:
    """Write a unit's records in one transaction, so that a crash stores all of them or none. Should the
    store refuse one (an object-dtype grab, a full disk), each is written alone by ``_store_record``."""
    from modelscape.backend.store import jsonable
    if len(records) > 1:
        for record, cfg in zip(records, cfgs):
            record["config"] = jsonable(cfg)
        try:
            st.write_many(records)
            return records
        except Exception:
            pass
    return [_store_record(st, record, cfg) for record, cfg in zip(records, cfgs)]


def _store_record(st, record, cfg):
    """Write one record; a record the store refuses (an object-dtype grab, a full disk) becomes a failed
    job in memory and, where possible, on disk, and the sweep goes on."""
    from modelscape.backend.store import jsonable
    record["config"] = jsonable(cfg)
    try:
        st.write(record)
        return record
    except Exception as e:
        from modelscape.backend.job import failed_record
        failed = failed_record(record["axes"], e, record.get("device", "cpu"), record.get("wall_time", 0.0),
                               error=f"the result could not be stored: {type(e).__name__}: {e}")
        failed.pop("oom", None)
        failed.update(job_id=record["job_id"], config=record["config"])
        warnings.warn(f"job {record['axes']}: {failed['error']}", stacklevel=3)
        try:
            st.write(failed)
        except Exception:
            pass  # the store itself is broken: the sweep's results still come back in memory
        return failed


def summary(result: SweepResults) -> str:
    """A few lines: jobs by status, and the first line of each failed job's error."""
    counts = result.status_counts()
    shown = ("done", "not_reached", "diverged", "failed") + tuple(s for s in ("crashed", "timeout") if s in counts)
    lines = ["sweep: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in shown)
             + " (done = every threshold reached; not_reached = stopped at MAX_ITER)"]
    for r in result.failed():
        err = (r.get("error") or "").strip().splitlines()
        lines.append(f"  {r['status']} {r['axes']}: {err[-1] if err else 'unknown error'}")
    return "\n".join(lines)
