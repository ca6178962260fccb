"""Sweeps on a Slurm cluster through submitit: one array task per shard of the pending jobs.

The driver (``EXECUTOR=slurm``) splits the jobs its store does not hold as done into ``SLURM_SHARDS``
shards and submits them as one Slurm job array (at most ``SLURM_ARRAY_PARALLELISM`` tasks at once). Each array
task runs the ordinary local engine (``sweep.run_jobs`` on a pool over its node's GPUs, or its CPUs)
over its shard and writes its records to its own file, ``shard-<run>-<k>.db``, beside the store's
``results.db``: one writer per SQLite file, so no SQLite file is written from two machines over a network
file system. Readers (``load``, ``modelscape ls/show/export``, resume) see the directory as one store
(``StoreUnion``). The driver records in ``results.db`` a claim per submitted job, held by its array task
(host ``SCHEDULER_HOST``); a re-run asks the scheduler whether that task is still queued or running and
skips its jobs if so, so re-running the same command submits only the jobs neither stored nor in a live
task (a task that finished, failed or was cancelled gives its unstored jobs back). A task that Slurm
preempts or times out is requeued by submitit (``checkpoint``) and skips the jobs its file already holds: it
loses only the jobs it was running.

How the config keys map to sbatch options: SLURM_PARTITION -> --partition, SLURM_TIME (minutes) -> --time,
SLURM_GPUS_PER_NODE -> --gpus-per-node, SLURM_CPUS_PER_TASK -> --cpus-per-task, SLURM_MEM -> --mem,
SLURM_ACCOUNT -> --account, SLURM_QOS -> --qos, SLURM_ARRAY_PARALLELISM -> the %N of --array=0-K%N,
SLURM_EXTRA lines ('--constraint=a100', '--exclusive') -> one #SBATCH line each.
"""
from __future__ import annotations

import os
import sys
import time
import uuid
import warnings
from pathlib import Path

import torch

from modelscape.backend.executors import make_executor
from modelscape.backend.store import DB_NAME, SCHEDULER_HOST, Driver, Store, StoreUnion, shard_path
from modelscape.backend.sweep import plan_sweep, run_jobs
from modelscape.config import ConfigError
from modelscape.utils import require

__all__ = ["run_sweep", "ShardTask", "split", "sbatch_parameters"]

# Slurm states (sacct) of a task that may still run its jobs; PREEMPTED and TIMEOUT tasks are requeued
# (``ShardTask.checkpoint``) and show as PENDING / REQUEUED again.
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT"}
# sacct may not list a task in the first moments after sbatch: an UNKNOWN task this young counts as queued.
UNKNOWN_GRACE = 300.0

# The submitit cluster the array goes to. "local" runs the array tasks as processes on this machine, which
# is how the tests (and a dry run before going to a cluster) exercise this path without Slurm.
CLUSTER = "slurm"


def sbatch_parameters(cfg: dict) -> dict:
    """submitit ``AutoExecutor.update_parameters`` arguments from the SLURM_* keys of a config."""
    extra = {}
    for line in cfg.get("SLURM_EXTRA") or []:
        text = str(line).strip()
        text = text[len("#SBATCH"):].strip() if text.startswith("#SBATCH") else text
        if not text.startswith("--"):
            raise ConfigError(f"SLURM_EXTRA line {line!r}: write an sbatch long option, e.g. '--constraint=a100'")
        key, sep, value = text[2:].partition("=")
        extra[key] = value if sep else True
    params = dict(timeout_min=cfg["SLURM_TIME"], gpus_per_node=cfg["SLURM_GPUS_PER_NODE"],
                  cpus_per_task=cfg["SLURM_CPUS_PER_TASK"], slurm_array_parallelism=cfg["SLURM_ARRAY_PARALLELISM"],
                  slurm_partition=cfg["SLURM_PARTITION"], slurm_mem=cfg["SLURM_MEM"],
                  slurm_account=cfg["SLURM_ACCOUNT"], slurm_qos=cfg["SLURM_QOS"],
                  slurm_additional_parameters=extra or None, name=f"modelscape-{cfg['EXPT_NAME']}")
    return {k: v for k, v in params.items() if v is not None}


def split(units: list, n: int) -> list[list]:
    """``units`` of work (lists of job indices: a job, or a fused group kept whole) dealt into at most ``n``
    non-empty shards with about as many jobs each: the largest unit first, each to the shard with fewest jobs
    so far (neighbouring single jobs, often similar in cost, go to different shards)."""
    n = max(1, min(n, len(units)))
    shards, sizes = [[] for _ in range(n)], [0] * n
    for unit in sorted(units, key=len, reverse=True):  # stable: equal sizes keep their order
        k = sizes.index(min(sizes))
        shards[k].append(unit)
        sizes[k] += len(unit)
    return shards


class ShardTask:
    """One array task: the jobs of one shard, run by the local engine into the shard's own results file.
    submitit pickles it (cloudpickle) to the node; ``checkpoint`` lets submitit requeue it on preemption or
    timeout, and the requeued task skips the jobs its file already holds."""

    def __init__(self, jobs, ids, codes, context, cfg, path, units=None):
        self.jobs, self.ids, self.codes = jobs, ids, codes  # this shard's jobs only
        self.context, self.cfg, self.path = context, cfg, str(path)
        # its units of work, as the sweep planned them (indices into self.jobs): the shard trains the fused
        # groups a local run would, so its numbers do not depend on SLURM_SHARDS
        self.units = units

    def __call__(self) -> int:
        """Run the shard; returns how many of its jobs are stored in its file."""
        # Slurm shows the task only the GPUs it was given (CUDA_VISIBLE_DEVICES): use every one of them.
        devices = list(range(torch.cuda.device_count())) or [0]
        with Store(self.path) as st:
            done = st.done_ids()
            todo = [i for i, job_id in enumerate(self.ids) if job_id not in done]
            if todo:
                with make_executor("auto", devices, self.cfg["WORKERS_PER_DEVICE"]) as executor:
                    for _ in run_jobs(executor, self.jobs, self.ids, self.codes, todo, st, self.context,
                                      time.time(), self.cfg["CLAIM_TIMEOUT"], units=self.units):
                        pass
            return len(st.done_ids())

    def checkpoint(self):
        """submitit calls this on preemption or timeout: requeue the same shard."""
        submitit = require("submitit", "slurm", "slurm")
        return submitit.helpers.DelayedSubmission(self)


def _pid_running(pid: int) -> bool:
    """Whether process ``pid`` of this machine is running (a zombie, dead but not yet reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc: trust kill(0)


def _task_live(submitit, folder, task_id: str, claimed: float) -> bool:
    """Whether the array task ``task_id`` is still queued or running: it has no result file (submitit writes
    one when a task returns or raises) and the scheduler still holds it."""
    if CLUSTER == "local":  # the local executor's job id is the pid of the task's process
        job = submitit.local.local.LocalJob(folder, task_id)
        return not job.paths.result_pickle.exists() and _pid_running(int(task_id))
    job = submitit.SlurmJob(folder, task_id)
    if job.paths.result_pickle.exists():
        return False
    state = job.state.split()[0]  # e.g. "CANCELLED by 1234"
    return state in ACTIVE_STATES or (state == "UNKNOWN" and time.time() - claimed < UNKNOWN_GRACE)


def _task_driver(task_id: str):
    """The claimant, in results.db, of the jobs submitted to array task ``task_id``."""
    return Driver(f"slurm:{task_id}", SCHEDULER_HOST, 0, 0.0)


def _queued_jobs(st, submitit, folder) -> set:
    """Ids of the jobs held by array tasks still queued or running; the claims of tasks that ended are
    released (their unstored jobs are missing again)."""
    tasks = {}
    for c in st.claims():
        if c["host"] == SCHEDULER_HOST:
            tasks.setdefault(c["driver"].split(":", 1)[1], []).append(c)
    held = set()
    for task_id, claims in tasks.items():
        if _task_live(submitit, folder, task_id, min(c["claimed"] for c in claims)):
            held.update(c["job_id"] for c in claims)
        else:
            st.release(_task_driver(task_id))
    return held


def run_sweep(jobs, ids, codes, todo, st, context, cfg) -> dict:
    """Submit the jobs ``todo`` of a sweep as a Slurm array. With ``DETACH`` return at once (``{}``); else wait
    for the array and return ``{job id: record}`` of the jobs it stored."""
    submitit = require("submitit", "slurm", "slurm")
    if st is None or st.path.name != DB_NAME:
        raise ConfigError(f"EXECUTOR='slurm' needs a store directory (RESULTS_DIR/EXPT_NAME, holding {DB_NAME}) "
                          "for its array tasks to write their shard files in")
    directory = st.path.parent
    folder = cfg["SLURM_LOG_DIR"] or directory / "slurm" / "%j"
    held = _queued_jobs(st, submitit, folder)
    live = [i for i in todo if ids[i] in held]
    if live:
        todo = [i for i in todo if ids[i] not in held]
        print(f"modelscape: {len(live)} jobs are in array tasks still queued or running; not submitting them "
              "again", file=sys.stderr)
    if not todo:
        print(f"modelscape: every job of this sweep is stored or in a live array task ({directory}); nothing "
              "to submit", file=sys.stderr)
        return {}
    run = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    tasks = []
    # a fused group at most one worker's share: the array tasks' workers together (each task's GPUs x
    # WORKERS_PER_DEVICE); the plan is recorded in results.db, and a re-run reuses it
    workers = cfg["SLURM_SHARDS"] * max(1, cfg["SLURM_GPUS_PER_NODE"]) * max(1, cfg["WORKERS_PER_DEVICE"])
    for k, units in enumerate(split(plan_sweep(None, jobs, ids, todo, st, workers=workers), cfg["SLURM_SHARDS"])):
        shard = sorted(i for unit in units for i in unit)
        local = {i: n for n, i in enumerate(shard)}
        tasks.append(ShardTask([jobs[i] for i in shard], [ids[i] for i in shard], [codes[i] for i in shard],
                               context, cfg, shard_path(directory, f"{run}-{k}"),
                               sorted([local[i] for i in unit] for unit in units)))
    executor = submitit.AutoExecutor(folder=folder, cluster=CLUSTER)
    executor.update_parameters(**sbatch_parameters(cfg))
    with executor.batch():
        submitted = [executor.submit(task) for task in tasks]
    for job, task in zip(submitted, tasks):  # a re-run leaves these jobs to this task while it is live
        driver = _task_driver(job.job_id)
        for job_id in task.ids:
            st.claim(job_id, driver)
    array = submitted[0].job_id.split("_")[0]
    fewer = (" (a fused group is one unit of work, kept whole: a lower FUSE_MAX spreads it over more tasks)"
             if len(tasks) < min(cfg["SLURM_SHARDS"], len(todo)) else "")
    print(f"modelscape: submitted {len(todo)} jobs as {len(tasks)} array tasks{fewer} (Slurm job {array}); "
          f"follow them with `modelscape ls {directory}`", file=sys.stderr)
    if cfg["DETACH"]:
        return {}
    for job in submitted:
        try:
            job.result()
        except Exception as e:  # a task killed or failed: its stored jobs count, a re-run submits the rest
            warnings.warn(f"array task {job.job_id} ended early ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[-1] if str(e).strip() else ''}); re-run the same "
                          "command to submit the jobs it did not store", stacklevel=3)
    for job in submitted:
        st.release(_task_driver(job.job_id))
    with StoreUnion(directory) as union:
        wanted = [ids[i] for i in todo]
        return {r["job_id"]: r for r in union.records(wanted)}
