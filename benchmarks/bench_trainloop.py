"""Steps per second of modelscape's ``train_loop`` against a plain hand-written PyTorch loop.

Same MLP (d_in 32, width 256, depth 2, d_out 1), same batch function (``powerlaw_bfn``, 128 samples a step),
SGD and MSE, on the CPU with one thread, online (fresh batch each step) and offline (one fixed training set),
with a 2000-sample test set. modelscape goes through ``run_config`` (seeding, data, model, centering, the
trainloop) with thresholds that are never reached, so every run takes exactly ``--steps`` steps; the time of
``train_loop`` alone is taken by wrapping it, and ``run_config`` end to end is shown as well. Rates are given per
wall-clock second and per CPU second of the (single) training thread; each measurement is repeated
``--repeats`` times, interleaved, and the best is kept (the machine may be shared). The last row has live progress
on, as in a sweep's worker (``LIVE_EVERY=1``: a report at the first step and then once a second, to a sink that
drops it): the cost of ``LiveObserver`` on the hot path.

    python benchmarks/bench_trainloop.py [--steps 400] [--repeats 3]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import modelscape.backend.job as job
from modelscape.backend import live
from modelscape.data import powerlaw_bfn
from modelscape.models import MLP

D_IN, WIDTH, DEPTH, BSZ, N_TEST, LR = 32, 256, 2, 128, 2000, 1e-2


def clock():
    return time.perf_counter(), time.thread_time()


def rates(steps, t0):
    """(steps per wall second, steps per CPU second of this thread) since ``t0 = clock()``."""
    wall, cpu = clock()
    return steps / (wall - t0[0]), steps / (cpu - t0[1])


def plain_loop(online: bool, steps: int) -> tuple[float, float]:
    """The loop a user would write by hand; returns (wall, CPU) steps/second."""
    gen = torch.Generator().manual_seed(0)
    X_te, y_te = powerlaw_bfn(N_TEST, gen, dim=D_IN)(0)
    if online:
        bfn = powerlaw_bfn(BSZ, gen, dim=D_IN)
    else:
        X_tr, y_tr = powerlaw_bfn(BSZ, gen, dim=D_IN)(0)
        bfn = powerlaw_bfn(BSZ, gen, X_tr, y_tr, dim=D_IN)
    torch.manual_seed(0)
    model = MLP(d_in=D_IN, width=WIDTH, depth=DEPTH)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss_fn = nn.MSELoss()
    t0 = clock()
    for step in range(steps):
        X, y = bfn(step)
        loss = loss_fn(model(X), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()
    with torch.no_grad():
        loss_fn(model(X_te), y_te).item()  # the final test loss, as train_loop reports it
    return rates(steps, t0)


def modelscape_loop(online: bool, center: bool, steps: int, curves: bool = False, live_every: float = 0.0):
    """run_config with MAX_ITER=steps; returns ((wall, CPU) steps/s of train_loop, the same of run_config).

    ``live_every`` > 0: live progress on, as in a sweep's worker (a sink that drops the messages)."""
    config = dict(PARAMETERIZATION="sp", ONLINE=online, CENTER=center, WIDTH=WIDTH, DEPTH=DEPTH, N_SAMPLES=BSZ,
                  N_TEST=N_TEST, MAX_ITER=steps, LR=LR, LOSS_CHECKPOINTS=[1e-30], ONLYTHRESHOLDS=not curves,
                  EVAL_EVERY=100, SYNC_EVERY=1, LIVE_EVERY=live_every)
    timing = {}
    inner = job.train_loop

    def timed_train_loop(*args, **kwargs):
        t0 = clock()
        out = inner(*args, **kwargs)
        timing["train_loop"] = rates(steps, t0)
        return out

    job.train_loop = timed_train_loop
    try:
        t0 = clock()
        with live.reporting((lambda msg: None) if live_every else None):
            result = job.run_config(config, dict(base_bfn=powerlaw_bfn, dim=D_IN), quiet=True)
        total = rates(steps, t0)
    finally:
        job.train_loop = inner
    assert result["status"] == "not_reached" and result["steps"] == steps, result["status"]
    return timing["train_loop"], total


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)

    labels = ["plain PyTorch loop", "train_loop, CENTER=False", "train_loop, CENTER=True",
              "train_loop, CENTER=True, curves (EVAL_EVERY=100)", "run_config end to end, CENTER=True",
              "train_loop, CENTER=True, curves + live progress"]
    rows = []  # (mode, label)
    cases = []  # (mode, fn) where fn() -> {label: steps/s}
    for online in (True, False):
        mode = "online" if online else "offline"
        rows += [(mode, label) for label in labels]
        cases.append((mode, lambda o=online: {labels[0]: plain_loop(o, args.steps)}))
        cases.append((mode, lambda o=online: {labels[1]: modelscape_loop(o, False, args.steps)[0]}))
        cases.append((mode, lambda o=online: dict(zip(labels[2::2], modelscape_loop(o, True, args.steps)))))
        cases.append((mode, lambda o=online: {labels[3]: modelscape_loop(o, True, args.steps, curves=True)[0]}))
        cases.append((mode, lambda o=online: {labels[5]: modelscape_loop(o, True, args.steps, curves=True,
                                                                          live_every=1.0)[0]}))

    # warm-up (allocator, first-call overheads), then interleaved repeats keeping the best
    plain_loop(True, 50)
    modelscape_loop(True, True, 50)
    best = {}
    for _ in range(args.repeats):
        for mode, fn in cases:
            for label, sps in fn().items():
                old = best.get((mode, label), (0.0, 0.0))
                best[mode, label] = (max(old[0], sps[0]), max(old[1], sps[1]))

    print(f"MLP d_in={D_IN} width={WIDTH} depth={DEPTH}, batch {BSZ}, N_TEST={N_TEST}, SGD + MSE, CPU, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread, {args.steps} steps, best of "
          f"{args.repeats}")
    print("steps/s per wall-clock second, and per CPU second of the training thread (steadier when the machine "
          "is shared)")
    print(f"{'mode':<8} {'loop':<52} {'wall':>8} {'vs plain':>9} {'CPU':>8} {'vs plain':>9}")
    for mode, label in rows:
        (wall, cpu), (pwall, pcpu) = best[mode, label], best[mode, "plain PyTorch loop"]
        print(f"{mode:<8} {label:<52} {wall:>8.1f} {wall / pwall:>9.3f} {cpu:>8.1f} {cpu / pcpu:>9.3f}")


if __name__ == "__main__":
    main()
