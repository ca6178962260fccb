"""What TENSORBOARD=True costs a job: wall time with it over wall time without, in one process, and the share of
the job's CPU time spent inside the TensorBoard observer (less sensitive to a shared machine than the ratio).

A small MLP (width 64, depth 2, 64 samples a step: steps are short, so the writing shows) on ``powerlaw_bfn``,
on the CPU with one thread, for ``--steps`` steps (thresholds never reached): alone with curves
(ONLYTHRESHOLDS=False: raw and EMA loss per step, test loss and a grab every 50 steps), alone without curves
(the EMA at every read-back), and a fused group of 8 such jobs with curves (8 runs written from one process).
Each measurement is repeated ``--repeats`` times, interleaved, and the best kept (the machine may be shared).

    python benchmarks/bench_tensorboard.py [--steps 2000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from modelscape.backend import tensorboard
from modelscape.backend.fused import run_group
from modelscape.backend.job import run_config
from modelscape.data import powerlaw_bfn

BFN = dict(base_bfn=powerlaw_bfn, dim=16)


def out_norm(model, **kwargs):
    return float(model.output_layer.weight.detach().norm())


def config(steps, results_dir, curves, tensorboard):
    return dict(PARAMETERIZATION="mup", WIDTH=64, DEPTH=2, N_SAMPLES=64, N_TEST=256, LR=0.05, MAX_ITER=steps,
                LOSS_CHECKPOINTS=[-1.0], EVAL_EVERY=50, ONLYTHRESHOLDS=not curves, TENSORBOARD=tensorboard,
                RESULTS_DIR=results_dir, EXPT_NAME="bench", otherreturns={"out_norm": out_norm})


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this thread) of ``fn()``."""
    t, c = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - t, time.thread_time() - c


OBSERVER_CPU = [0.0]  # CPU seconds spent in the observer's methods


def count_observer_time():
    """Wrap the observer's methods so that the CPU time they take adds up in OBSERVER_CPU."""
    for name in ("after_sync", "at_end"):
        method = getattr(tensorboard.TensorBoardObserver, name)

        def wrapped(self, *args, _method=method):
            c = time.thread_time()
            _method(self, *args)
            OBSERVER_CPU[0] += time.thread_time() - c
        setattr(tensorboard.TensorBoardObserver, name, wrapped)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    count_observer_time()
    results_dir = tempfile.mkdtemp(prefix="bench_tensorboard_")
    cases = {
        "alone, curves": lambda tb: run_config(config(args.steps, results_dir, True, tb), BFN, axes={"trial": 0}),
        "alone, no curves": lambda tb: run_config(config(args.steps, results_dir, False, tb), BFN,
                                                  axes={"trial": 0}),
        "fused group of 8, curves": lambda tb: run_group(
            [(dict(config(args.steps, results_dir, True, tb), trial=t), {"trial": t}) for t in range(8)], BFN),
    }
    print(f"{args.steps} steps, best of {args.repeats} (wall seconds); TensorBoard runs in {results_dir}")
    for name, run in cases.items():
        best = {False: float("inf"), True: float("inf")}
        share = float("inf")
        for _ in range(args.repeats):
            for tb in (False, True):
                OBSERVER_CPU[0] = 0.0
                wall, cpu = timed(lambda: run(tb))
                best[tb] = min(best[tb], wall)
                if tb:
                    share = min(share, OBSERVER_CPU[0] / cpu)
        print(f"  {name:26s} without {best[False]:7.3f}  with {best[True]:7.3f}  ratio {best[True] / best[False]:.3f}"
              f"  observer {100 * share:.1f}% of the job's CPU time")


if __name__ == "__main__":
    main()
