"""Per-job overhead of each backend against the local pool, on tiny jobs.

    python benchmarks/bench_backends.py [--small 8] [--large 24] [--workers 2]

Each backend runs a sweep of ``--small`` jobs and one of ``--large`` jobs (a few SGD steps on a width-8 MLP,
results stored in a fresh store). The per-job cost is the slope (T_large - T_small) / (large - small), which
leaves start-up out; start-up is the intercept. A 2-job warm-up sweep per backend goes first. Backends: ``inprocess`` (the jobs' own time), ``pool``
(``--workers`` spawned workers), ``ray`` (a local Ray with ``--workers`` CPUs, started once, its start-up
timed apart; its workers stay up between sweeps), ``slurm`` (submitit's local cluster, ``--workers`` array tasks, each a local pool of one).
"""
import argparse
import os
import tempfile
import time

import torch

from modelscape.backend.cli import base_args
from modelscape.backend import slurm
from modelscape.backend.job_iterator import main


def bfn(bsz, gen, X, y, dim=4):
    w = torch.linspace(-1.0, 1.0, dim, device=gen.device)

    def batch_fn(step):
        Xb = torch.randn(bsz, dim, generator=gen, device=gen.device)
        return Xb, (Xb @ w).unsqueeze(1)
    return batch_fn


def sweep(kind, n, workers, root):
    g = vars(base_args())
    g.update(PARAMETERIZATION="sp", MAX_ITER=20, N_TEST=32, N_SAMPLES=16, WIDTH=8, EVAL_EVERY=0,
             LOSS_CHECKPOINTS=[1e-9], WORKERS_PER_DEVICE=workers if kind == "pool" else 1, EXECUTOR=kind,
             SLURM_SHARDS=workers, RESULTS_DIR=root, EXPT_NAME=f"{kind}-{n}",
             FUSE="off")  # one job per unit of work: fused, the jobs of a sweep would travel as one
    t0 = time.perf_counter()
    res = main([range(n)], ["trial"], g, dict(base_bfn=bfn), progress=False)
    wall = time.perf_counter() - t0
    assert len(res.records) == n and not res.failed(), res.failed()[:1]
    return wall


def main_():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", type=int, default=8)
    p.add_argument("--large", type=int, default=24)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(1)
    slurm.CLUSTER = "local"
    import ray
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    t0 = time.perf_counter()
    ray.init(num_cpus=args.workers, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    print(f"ray.init: {time.perf_counter() - t0:.1f} s (once per session, not counted below)")
    per_job = {}
    with tempfile.TemporaryDirectory() as root:
        for kind in ("inprocess", "pool", "ray", "slurm"):
            sweep(kind, 2, args.workers, root)  # warm-up: first-call imports and, for Ray, its worker processes
            small, large = (sweep(kind, n, args.workers, root) for n in (args.small, args.large))
            per_job[kind] = (large - small) / (args.large - args.small)
            start = small - per_job[kind] * args.small
            print(f"{kind:>9}: {small:6.2f} s for {args.small} jobs, {large:6.2f} s for {args.large}: "
                  f"{1000 * per_job[kind]:7.1f} ms per job, start-up {start:5.1f} s")
    ray.shutdown()
    base = per_job["pool"]
    for kind in ("ray", "slurm"):
        print(f"{kind} vs pool: {1000 * (per_job[kind] - base):+.1f} ms per job "
              f"({per_job[kind] / base:.2f}x the pool's per-job time)")


if __name__ == "__main__":
    main_()
