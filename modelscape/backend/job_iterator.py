"""The sweep: expand the cartesian product, skip what is stored, dispatch, collect, store, report."""
from __future__ import annotations

import itertools
import numbers
import os
import sys
import time
import uuid
import warnings

from modelscape.config import ALIASES, BY_NAME, ConfigError, canonicalize, check_job_config, close_matches, \
    signature_names
from modelscape.backend.executors import JobSpec, make_executor
from modelscape.backend.fused import group_overrides, plan_units, split_records
from modelscape.backend.job import consumers
from modelscape.results import SweepResults, axis_label

# Axis names understood by name, as in the seed: the sample-size axis and the trial axis.
AXIS_ALIASES = {"ntrain": "N_SAMPLES", "n_train": "N_SAMPLES", "bsz": "N_SAMPLES", "n_samples": "N_SAMPLES",
                "lr": "LR", "gamma": "GAMMA", **ALIASES}
TRIAL = "trial"
_INTERNAL = ("oom",)


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
        executor: an ``Executor`` instance, or ``'auto' | 'inprocess' | 'pool'``.
        store: a path, a ``Store``, None (RESULTS_DIR/EXPT_NAME from the config) or False (keep nothing).
        resume: skip jobs already stored as done (default: RESUME from the config).
        progress: show a progress bar and the closing summary.

    Each job's config is a copy of ``global_config`` updated with its axis values. Its seeds derive from
    SEED and its trial only, so results do not depend on the executor or the number of workers.
    """
    global_config = dict(global_config or {})
    bfn_config = dict(bfn_config or {})
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

    if resume is None:
        resume = base["RESUME"]
    st, own_store = _open_store(store, base)
    ids = [None] * len(jobs)
    if st is not None:
        from modelscape.backend.store import identity_cache, job_identity
        with identity_cache():  # a dataset in bfn_config is hashed once, not once per job
            ids = [job_identity(cfg, bfn_config, axes) for axes, _, cfg in jobs]
        if len(set(ids)) != len(ids):
            raise ConfigError("two jobs of this sweep have the same identity: an axis repeats a value, or an "
                              "axis changes nothing the job sees")
        labels = [[axis_label(v) for v in vals] for vals in values]
        st.begin_sweep(names, labels, ids, meta={"argv": sys.argv, "time": time.time()})
    done_ids = st.done_ids() if (st is not None and resume) else set()

    if use_mp is not None and executor is None:
        executor = "pool" if use_mp else "inprocess"
    executor = executor or base["EXECUTOR"]
    own_executor = isinstance(executor, str)
    if own_executor:
        executor = make_executor(executor, base["DEVICES"], base["WORKERS_PER_DEVICE"])

    context = (global_config, bfn_config)
    todo = [i for i, job_id in enumerate(ids) if job_id is None or job_id not in done_ids]
    records = {}
    if st is not None and len(todo) < len(jobs):
        for r in st.records([job_id for job_id in ids if job_id in done_ids]):
            records[r["job_id"]] = r
    bar = _progress(len(jobs), len(jobs) - len(todo), progress)
    counts = {}
    try:
        # A fresh id per sweep: id(context) can be reused by a later sweep once this one's context is freed, and
        # a reused executor's workers would then run that sweep with this sweep's (stale) config.
        context_id = uuid.uuid4().hex
        # Units of work: single jobs, and groups of jobs trained together as one stacked model (FUSE)
        units = plan_units([(i, jobs[i][2]) for i in todo])
        unit_of = {unit[0]: unit for unit in units}
        futures = [executor.submit(_unit_spec(unit, jobs, context_id, context)) for unit in units]
        for fut in executor.as_completed(futures):
            unit = unit_of[fut.spec.index]
            for i, record in zip(unit, split_records(fut.result(), len(unit))):
                for k in _INTERNAL:
                    record.pop(k, None)
                record["job_id"] = ids[i]
                record["axes"] = jobs[i][0]
                if st is not None:
                    record = _store_record(st, record, jobs[i][2])
                records[ids[i] if ids[i] is not None else i] = record
                counts[record["status"]] = counts.get(record["status"], 0) + 1
                if bar is not None:
                    bar.set_postfix_str(_postfix(counts, record), refresh=False)
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        if own_executor:
            executor.shutdown()
        if own_store:
            st.close()
    order = ids if st is not None else list(range(len(jobs)))
    result = SweepResults(names, values, [records[k] for k in order if k in records])
    if progress:
        print(summary(result), file=sys.stderr)
    return result


def _unit_spec(unit, jobs, context_id, context) -> JobSpec:
    """The executor's job for a unit of work: one job, or a fused group of them (``plan_units``)."""
    if len(unit) == 1:
        i = unit[0]
        return JobSpec(i, jobs[i][0], jobs[i][1], context_id, context)
    return JobSpec(unit[0], {}, group_overrides([jobs[i][:2] for i in unit]), context_id, context)


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


def _progress(total, initial, enabled):
    if not enabled:
        return None
    from tqdm import tqdm  # plain text: tqdm.auto needs ipywidgets in a notebook
    return tqdm(total=total, initial=initial, desc="jobs", dynamic_ncols=True)


def _postfix(counts, r):
    c = " ".join(f"{k}={v}" for k, v in sorted(counts.items()))
    axes = " ".join(f"{k}={v}" for k, v in r["axes"].items())
    return f"{c} | last: {axes} train {r['train_loss']:.3g} test {r['test_loss']:.3g}"


def summary(result: SweepResults) -> str:
    """A few lines: jobs by status, and the first line of each failed job's error."""
    counts = result.status_counts()
    lines = ["sweep: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("done", "not_reached", "diverged", "failed"))
             + " (done = every threshold reached; not_reached = stopped at MAX_ITER)"]
    for r in result.failed():
        err = (r.get("error") or "").strip().splitlines()
        lines.append(f"  failed {r['axes']}: {err[-1] if err else 'unknown error'}")
    return "\n".join(lines)
