"""Does a sweep keep the GPU busy? Jobs per minute and mean GPU utilization, mode by mode, against a plain loop.

Two sweeps of muP MLPs (d_in 32, depth 2, batch 256, SGD, MSE, online ``powerlaw_bfn``, thresholds never reached so
every job runs ``--steps`` steps, no store):

- ``lrs``: 32 jobs, 4 learning rates x 8 trials at width ``--width`` (1024);
- ``widths``: 64 jobs, widths 256 / 512 / 1024 / 2048 x 8 learning rates x 2 trials.

Modes (each through ``run_job_iterator`` unless said otherwise):

- plain loop: what a user writes by hand for one job, every job one after the other in this process;
- 1-by-1, 1 worker: FUSE=off, WORKERS_PER_DEVICE=1, CUDA_GRAPHS=off (one process per GPU, every step eager);
- 1-by-1, 1 worker, graphs: the same with CUDA_GRAPHS=auto;
- 1-by-1, auto workers, graphs: WORKERS_PER_DEVICE=0 (sized from free memory and cores), CUDA_GRAPHS=auto;
- default: FUSE=auto, WORKERS_PER_DEVICE=0, CUDA_GRAPHS=auto (fused groups; widths fuse where the engine can).

For each: jobs/min, the ratio to the plain loop's jobs/min, and the mean GPU utilization over the mode (NVML through
``torch.cuda.utilization``, else ``nvidia-smi``, sampled every 0.25 s). Pools are started and warmed up before the
clock starts, as a sweep's own pool starts while its driver prepares. ``--quick`` shrinks everything (and runs on
the CPU too) to check the script itself.

    python benchmarks/bench_gpu.py [--steps 300] [--width 1024] [--sweeps lrs widths] [--quick]
"""
from __future__ import annotations

import argparse
import math
import subprocess
import threading
import time

import torch
from torch import nn

from modelscape.backend.cli import base_args
from modelscape.backend.executors import PoolExecutor, slots
from modelscape.backend.job_iterator import main as run_job_iterator
from modelscape.data import powerlaw_bfn
from modelscape.models import MLP

DIM, DEPTH, BSZ = 32, 2, 256


class Utilization:
    """Mean GPU utilization (%) between ``start`` and ``stop``, sampled in a thread; NaN where it cannot be read."""

    def __init__(self, device: int = 0, every: float = 0.25):
        self.device, self.every, self.samples = device, every, []
        self._stop = threading.Event()
        self._thread = None

    def read(self):
        try:
            return float(torch.cuda.utilization(self.device))
        except Exception:  # no NVML bindings: ask nvidia-smi
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      "-i", str(self.device)], capture_output=True, text=True, timeout=5)
                return float(out.stdout.strip().splitlines()[0])
            except Exception:
                return math.nan

    def start(self):
        self.samples, self._stop = [], threading.Event()
        if torch.cuda.is_available():
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()

    def _run(self):
        while not self._stop.wait(self.every):
            self.samples.append(self.read())

    def stop(self) -> float:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        vals = [s for s in self.samples if not math.isnan(s)]
        return sum(vals) / len(vals) if vals else math.nan


def sweeps(args):
    lrs = [0.05 * 2 ** k for k in range(4)]
    out = {"lrs": ([lrs, list(range(8))], ["LR", "trial"], {"WIDTH": args.width}),
           "widths": ([[256, 512, 1024, 2048], [0.02 * 1.5 ** k for k in range(8)], [0, 1]], ["WIDTH", "LR", "trial"],
                      {})}
    if args.quick:
        out = {"lrs": ([lrs[:2], [0, 1]], ["LR", "trial"], {"WIDTH": 64}),
               "widths": ([[32, 64], lrs[:2], [0]], ["WIDTH", "LR", "trial"], {})}
    return {k: v for k, v in out.items() if k in args.sweeps}


def config(args, **kw):
    g = vars(base_args())
    g.update(PARAMETERIZATION="mup", DEPTH=DEPTH, MAX_ITER=args.steps, N_SAMPLES=BSZ, N_TEST=512,
             LOSS_CHECKPOINTS=[1e-12], EVAL_EVERY=0, ONLYTHRESHOLDS=True, DEVICES=[0], LIVE_EVERY=0.0)
    g.update(kw)
    return g


def plain(args, iterators, names, fixed, device):
    """Every job as a user writes it by hand: build, parameterize (muP), train ``--steps`` steps, read the loss."""
    from modelscape import mup
    jobs = [dict(zip(names, combo), **fixed) for combo in __import__("itertools").product(*iterators)]
    t = time.perf_counter()
    for job in jobs:
        gen = torch.Generator(device=device).manual_seed(job.get("trial", 0))
        bfn = powerlaw_bfn(BSZ, gen, dim=DIM)
        torch.manual_seed(job.get("trial", 0))
        model = MLP(d_in=DIM, width=job["WIDTH"], depth=DEPTH).to(device)
        opt = mup.parameterize(model, "mup", torch.optim.SGD, job["LR"], example_input=bfn(0)[0])
        loss_fn = nn.MSELoss()
        for step in range(args.steps):
            X, y = bfn(step)
            loss = loss_fn(model(X), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        float(loss.detach())
    return len(jobs), time.perf_counter() - t


def timed(args, iterators, names, fixed, workers, **kw):
    g = config(args, **fixed, **kw)
    where = slots(g["DEVICES"], workers)
    with PoolExecutor(where, threads_per_worker=0) as pool:
        pool.wait_ready()
        t = time.perf_counter()
        res = run_job_iterator(iterators, names, g, dict(base_bfn=powerlaw_bfn, dim=DIM), executor=pool, store=False,
                               progress=False)
        elapsed = time.perf_counter() - t
    counts = res.status_counts()
    assert set(counts) <= {"not_reached", "diverged"}, counts
    return len(res.records), elapsed, len(where)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--sweeps", nargs="+", default=["lrs", "widths"], choices=["lrs", "widths"])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check the script (runs on the CPU too)")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 20)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.quick:
        ap.error("no CUDA device: this benchmark measures GPU utilization (use --quick to check it on the CPU)")
    modes = [("1-by-1, 1 worker", 1, dict(FUSE="off", CUDA_GRAPHS="off")),
             ("1-by-1, 1 worker, graphs", 1, dict(FUSE="off", CUDA_GRAPHS="auto")),
             ("1-by-1, auto workers, graphs", 0, dict(FUSE="off", CUDA_GRAPHS="auto")),
             ("default (fused, auto workers, graphs)", 0, dict(FUSE="auto", CUDA_GRAPHS="auto"))]
    util = Utilization()
    warm = argparse.Namespace(**{**vars(args), "steps": 3})
    plain(warm, [[0.1]], ["LR"], {"WIDTH": 64}, device)  # first-call costs (lazy imports, CUDA context) untimed
    print(f"{device}{' ' + torch.cuda.get_device_name(0) if device == 'cuda' else ''}, torch {torch.__version__}, "
          f"{args.steps} steps a job, batch {BSZ}")
    for name, (iterators, names, fixed) in sweeps(args).items():
        print(f"\nsweep {name}: {dict(zip(names, iterators))} {fixed}")
        print(f"{'mode':<40} {'workers':>7} {'jobs':>5} {'s':>8} {'jobs/min':>9} {'vs plain':>9} {'GPU util':>9}")
        util.start()
        n, secs = plain(args, iterators, names, fixed, device)
        base = n / secs * 60
        print(f"{'plain loop (by hand)':<40} {1:>7} {n:>5} {secs:>8.1f} {base:>9.1f} {1.0:>8.2f}x "
              f"{util.stop():>8.0f}%")
        for label, workers, kw in modes:
            util.start()
            n, secs, w = timed(args, iterators, names, fixed, workers, **kw)
            rate = n / secs * 60
            print(f"{label:<40} {w:>7} {n:>5} {secs:>8.1f} {rate:>9.1f} {rate / base:>8.2f}x {util.stop():>8.0f}%")


if __name__ == "__main__":
    main()
