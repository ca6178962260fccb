"""What ``step_hooks`` cost at the steps where no hook is due.

Two measurements, on the CPU with one thread:

1. ``StepHooks.before_step`` alone, called for ``--calls`` idle steps (hooks at a step never reached and on a
   range already past), in nanoseconds per call, against one step of a plain hand-written PyTorch loop (the
   MLP of ``bench_trainloop.py``): the ratio is the fraction of a step the idle hooks add.
2. ``run_config`` of that job with and without an idle hook (one due only at step 10**9), interleaved, best of
   ``--repeats``: the ratio of their steps per second.

    python benchmarks/bench_step_hooks.py [--steps 400] [--repeats 3] [--calls 1000000]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from modelscape.backend.interventions import StepHooks, check_step_hooks
from modelscape.backend.job import run_config
from modelscape.data import powerlaw_bfn
from modelscape.models import MLP

D_IN, WIDTH, DEPTH, BSZ, LR = 32, 256, 2, 128, 1e-2


def noop(model, opt, step):
    pass


def idle_calls_ns(calls: int) -> float:
    """Nanoseconds per ``before_step`` call at steps where no hook is due."""
    obs = StepHooks(check_step_hooks({10**9: noop, (0, 1): noop}), {})
    model = nn.Linear(2, 1)
    obs.before_step(0, model, None)  # the range hook runs once; every later step is idle
    t0 = time.perf_counter()
    for step in range(1, calls + 1):
        obs.before_step(step, model, None)
    return (time.perf_counter() - t0) / calls * 1e9


def plain_step_ns(steps: int) -> float:
    gen = torch.Generator().manual_seed(0)
    bfn = powerlaw_bfn(BSZ, gen, dim=D_IN)
    model = MLP(d_in=D_IN, width=WIDTH, depth=DEPTH)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss_fn = nn.MSELoss()
    t0 = time.perf_counter()
    for step in range(steps):
        X, y = bfn(step)
        loss = loss_fn(model(X), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()
    return (time.perf_counter() - t0) / steps * 1e9


def run_seconds(steps: int, hooks: bool) -> float:
    config = dict(PARAMETERIZATION="sp", WIDTH=WIDTH, DEPTH=DEPTH, N_SAMPLES=BSZ, N_TEST=256, MAX_ITER=steps,
                  LR=LR, LOSS_CHECKPOINTS=[1e-30], SYNC_EVERY=1, FUSE="off")
    if hooks:
        config["step_hooks"] = {10**9: noop}
    t0 = time.perf_counter()
    run_config(config, dict(base_bfn=powerlaw_bfn, dim=D_IN), quiet=True)
    return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calls", type=int, default=1_000_000)
    args = parser.parse_args()
    torch.set_num_threads(1)

    idle = idle_calls_ns(args.calls)
    step = min(plain_step_ns(args.steps) for _ in range(args.repeats))
    print(f"idle before_step: {idle:.0f} ns per step; a plain PyTorch step: {step / 1e3:.0f} us; "
          f"ratio {idle / step:.2e}")
    without, with_ = [], []
    for _ in range(args.repeats):  # interleaved: a shared machine's load hits both alike
        without.append(run_seconds(args.steps, hooks=False))
        with_.append(run_seconds(args.steps, hooks=True))
    print(f"run_config, {args.steps} steps: {min(without):.3f} s without hooks, {min(with_):.3f} s with an idle "
          f"hook; ratio {min(with_) / min(without):.3f}")


if __name__ == "__main__":
    main()
