"""Jobs per minute of a 32-job sweep: a plain hand-written PyTorch loop, the in-process executor, a 2-worker pool.

The sweep: 4 learning rates x 8 trials of an MLP (d_in 8, width 64, depth 2, d_out 1), SGD and MSE, online
(``powerlaw_bfn``, 128 fresh samples a step), 200 steps each (the thresholds are never reached), the test loss
of a 512-sample test set at the end, no centering, no intermediate evaluation. The plain loop does the same work
by hand in this process (seed, test set, model, 200 steps reading each loss back as the trainloop does on a CPU,
final test loss); the executors go through ``run_job_iterator`` (config checks, seeds, the trainloop with its
EMA and thresholds, result records, xarray-ready results; no store).

Every in-process measurement uses one torch thread, as each of the pool's two workers does on a 2-core machine
(the pool gives each CPU worker cores // workers threads); a tiny model gains nothing from more, and a second
OpenMP thread on a busy machine costs a lot. The process is warmed up first (torch's first optimizer step
imports torch._dynamo, seconds), and so is each pool worker, whose start-up is timed separately: spawn and
import until every worker is ready, then its first job. The plain loop and the in-process executor run
``--repeats`` times, interleaved, as does the pool sweep; the best time is kept (the machine may be shared).

    python benchmarks/bench_sweep.py [--repeats 2] [--jobs 32] [--steps 200]
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

from modelscape.backend.cli import base_args
from modelscape.backend.executors import PoolExecutor
from modelscape.backend.job_iterator import main as run_job_iterator
from modelscape.data import powerlaw_bfn, powerlaw_target

DIM, WIDTH, DEPTH, BSZ, N_TEST = 8, 64, 2, 128, 512
LRS = [0.005, 0.01, 0.02, 0.04]


def sweep_axes(n_jobs):
    trials = max(1, n_jobs // len(LRS))
    return [LRS, list(range(trials))], ["LR", "trial"]


def config(steps):
    g = vars(base_args())
    g.update(PARAMETERIZATION="sp", WIDTH=WIDTH, DEPTH=DEPTH, MAX_ITER=steps, N_SAMPLES=BSZ, N_TEST=N_TEST,
             LOSS_CHECKPOINTS=[1e-12], CENTER=False, EVAL_EVERY=0, ONLYTHRESHOLDS=True)
    return g


def plain_job(lr, trial, steps):
    """What a user would write by hand for one configuration."""
    gen = torch.Generator().manual_seed(1000 + trial)
    torch.manual_seed(2000 + trial)
    lambdas, w = powerlaw_target(DIM)
    scale = lambdas.sqrt()

    def batch(n):
        X = torch.randn(n, DIM, generator=gen) * scale
        return X, (X @ w).unsqueeze(1)

    X_te, y_te = batch(N_TEST)
    layers = [nn.Linear(DIM, WIDTH), nn.ReLU()]
    for _ in range(DEPTH - 1):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(WIDTH, 1))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.MSELoss()
    losses = []
    for _ in range(steps):
        X, y = batch(BSZ)
        loss = loss_fn(model(X), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        return losses[-1], float(loss_fn(model(X_te), y_te))


def time_plain(n_jobs, steps):
    (lrs, trials), _ = sweep_axes(n_jobs)
    t = time.perf_counter()
    for lr in lrs:
        for trial in trials:
            plain_job(lr, trial, steps)
    return time.perf_counter() - t


def time_sweep(executor, n_jobs, steps):
    iterators, names = sweep_axes(n_jobs)
    t = time.perf_counter()
    res = run_job_iterator(iterators, names, config(steps), dict(base_bfn=powerlaw_bfn, dim=DIM), executor=executor,
                           store=False, progress=False)
    elapsed = time.perf_counter() - t
    counts = res.status_counts()
    assert counts == {"not_reached": len(res.records)}, counts
    assert all(r["steps"] == steps for r in res.records)
    return elapsed


def start_pool(workers):
    """A started pool, with the seconds until every worker was ready and the seconds of their first jobs."""
    t = time.perf_counter()
    pool = PoolExecutor(["cpu"] * workers)
    pool.wait_ready()
    t_ready = time.perf_counter() - t
    # one short job per worker (the pool hands each idle worker one): their first job pays torch's lazy imports
    t = time.perf_counter()
    run_job_iterator([list(range(workers))], ["trial"], config(5), dict(base_bfn=powerlaw_bfn, dim=DIM),
                     executor=pool, store=False, progress=False)
    return pool, t_ready, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=32)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    n, steps = len(LRS) * max(1, args.jobs // len(LRS)), args.steps

    torch.set_num_threads(1)
    time_sweep("inprocess", len(LRS), 5)  # warm-up: torch's lazy imports, in this process
    plain_job(0.01, 0, 5)

    times = {"plain loop": [], "in-process executor": []}
    for _ in range(args.repeats):
        times["plain loop"].append(time_plain(n, steps))
        times["in-process executor"].append(time_sweep("inprocess", n, steps))

    t0 = time.perf_counter()
    pool, t_ready, t_warm = start_pool(args.workers)
    name = f"pool, {args.workers} workers"
    times[name] = []
    try:
        for _ in range(args.repeats):
            times[name].append(time_sweep(pool, n, steps))
    finally:
        t = time.perf_counter()
        pool.shutdown()
        t_shutdown = time.perf_counter() - t
    t_pool_total = time.perf_counter() - t0

    best = {k: min(v) for k, v in times.items()}
    base = best["plain loop"]
    print(f"{n} jobs: MLP d_in {DIM}, width {WIDTH}, depth {DEPTH}; {steps} SGD steps of {BSZ} samples; "
          f"test set {N_TEST}; {os.cpu_count()} CPU cores; torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread in this process, {pool.threads} per pool worker; "
          f"best of {args.repeats}")
    print(f"{'':24s} {'seconds':>8s} {'jobs/min':>9s} {'vs plain':>9s} {'overhead ms/job':>16s}   all runs (s)")
    for k, t in best.items():
        overhead = "" if k == "plain loop" else f"{1000 * (t - base) / n:16.1f}"
        runs = " ".join(f"{x:.2f}" for x in times[k])
        print(f"{k:24s} {t:8.2f} {60 * n / t:9.0f} {base / t:8.2f}x {overhead:>16s}   {runs}")
    print(f"pool start-up: {t_ready:.2f} s until {args.workers} workers are ready (spawn + import), "
          f"{t_warm:.2f} s more for their first (warm-up) jobs; shutdown {t_shutdown:.2f} s; "
          f"start-up + sweeps + shutdown {t_pool_total:.2f} s")
    load = os.getloadavg()
    print(f"load average (1, 5, 15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
