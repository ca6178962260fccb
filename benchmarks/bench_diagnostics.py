"""What ``LayerDiagnostics`` costs: one evaluation of the per-layer diagnostics against one training step.

An MLP (d_in 256, width ``--width``, depth ``--depth``), SGD on MSE with batches of ``--batch``: a plain hand-written
step is timed, then one warm call of the grab (power iterations from the last singular vectors, one forward pass
for the alignment) on the same model. The grab runs once every EVAL_EVERY steps, so its share of the training time
is ``(diagnostics / EVAL_EVERY) / step``; printed for EVAL_EVERY 100 and 10. Best of ``--repeats``.

    python benchmarks/bench_diagnostics.py [--width 1024] [--depth 3] [--batch 256] [--repeats 5]
"""
from __future__ import annotations

import argparse
import time

import torch

from modelscape.diagnostics import LayerDiagnostics
from modelscape.models import MLP


def best_time(fn, repeats, inner):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = MLP(d_in=256, width=args.width, depth=args.depth).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    X, y = torch.randn(args.batch, 256, device=dev), torch.randn(args.batch, 1, device=dev)

    def step():
        loss = (model(X) - y).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    diag = LayerDiagnostics()
    calls = iter(range(10 ** 9))

    def evaluate():
        diag(model, X_tr=X, step=next(calls))
        if dev.type == "cuda":
            torch.cuda.synchronize()

    evaluate()  # the first call starts cold (more power iterations); every later one is warm
    t_step = best_time(step, args.repeats, 20)
    t_diag = best_time(evaluate, args.repeats, 3)
    print(f"MLP d_in 256, width {args.width}, depth {args.depth}, batch {args.batch}, {dev}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; best of {args.repeats}")
    print(f"one training step        {t_step * 1e3:8.2f} ms")
    print(f"one diagnostics call     {t_diag * 1e3:8.2f} ms  ({t_diag / t_step:.2f} steps)")
    for every in (100, 10):
        print(f"share of training time at EVAL_EVERY={every:<3d}: {t_diag / every / t_step:6.2%}")


if __name__ == "__main__":
    main()
