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
- fused, pool: FUSE=auto with FUSE_MAX = jobs / workers, so each of 2 workers trains half of the sweep;
- fused by hand: the ideal a user could write, every job in one batched-matmul loop (no thresholds, records).

One-by-one runs are the slow ones: ``--sample N`` times only the first N jobs of the sweep for them (each job
costs the same, so jobs/minute is unchanged) to keep the benchmark short on a shared machine. Every mode runs
``--repeats`` times, interleaved; the best time is kept and all are printed, with the load average.

    python benchmarks/bench_fused.py [--repeats 2] [--sample 8] [--threads 2] [--device cuda]
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


def config(args, **kw):
    g = vars(base_args())
    g.update(PARAMETERIZATION=args.param, WIDTH=args.width, DEPTH=DEPTH, MAX_ITER=args.steps, N_SAMPLES=BSZ,
             N_TEST=N_TEST, LOSS_CHECKPOINTS=[1e-12], CENTER=False, EVAL_EVERY=0, ONLYTHRESHOLDS=True,
             SYNC_EVERY=0, DEVICES=[0] if args.device == "cuda" else [],  # no DEVICES: CPU even where CUDA is
             THREADS=args.threads)  # the in-process executor's threads (else the idle cores of a busy machine)
    g.update(kw)
    return g


def time_sweep(args, executor, n_jobs, **kw):
    iterators, names = sweep(n_jobs)
    t = time.perf_counter()
    res = run_job_iterator(iterators, names, config(args, **kw), dict(base_bfn=powerlaw_bfn, dim=DIM),
                           executor=executor, store=False, progress=False)
    if args.device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t
    counts = res.status_counts()
    assert counts == {"not_reached": len(res.records)}, counts
    return elapsed, len(res.records)


def plain_job(args, lr, trial, device):
    """What a user would write by hand for one configuration."""
    gen = torch.Generator(device=device).manual_seed(1000 + trial)
    torch.manual_seed(2000 + trial)
    lambdas, w = (t.to(device) for t in powerlaw_target(DIM))
    scale = lambdas.sqrt()

    def batch(n):
        X = torch.randn(n, DIM, generator=gen, device=device) * scale
        return X, (X @ w).unsqueeze(1)

    X_te, y_te = batch(N_TEST)
    layers = [nn.Linear(DIM, args.width), nn.ReLU()]
    for _ in range(DEPTH - 1):
        layers += [nn.Linear(args.width, args.width), nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(args.width, 1)).to(device)
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


def plain_fused(args, lrs, trials, device):
    """What a user would write by hand to train every job at once with batched matmuls (the fused ideal)."""
    jobs = [(lr, trial) for lr in lrs for trial in trials]
    gens = [torch.Generator(device=device).manual_seed(1000 + t) for _, t in jobs]
    lambdas, w = (t.to(device) for t in powerlaw_target(DIM))
    scale = lambdas.sqrt()
    G, dims = len(jobs), [DIM] + [args.width] * DEPTH + [1]
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


def time_plain_fused(args, n_jobs):
    (lrs, trials), _ = sweep(n_jobs)
    t = time.perf_counter()
    n = plain_fused(args, lrs, trials, args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, n


def time_plain(args, n_jobs):
    (lrs, trials), _ = sweep(n_jobs)
    t = time.perf_counter()
    for lr in lrs:
        for trial in trials:
            plain_job(args, lr, trial, args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, len(lrs) * len(trials)


def start_pool(args, workers, threads):
    slot = "cuda:0" if args.device == "cuda" else "cpu"
    pool = PoolExecutor([slot] * workers, threads_per_worker=threads)
    pool.wait_ready()
    # a short sweep so that every worker has paid its first-job costs (lazy imports, CUDA context)
    iterators, names = sweep(8 * workers)
    run_job_iterator([iterators[0][:1], iterators[1][:2 * workers]], names, config(args, MAX_ITER=5, FUSE="off"),
                     dict(base_bfn=powerlaw_bfn, dim=DIM), executor=pool, store=False, progress=False)
    return pool


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--jobs", type=int, default=None, help="default 32 on CPU, 64 on CUDA")
    ap.add_argument("--width", type=int, default=None, help="default 128 on CPU, 256 on CUDA")
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
                add(f"one by one, pool {workers}x{threads} thr", time_sweep(args, pool, sample, FUSE="off"))
                if workers > 1:
                    add(f"fused, pool {workers}x{threads} thr",
                        time_sweep(args, pool, n, FUSE="auto", FUSE_MAX=-(-n // workers)))
        finally:
            pool.shutdown()

    rate = {k: max(jobs / t for t, jobs in v) * 60 for k, v in runs.items()}
    print(f"{n} jobs: MLP d_in {DIM}, width {args.width}, depth {DEPTH}, {args.param}; {args.steps} SGD steps of "
          f"{BSZ} samples; device {args.device}; torch {torch.__version__}, {args.threads} thread(s) in this "
          f"process, {os.cpu_count()} CPU cores; one-by-one modes timed on {sample} jobs; best of {args.repeats}")
    plain = rate["plain loop (by hand)"]
    one = rate["one by one, in-process"]
    pool_best = max((v for k, v in rate.items() if k.startswith("one by one, pool")), default=float("nan"))
    print(f"{'':28s} {'jobs/min':>9s} {'vs plain':>9s} {'vs 1-by-1':>10s} {'vs best pool':>13s}   all runs (s, jobs)")
    for k, r in rate.items():
        detail = " ".join(f"{t:.1f}/{j}" for t, j in runs[k])
        print(f"{k:28s} {r:9.1f} {r / plain:8.2f}x {r / one:9.2f}x {r / pool_best:12.2f}x   {detail}")
    load = os.getloadavg()
    print(f"load average (1, 5, 15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")


if __name__ == "__main__":
    main()
