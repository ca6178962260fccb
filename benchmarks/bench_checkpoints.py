"""What CHECKPOINTS costs a job's step loop, against the same job without checkpoints, in one process.

    python benchmarks/bench_checkpoints.py [--width 256] [--steps 2000] [--sync 1] [--repeats 3]

One online MLP job (train_loop, CPU, one thread) is trained with CHECKPOINTS: none; `final`; a step every 500
(each a file written from the loop); `thresholds` (a copy of the model's state before every step until the
last threshold is crossed, saved at each crossing; the thresholds sit below what the job reaches, so the copies
go on for the whole run, the worst case); `thresholds` with CHECKPOINT_OPTIMIZER (Adam, so two more copies per
step). Prints the best time of ``--repeats`` runs of each (taken round robin) and its ratio to the job without checkpoints.
"""
import argparse
import tempfile
import time

import torch

from modelscape.backend.job import prepare_job, train_prepared


def bfn(bsz, gen, X=None, y=None):
    w = torch.linspace(-1.0, 1.0, 16, device=gen.device)

    def batch(step):
        x = torch.randn(bsz, 16, generator=gen, device=gen.device)
        return x, x @ w
    return batch


def timed(cfg, root, tag):
    job = prepare_job(dict(cfg, RESULTS_DIR=root, EXPT_NAME="bench", JOB_ID=tag), dict(base_bfn=bfn))
    t0 = time.perf_counter()
    train_prepared(job)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--sync", type=int, default=1, help="SYNC_EVERY")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = dict(WIDTH=args.width, DEPTH=2, N_SAMPLES=64, N_TEST=256, MAX_ITER=args.steps, LR=0.01,
                LOSS_CHECKPOINTS=[1e-12], EVAL_EVERY=0, SYNC_EVERY=args.sync, OPTIMIZER="Adam")
    cases = [("none", {}), ("final", dict(CHECKPOINTS=["final"])),
             ("every 500 steps", dict(CHECKPOINTS=list(range(0, args.steps, 500)))),
             ("thresholds", dict(CHECKPOINTS=["thresholds"])),
             ("thresholds + optimizer", dict(CHECKPOINTS=["thresholds"], CHECKPOINT_OPTIMIZER=True))]
    times = {name: float("inf") for name, _ in cases}
    with tempfile.TemporaryDirectory() as root:
        for k in range(args.repeats):  # round robin, so a load change on a shared machine hits every case alike
            for name, extra in cases:
                times[name] = min(times[name], timed({**base, **extra}, root, f"{k}-{name}"))
    print(f"MLP width {args.width}, {args.steps} steps, SYNC_EVERY {args.sync}, Adam, CPU, 1 thread")
    for name, t in times.items():
        print(f"  {name:24s} {t:7.3f} s   x{t / times['none']:.3f}")


if __name__ == "__main__":
    main()
