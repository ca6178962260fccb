"""The original modelscape's face of a sweep: ``main(iterators, iterator_names, global_config, bfn_config)``.

It expands the cartesian product of the iterators into jobs, resolves every job's config once (here, in the
driver: the workers get it resolved), checks them all before anything runs, skips what the store holds, and
hands the rest to the engine (``sweep.run_jobs`` on an executor, or ``slurm.run_sweep``); it returns the results
labelled by the axes (``SweepResults``).
"""
from __future__ import annotations

import itertools
import numbers
import os
import sys
import time
import warnings

from modelscape.backend import checkpoints
from modelscape.backend.board import LiveBoard
from modelscape.backend.build import consumers, get_base_bfn, get_model_class, resolve_names
from modelscape.backend.executors import make_executor
from modelscape.backend.job import check_bfn_config, check_resolved
from modelscape.backend.slurm import run_sweep as run_slurm_sweep
from modelscape.backend.store import NON_RESULT_KEYS, Store, StoreUnion, code_versions, identity_cache, \
    job_identity, jsonable, provenance
from modelscape.backend.stored import StoredResults
from modelscape.backend.sweep import plan_sweep, run_jobs, store_location  # noqa: F401  (run_jobs: re-exported, as in 0.3)
from modelscape.backend.tensorboard import require_tensorboard, start_sweep as start_tensorboard
from modelscape.config import AXIS_ALIASES, BY_NAME, TRIAL, ConfigError, axis_target, canonicalize, \
    signature_names, with_overrides  # noqa: F401  (AXIS_ALIASES, TRIAL, axis_target: re-exported, as in 0.3)
from modelscape.results import SweepResults, axis_label

__all__ = ["main", "SweepFailed", "summary", "sweep_meta", "check_names", "check_axis_names", "run_jobs"]


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


def _install_excepthook():
    # scripts written for the original end with their sweep: an all-failed sweep must stop them with a clear
    # line and a non-zero status, not a page of traceback (the errors were already summarised) nor exit 0
    if not getattr(sys.excepthook, "_modelscape", False):
        sys.excepthook = _one_line_for_sweep_failed(sys.excepthook)


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


# Names a sweep's results give to their own fields (``SweepResults.to_xarray``'s variables and coordinates, the
# columns of ``modelscape export --csv``, ``get``'s own argument): an axis of the same name would be lost in them.
RESULT_NAMES = frozenset({"status", "steps", "wall_time", "train_loss", "test_loss", "timekeys", "thresholds",
                          "train_curve", "train_raw", "test_curve", "threshold", "step", "eval_step", "var", "job_id",
                          "error"})
# Keys the engine sets or reads for itself, none of which changes a number: an axis over them would be overridden
# (JOB_ID, RESULTS_DIR ...) or would train identical jobs under several ids.
ENGINE_KEYS = NON_RESULT_KEYS | {"JOB_ID", "STORE_FILE"}


def check_axis_names(names, grabs=()) -> None:
    """ConfigError for an axis whose name the results or the engine use for something else (``RESULT_NAMES``,
    ``ENGINE_KEYS``, a grab's ``grab_<name>`` variable and ``timekey_<i>`` columns), before anything runs."""
    for name in names:
        why = None
        if name in RESULT_NAMES:
            why = f"the results name a field of every job {name!r} (to_xarray, get, export)"
        elif name in ENGINE_KEYS:
            why = (f"{name} is the engine's to set, and changes no number: jobs that differ only in it would be the "
                   "same job trained again")
        elif name.startswith("timekey_") or any(name == f"grab_{g}" or name.startswith(f"{g}_dim") for g in grabs):
            why = f"the results name a variable {name!r} already (a grab's values, or a timekey column)"
        if why:
            raise ConfigError(f"axis {name!r} cannot be a sweep axis: {why}. Rename it (and the parameter of your "
                              "batch function, model or grab that takes it)")


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
    _install_excepthook()
    global_config = dict(global_config or {})
    bfn_config = dict(bfn_config or {})
    check_bfn_config(bfn_config)
    names, values = _materialize(iterators, iterator_names)
    check_axis_names(names, global_config.get("otherreturns") or ())
    base, targets = _resolve_base(names, global_config, bfn_config)
    # Start the workers now: they spawn and import torch (seconds) while this process expands, checks and hashes
    # the jobs. A config that fails the checks above never started one.
    if use_mp is not None and executor is None:
        executor = "pool" if use_mp else "inprocess"
    own_executor = executor is None or isinstance(executor, str)
    if own_executor:
        executor = _make_executor(executor, base)
    try:
        return _run_sweep(names, values, base, targets, bfn_config, executor, own_executor, store, resume,
                          progress)
    finally:
        if own_executor and executor != "slurm":
            executor.shutdown()


def _resolve_base(names, global_config, bfn_config):
    """``(base, targets)``: the global config resolved (canonicalized, its warnings said once) and the config key
    each axis writes. A typo costs seconds, not a night: a bad key or value raises ConfigError here."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fns = consumers(global_config, bfn_config)
        known = set().union(*(signature_names(f) for f in fns)) if fns else set()
        targets = {n: axis_target(n, known) for n in names}
        base = canonicalize(global_config, fns, where="global_config", extra_known=targets.values())
    for w in caught:
        warnings.warn(w.message, w.category, stacklevel=3)
    return base, targets


def _make_executor(kind, base):
    """The executor the resolved config asks for; ``"slurm"`` as it is, since Slurm takes the whole sweep
    (``backend.slurm``), not single units."""
    kind = kind or base["EXECUTOR"]
    if kind == "slurm":
        return kind
    return make_executor(kind, base["DEVICES"], base["WORKERS_PER_DEVICE"], base["THREADS"], base["JOB_TIMEOUT"],
                         base["RAY_ADDRESS"])


def expand_jobs(names, values, base, targets) -> list:
    """Every combination of the axis values as a job ``(axes, overrides, config)``: ``overrides`` the config
    keys its axis values set (``trial`` too, so that a model, batch function or grab that names it receives it),
    resolved as the config is; ``config`` the job's whole resolved config, checked (``job.check_resolved``)."""
    jobs = []
    for combo in itertools.product(*values):
        axes = dict(zip(names, combo))
        cfg = with_overrides(base, {targets[n]: v for n, v in axes.items()})
        check_resolved(cfg)
        jobs.append((axes, {targets[n]: cfg[targets[n]] for n in names}, cfg))
    return jobs


def _run_sweep(names, values, base, targets, bfn_config, executor, own_executor, store, resume, progress):
    jobs = expand_jobs(names, values, base, targets)
    check_names(jobs)
    checkpoints.check_sweep([cfg for _, _, cfg in jobs], store is not False)
    if any(cfg.get("TENSORBOARD") for _, _, cfg in jobs):
        require_tensorboard()  # before the store exists: a missing extra leaves nothing behind
    if resume is None:
        resume = base["RESUME"]
    st, own_store = _open_store(store, base)
    # TENSORBOARD=True: tensorboard installed, the experiment's hparams summary written where the jobs write
    where = store_location(st)
    start_tensorboard([(axes, overrides, {**cfg, **where}) for axes, overrides, cfg in jobs])
    store_dir = st.path.parent if st is not None else None
    ids, codes = _identities(st, jobs, bfn_config)
    since = time.time()  # records written from now on by another driver count as this sweep's
    if st is not None:
        labels = [[axis_label(v) for v in vals] for vals in values]
        st.begin_sweep(names, labels, ids, meta=sweep_meta(base, set(targets.values())))
    records = _stored_records(st, ids, base["RETRY_FAILED"]) if resume else {}
    found = len(records)
    if store_dir is not None:  # checkpoints are not part of a job's identity: a job lacking some runs again
        records = checkpoints.keep_satisfied(records, jobs, ids, store_dir)
    todo = [i for i, job_id in enumerate(ids) if job_id is None or job_id not in records]
    if progress:
        print(resume_line(len(jobs), records, len(todo), found - len(records), st, resume), file=sys.stderr)
    context = (base, bfn_config)  # resolved: each job's config is base with its overrides
    if executor == "slurm":  # the whole sweep goes to Slurm array tasks, each running run_jobs on its node
        try:
            records.update(run_slurm_sweep(jobs, ids, codes, todo, st, context, base))
        finally:
            if own_store:
                st.close()
        return _result(names, values, ids, records, progress, store_dir, st)

    # Planned before the bar is drawn: the plan's notes (jobs that cannot fuse, and why) then sit on lines of
    # their own in a log, instead of on the bar's line with the bar drawn again below them.
    units = plan_sweep(executor, jobs, ids, todo, st)
    board = LiveBoard(jobs, ids, todo, st, base["LIVE_EVERY"], bar=progress,
                      stored=[r["status"] for r in records.values()])
    run = None
    try:
        run = run_jobs(executor, jobs, ids, codes, todo, st, context, since, base["CLAIM_TIMEOUT"], board,
                       units=units)
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
    return _result(names, values, ids, records, progress, store_dir, st)


def resume_line(n_jobs, records, n_todo, lacking, st, resume) -> str:
    """What a sweep skips and what it trains, before it starts: ``sweep: 15 of 15 jobs already stored in
    results/x (15 done), 0 to train``, so a resumed sweep never reads as a fresh one."""
    if st is None:
        return f"sweep: {n_jobs} jobs to train (store=False: nothing is kept)"
    counts = {}
    for r in records.values():
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    how = f" ({', '.join(f'{n} {s}' for s, n in sorted(counts.items(), key=lambda kv: -kv[1]))})" if counts else ""
    line = f"sweep: {len(records)} of {n_jobs} jobs already stored in {st.path.parent}{how}, {n_todo} to train"
    if lacking:
        line += f" ({lacking} stored without the checkpoints asked for)"
    if not resume:
        line += " (RESUME=False: every job trains again)"
    return line


def _result(names, values, ids, records, progress, store_dir=None, st=None) -> SweepResults:
    """The sweep's SweepResults in product order (``records`` keyed by job id, or by index without a store);
    ``SweepFailed`` if every job failed."""
    order = ids if ids and ids[0] is not None else list(range(len(ids)))
    result = StoredResults(names, values, [records[k] for k in order if k in records], store_dir=store_dir)
    if progress:
        print(summary(result), file=sys.stderr)
        disk = checkpoints.disk_line(store_dir, st.path.name) if st is not None else None
        if disk:
            print(disk, file=sys.stderr)
    if result.records and all(r["status"] == "failed" for r in result.records):
        first = (result.failed()[0].get("error") or "").strip().splitlines()
        raise SweepFailed(f"all {len(result.records)} jobs of the sweep failed; the first with: "
                          f"{first[-1] if first else 'unknown error'}", result)
    return result


def check_names(jobs) -> None:
    """Resolve every job's OPTIMIZER, LOSS and MODEL before anything runs (ConfigError naming the key, the
    value and the choices); each distinct value is resolved once."""
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
    with StoreUnion(st.path) as union:
        done = union.done_ids(retry_failed)
        return {r["job_id"]: r for r in union.records([j for j in ids if j in done])}


def sweep_meta(base: dict, axis_keys: set) -> dict:
    """What a sweep records besides its jobs: the command line, the time, provenance (git commit, versions,
    host) and the hyperparameters every job shares (``fixed``)."""
    fixed = {k: v for k, v in base.items() if k in BY_NAME and k not in axis_keys and k not in NON_RESULT_KEYS}
    return {"argv": sys.argv, "time": time.time(), "provenance": provenance(), "fixed": jsonable(fixed)}


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
    if isinstance(store, Store):
        return store, False
    if store is None:
        store = os.path.join(cfg["RESULTS_DIR"], cfg["EXPT_NAME"])
    return Store(store), True


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
