"""How much of the worker pool's start-up the driver hides behind its own work.

Every sweep runs its jobs in worker processes, so every sweep pays for starting them: spawn a Python, import
torch, warm it up (torch's first optimizer step imports torch._dynamo). The job iterator creates the pool
first, so the workers start while the driver validates every job's config, opens the store and hashes the job
identities. This script runs the README quick start's sweep (``examples/example_synthetic_run.py``: 5 batch
sizes x 3 trials, a results store in a temporary folder; 1 step per job, since only the start matters here)
through ``run_job_iterator`` with a one-worker pool and reports, per run:

- ``start-up``: from creating the pool to its worker being ready;
- ``driver``: from creating the pool to the first job handed to it (the driver's own work, overlapped);
- ``waited``: what the first job still waited for the worker (start-up minus what was hidden).

The three are taken in one process with ``time.perf_counter``; best and median of ``--repeats`` runs.

    python benchmarks/bench_pool_startup.py [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import modelscape.backend.job_iterator as job_iterator
from modelscape.backend.cli import base_args
from modelscape.backend.executors import PoolExecutor
from modelscape.data import powerlaw_bfn


class TimedPool(PoolExecutor):
    """A one-worker pool that notes when it was created, given its first job, and ready."""

    def __init__(self, *args, **kwargs):
        self.t_created = time.perf_counter()
        super().__init__(*args, **kwargs)
        self.t_first_job = self.t_ready = None

    def submit(self, spec):
        if self.t_first_job is None:
            self.t_first_job = time.perf_counter()
        return super().submit(spec)

    def as_completed(self, futures):
        self.wait_ready()
        self.t_ready = time.perf_counter()
        return super().as_completed(futures)


def quick_start_sweep(store):
    g = vars(base_args())
    g.update(N_SAMPLES=[2, 8, 32, 128, 512], NUM_TRIALS=3, WIDTH=128, DEPTH=2, PARAMETERIZATION="mup", LR=0.1,
             MAX_ITER=1, LOSS_CHECKPOINTS=[0.1, 0.03, 0.01], N_TEST=2000, WORKERS_PER_DEVICE=1)
    pools = []

    def make(kind, devices, workers_per_device, threads, job_timeout):
        pools.append(TimedPool(["cpu"], threads, job_timeout))
        return pools[-1]

    original, job_iterator.make_executor = job_iterator.make_executor, make
    try:
        job_iterator.main([g["N_SAMPLES"], range(g["NUM_TRIALS"])], ["N_SAMPLES", "trial"], g,
                          dict(base_bfn=powerlaw_bfn, dim=32, alpha=1.5, beta=1.0), store=store, progress=False)
    finally:
        job_iterator.make_executor = original
    (p,) = pools
    return p.t_ready - p.t_created, p.t_first_job - p.t_created, p.t_ready - p.t_first_job


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as d:
            rows.append(quick_start_sweep(d))
    print(f"{'':>10s} {'start-up':>9s} {'driver':>9s} {'waited':>9s}   (seconds; {args.repeats} runs)")
    for name, pick in (("best", min), ("median", statistics.median)):
        cols = [pick(r[i] for r in rows) for i in range(3)]
        print(f"{name:>10s} " + " ".join(f"{c:9.2f}" for c in cols))
    start, drv, _ = (statistics.median(r[i] for r in rows) for i in range(3))
    print(f"hidden: {min(start, drv):.2f} s of {start:.2f} s ({100 * min(start, drv) / start:.0f}%)")


if __name__ == "__main__":
    main()
