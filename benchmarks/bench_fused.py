"""Jobs per minute of a sweep of small MLPs: one by one (in-process and in a pool) against fused trials.

The sweep (CPU default): 4 learning rates x 8 trials of an MLP (d_in 8, width 128, depth 2, d_out 1), SGD and MSE,
online (``powerlaw_bfn``, 128 fresh samples a step), 500 steps each (the thresholds are never reached), test loss
of a 512-sample test set at the end, PARAMETERIZATION sp (``--param mup`` for muP), no centering. ``--device cuda``
runs 64 jobs (8 learning rates x 8 trials) of width 256 on the GPU.

Measured, each through ``run_job_iterator`` (no store) unless said otherwise:
- plain loop: what a user writes by hand for one job (seed, data, nn.Sequential, torch.optim.SGD, the loss read
  back every step), run for every job one after the other in this process;
- one by one, in-process: FUSE=off, the in-process executor, ``--threads`` torch threads;
- pool: FUSE=off, worker processes (CPU: 2 workers x 1 thread and 1 worker x 2 threads; the best is kept);
  started and warmed up before the clock starts;
- fused, in-process: FUSE=auto (one stacked model for the whole sweep), ``--threads`` threads;
- fused, pool: FUSE=auto, the pool cutting the group so each of 2 workers trains half of the sweep;
- fused by hand: the ideal a user could write, every job in one batched-matmul loop (no thresholds, records).

``--widths 32 64 128 256`` measures a widths sweep instead: those widths x 4 learning rates x 2 trials (CPU; on
CUDA 8 learning rates), fused in width buckets (widths within 2x share a group, padded to its widest) against one
by one, against fusing each width alone (one sweep per width, no padding: what padding costs), and against the
batched-matmul loop by hand run per width.

One-by-one runs are the slow ones: ``--sample N`` times only N jobs of the sweep for them (as many of each width;
each job of a width costs the same, so jobs/minute is unchanged) to keep the benchmark short on a shared machine.
Every mode runs ``--repeats`` times, interleaved; the best time is kept and all are printed, with the load
average. On a shared machine wall time follows the load; the CPU time of the in-process modes (this process's,
all threads) is printed beside it, and their ratios in CPU time are the steadier measure.

    python benchmarks/bench_fused.py [--repeats 2] [--sample 8] [--threads 2] [--device cuda] [--widths ...]
"""
from __future__ import annotations

import argparse
import os
import time

# On a shared machine, OpenMP threads that spin while waiting for each other make every multi-threaded op
# many times slower; passive waiting keeps two-thread runs meaningful there (set before torch loads OpenMP,
# inherited by the pool's workers; it applies to every mode alike).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from modelscape.backend.cli import base_args  # noqa: E402
from modelscape.backend.executors import PoolExecutor  # noqa: E402
from modelscape.backend.job_iterator import main as run_job_iterator  # noqa: E402
from modelscape.data import powerlaw_bfn, powerlaw_target  # noqa: E402

DIM, DEPTH, BSZ, N_TEST = 8, 2, 128, 512


def sweep(n_jobs):
    """(iterators, names): learning rates x trials, 8 trials."""
    n_lrs = max(1, n_jobs // 8)
    lrs = [0.005 * 1.5 ** k for k in range(n_lrs)]
    return [lrs, list(range(min(8, n_jobs)))], ["LR", "trial"]


def widths_sweep(args, n_lrs=None, n_trials=2):
    """(iterators, names): widths x learning rates x trials."""
    n_lrs = n_lrs or (8 if args.device == "cuda" else 4)
    return [list(args.widths), [0.005 * 1.5 ** k for k in range(n_lrs)], list(range(n_trials))], \
        ["WIDTH", "LR", "trial"]


def config(args, **kw):
    g = vars(base_args())
    g.update(PARAMETERIZATION=args.param, WIDTH=args.width, DEPTH=DEPTH, MAX_ITER=args.steps, N_SAMPLES=BSZ,
             N_TEST=N_TEST, LOSS_CHECKPOINTS=[1e-12], CENTER=False, EVAL_EVERY=0, ONLYTHRESHOLDS=True,
             SYNC_EVERY=0, DEVICES=[0] if args.device == "cuda" else [],  # no DEVICES: CPU even where CUDA is
             THREADS=args.threads)  # the in-process executor's threads (else the idle cores of a busy machine)
    g.update(kw)
    return g


def time_sweep(args, executor, n_jobs, sweep_def=None, **kw):
    """(wall seconds, jobs, CPU seconds of this process) of a sweep: ``sweep(n_jobs)``, or ``sweep_def``."""
    iterators, names = sweep_def or sweep(n_jobs)
    t, c = time.perf_counter(), time.process_time()
    res = run_job_iterator(iterators, names, config(args, **kw), dict(base_bfn=powerlaw_bfn, dim=DIM),
                           executor=executor, store=False, progress=False)
    if args.device == "cuda":
        torch.cuda.synchronize()
    elapsed, cpu = time.perf_counter() - t, time.process_time() - c
    counts = res.status_counts()
    assert counts == {"not_reached": len(res.records)}, counts
    return elapsed, len(res.records), cpu


def summed(results):
    """Several timed runs as one: their times and jobs added."""
    return tuple(sum(x) for x in zip(*results))


def plain_job(args, lr, trial, device, width=None):
    """What a user would write by hand for one configuration."""
    width = width or args.width
    gen = torch.Generator(device=device).manual_seed(1000 + trial)
    torch.manual_seed(2000 + trial)
    lambdas, w = (t.to(device) for t in powerlaw_target(DIM))
    scale = lambdas.sqrt()

    def batch(n):
        X = torch.randn(n, DIM, generator=gen, device=device) * scale
        return X, (X @ w).unsqueeze(1)

    X_te, y_te = batch(N_TEST)
    layers = [nn.Linear(DIM, width), nn.ReLU()]
    for _ in range(DEPTH - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(width, 1)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.MSELoss()
    losses = []
    for _ in range(args.steps):
        X, y = batch(BSZ)
        loss = loss_fn(model(X), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach() if device == "cuda" else loss.item())
    with torch.no_grad():
        return float(loss_fn(model(X_te), y_te))


def plain_fused(args, lrs, trials, device, width=None):
    """What a user would write by hand to train every job at once with batched matmuls (the fused ideal)."""
    width = width or args.width
    jobs = [(lr, trial) for lr in lrs for trial in trials]
    gens = [torch.Generator(device=device).manual_seed(1000 + t) for _, t in jobs]
    lambdas, w = (t.to(device) for t in powerlaw_target(DIM))
    scale = lambdas.sqrt()
    G, dims = len(jobs), [DIM] + [width] * DEPTH + [1]
    Ws = [(torch.randn(G, a, b, device=device) / a ** 0.5).requires_grad_() for a, b in zip(dims, dims[1:])]
    bs = [torch.zeros(G, 1, b, device=device, requires_grad=True) for b in dims[1:]]
    lr = torch.tensor([lr for lr, _ in jobs], device=device).view(G, 1, 1)
    for _ in range(args.steps):
        X = torch.stack([torch.randn(BSZ, DIM, generator=g, device=device) for g in gens]) * scale
        y = (X @ w).unsqueeze(-1)
        h = X
        for k, (W, b) in enumerate(zip(Ws, bs)):
            h = torch.baddbmm(b, h, W)
            if k < len(Ws) - 1:
                h = torch.relu(h)
        losses = (h - y).pow(2).mean(dim=(1, 2))
        grads = torch.autograd.grad(losses.sum(), Ws + bs)
        with torch.no_grad():
            for p, g in zip(Ws + bs, grads):
                p.sub_(lr * g)
        losses.detach().cpu()
    return G


def _timed(args, fn):
    t, c = time.perf_counter(), time.process_time()
    n = fn()
    if args.device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, n, time.process_time() - c


def time_plain_fused(args, n_jobs):
    (lrs, trials), _ = sweep(n_jobs)
    return _timed(args, lambda: plain_fused(args, lrs, trials, args.device))


def time_plain(args, n_jobs):
    (lrs, trials), _ = sweep(n_jobs)

    def run():
        for lr in lrs:
            for trial in trials:
                plain_job(args, lr, trial, args.device)
        return len(lrs) * len(trials)
    return _timed(args, run)


def time_plain_widths(args, iterators, fused):
    """The plain loop (``fused`` False) or the batched-matmul loop by hand (one per width) over a widths sweep."""
    widths, lrs, trials = iterators

    def run():
        for w in widths:
            if fused:
                plain_fused(args, lrs, trials, args.device, w)
            else:
                for lr in lrs:
                    for trial in trials:
                        plain_job(args, lr, trial, args.device, w)
        return len(widths) * len(lrs) * len(trials)
    return _timed(args, run)


def start_pool(args, workers, threads):
    slot = "cuda:0" if args.device == "cuda" else "cpu"
    pool = PoolExecutor([slot] * workers, threads_per_worker=threads)
    pool.wait_ready()
    # a short sweep so that every worker has paid its first-job costs (lazy imports, CUDA context)
    iterators, names = sweep(8 * workers)
    run_job_iterator([iterators[0][:1], iterators[1][:2 * workers]], names, config(args, MAX_ITER=5, FUSE="off"),
                     dict(base_bfn=powerlaw_bfn, dim=DIM), executor=pool, store=False, progress=False)
    return pool


def report(args, runs, title, plain_key, one_key):
    rate = {k: max(r[1] / r[0] for r in v) * 60 for k, v in runs.items()}
    cpu_rate = {k: max(r[1] / r[2] for r in v) * 60 for k, v in runs.items() if all(len(r) > 2 for r in v)}
    print(title)
    plain, one = rate[plain_key], rate[one_key]
    pool_best = max((v for k, v in rate.items() if k.startswith("one by one, pool")), default=float("nan"))
    print(f"{'':32s} {'jobs/min':>9s} {'vs plain':>9s} {'vs 1-by-1':>10s} {'vs best pool':>13s} "
          f"{'vs plain, CPU time':>19s}   all runs (wall s / jobs / CPU s)")
    for k, r in rate.items():
        detail = " ".join("/".join(f"{x:.1f}" if isinstance(x, float) else str(x) for x in run) for run in runs[k])
        cpu = f"{cpu_rate[k] / cpu_rate[plain_key]:18.2f}x" if k in cpu_rate and plain_key in cpu_rate else " " * 19
        print(f"{k:32s} {r:9.1f} {r / plain:8.2f}x {r / one:9.2f}x {r / pool_best:12.2f}x {cpu}   {detail}")
    load = os.getloadavg()
    print(f"load average (1, 5, 15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")


def main_widths(args):
    """The widths sweep: fused in width buckets against one by one, per-width fusing and the loops by hand."""
    full, names = widths_sweep(args)
    n = len(full[0]) * len(full[1]) * len(full[2])
    per_width = max(1, (args.sample or n) // len(full[0]))
    sample = [full[0], full[1][:per_width], full[2][:1]] if per_width < len(full[1]) * len(full[2]) else full
    n_sample = len(sample[0]) * len(sample[1]) * len(sample[2])
    runs: dict[str, list] = {}

    def add(name, result):
        runs.setdefault(name, []).append(result)

    for _ in range(args.repeats):
        add("plain loop (by hand)", time_plain_widths(args, sample, fused=False))
        add("one by one, in-process", time_sweep(args, "inprocess", 0, (sample, names), FUSE="off"))
        add("fused widths, in-process", time_sweep(args, "inprocess", 0, (full, names), FUSE="auto"))
        add("fused each width alone", summed([time_sweep(args, "inprocess", 0, ([[w]] + full[1:], names), FUSE="auto")
                                             for w in full[0]]))
        add("fused by hand, per width", time_plain_widths(args, full, fused=True))
    report(args, runs, f"{n} jobs: widths {full[0]} x {len(full[1])} LRs x {len(full[2])} trials, MLP d_in {DIM}, "
           f"depth {DEPTH}, {args.param}; {args.steps} SGD steps of {BSZ} samples; device {args.device}; torch "
           f"{torch.__version__}, {args.threads} thread(s), {os.cpu_count()} CPU cores; one-by-one modes timed on "
           f"{n_sample} jobs (every width); best of {args.repeats}", "plain loop (by hand)", "one by one, in-process")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--jobs", type=int, default=None, help="default 32 on CPU, 64 on CUDA")
    ap.add_argument("--width", type=int, default=None, help="default 128 on CPU, 256 on CUDA")
    ap.add_argument("--widths", type=int, nargs="+", default=None, help="a widths sweep of these widths instead")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--param", default="sp")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in this process")
    ap.add_argument("--sample", type=int, default=0, help="time one-by-one modes on this many jobs (0 = all)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-pool", action="store_true")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    args.jobs = args.jobs or (64 if cuda else 32)
    args.width = args.width or (256 if cuda else 128)
    n = len(sweep(args.jobs)[0][0]) * len(sweep(args.jobs)[0][1])
    sample = min(args.sample or n, n)
    torch.set_num_threads(args.threads)

    time_sweep(args, "inprocess", 8, MAX_ITER=5, FUSE="off")  # warm-up: lazy imports, CUDA context
    time_sweep(args, "inprocess", 8, MAX_ITER=5, FUSE="auto")
    plain_job(args, 0.01, 0, args.device)
    if args.widths:
        return main_widths(args)

    runs: dict[str, list] = {}

    def add(name, result):
        runs.setdefault(name, []).append(result)

    for _ in range(args.repeats):
        add("plain loop (by hand)", time_plain(args, sample))
        add("one by one, in-process", time_sweep(args, "inprocess", sample, FUSE="off"))
        add("fused, in-process", time_sweep(args, "inprocess", n, FUSE="auto"))
        add("fused by hand (bmm loop)", time_plain_fused(args, n))
    pools = [] if args.no_pool else ([(1, 1), (2, 1)] if cuda else [(2, 1), (1, 2)])
    for workers, threads in pools:
        pool = start_pool(args, workers, threads)
        try:
            for _ in range(args.repeats):
                add(f"one by one, pool {workers}x{threads} thr", time_sweep(args, pool, sample, FUSE="off")[:2])
                if workers > 1:  # the pool cuts the fused group so that each worker has its share
                    add(f"fused, pool {workers}x{threads} thr", time_sweep(args, pool, n, FUSE="auto")[:2])
        finally:
            pool.shutdown()
    report(args, runs, f"{n} jobs: MLP d_in {DIM}, width {args.width}, depth {DEPTH}, {args.param}; {args.steps} SGD "
           f"steps of {BSZ} samples; device {args.device}; torch {torch.__version__}, {args.threads} thread(s) in "
           f"this process, {os.cpu_count()} CPU cores; one-by-one modes timed on {sample} jobs; best of "
           f"{args.repeats}", "plain loop (by hand)", "one by one, in-process")
    fused, by_hand = runs["fused, in-process"], runs["fused by hand (bmm loop)"]
    print(f"fused in-process / bmm loop by hand: {max(j / t for t, j, _ in fused) / max(j / t for t, j, _ in by_hand):.3f}x "
          f"wall, {max(j / c for _, j, c in fused) / max(j / c for _, j, c in by_hand):.3f}x CPU time")


if __name__ == "__main__":
    main()
