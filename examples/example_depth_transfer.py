"""Depth transfer on the GPT: does the best learning rate of a shallow model carry over to a deep one?

``modelscape.models.GPT`` at one width, trained online with Adam under muP on a synthetic language (a random
second-order Markov chain, ``modelscape.data.markov_bfn``), for depths x learning rates, without depth rules
(``DEPTH_ALPHA`` 0) and with them (1: CompleteP; 0.5: Depth-muP): every residual branch multiplied by
``(L / BASE_DEPTH)**-DEPTH_ALPHA``, the learning rates inside the blocks scaled to match (``modelscape.mup.depth``).

1. the transfer figure: final test loss against LR, one curve per depth, one panel per ``DEPTH_ALPHA``, each
   curve's optimum read between grid points (``res.best``) and its drift in octaves per doubling of depth;
2. the depth coordinate check (``coord_check_depth``): how much the residual stream after the last block, and
   every layer, moves in the first steps, against depth (flat under the depth rules, growing without).

    python examples/example_depth_transfer.py                  # ~9 min on 2 busy CPU cores
    python examples/example_depth_transfer.py --depths 2 8 --lrs -4 -3 -2 --MAX_ITER 30     # seconds

Flags of its own: ``--depths``, ``--alphas`` (DEPTH_ALPHA values), ``--lrs`` (log2 of the learning rates),
``--out``. Any hyperparameter flag (``--WIDTH``, ``--MAX_ITER``, ``--NUM_TRIALS``, ``--BASE_DEPTH`` ...) applies to
every run. Writes ``<out>/results.db`` (a rerun skips the jobs already stored), ``<out>/depth_transfer.png`` and
``<out>/coord_check_depth.png``; ``--out`` defaults to RESULTS_DIR/EXPT_NAME, ``results/example_depth_transfer``.
"""
import argparse
import os
import sys

import numpy as np
import torch

from modelscape.backend.cli import build_parser, parse_args
from modelscape.backend.job_iterator import main as run_job_iterator
from modelscape.data import markov_bfn, markov_entropy_rate
from modelscape.models import GPT
from modelscape.mup import coord_check_depth, plot_coord_check
from modelscape.plotting import plot_lr_transfer
from modelscape.transfer import drift

NAME = "example_depth_transfer"
LANGUAGE = {"vocab_size": 16, "seq_len": 16, "order": 2, "branching": 3}
COMMON = {"MODEL": "GPT", "OPTIMIZER": "Adam", "LOSS": "cross_entropy", "PARAMETERIZATION": "mup", "WIDTH": 64,
          "n_heads": 4, "mlp_mult": 2, "ONLINE": True, "N_SAMPLES": 16, "N_TEST": 256, "MAX_ITER": 300,
          "NUM_TRIALS": 2, "BASE_DEPTH": 2, "CENTER": False,
          "LOSS_CHECKPOINTS": [1e-6],  # out of reach: every job trains for MAX_ITER steps
          **LANGUAGE}
AXES = ["DEPTH_ALPHA", "DEPTH", "LR", "trial"]


def parse(argv):
    """``(out folder, this script's own flags, the hyperparameters)``: the flags typed on the command line over
    ``COMMON``."""
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    own.add_argument("--out", default=None, help=f"folder for the store and figures (default: RESULTS_DIR/EXPT_NAME, "
                                                 f"results/{NAME})")
    own.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 16], help="depths (default: 2 4 8 16)")
    own.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5, 1.0],
                     help="DEPTH_ALPHA values, one panel each (default: 0 0.5 1)")
    own.add_argument("--lrs", type=float, nargs="+", default=[-6, -5, -4, -3, -2, -1],
                     help="log2 of the learning rates (default: -6 ... -1)")
    ns, rest = own.parse_known_args(argv)
    args = parse_args(rest, defaults={"EXPT_NAME": NAME}, description=__doc__, parents=[own])
    given = set(vars(build_parser().parse_known_args(rest)[0]))  # flags typed on the command line
    ns.out = ns.out or os.path.join(args.RESULTS_DIR, args.EXPT_NAME)
    cfg = {**vars(args), **COMMON, **{k: v for k, v in vars(args).items() if k in given}}
    for key in ("WIDTH", "LR"):  # sweepable flags come as lists; this script sweeps depth and its own --lrs
        if isinstance(cfg[key], list):
            if len(cfg[key]) != 1:
                own.error(f"--{key} takes one value here (got {cfg[key]}); the learning rates are --lrs")
            cfg[key] = cfg[key][0]
    return ns.out, ns, cfg


def main(argv=None):
    _, ns, cfg = parse(sys.argv[1:] if argv is None else argv)
    lrs = [2.0 ** k for k in ns.lrs]
    res = run_job_iterator([ns.alphas, ns.depths, lrs, list(range(cfg["NUM_TRIALS"]))], AXES, cfg,
                           {"base_bfn": markov_bfn}, store=ns.out)
    fig = plot_lr_transfer(res, width="DEPTH", param="DEPTH_ALPHA", metric="test_loss",
                           path=os.path.join(ns.out, "depth_transfer.png"),
                           title=f"depth transfer: GPT width {cfg['WIDTH']}, {cfg['MAX_ITER']} Adam steps, mup")
    best = res.best("LR", metric="test_loss")["best"]
    print(f"\nGPT width {cfg['WIDTH']}, {cfg['MAX_ITER']} Adam steps; the language's entropy rate (lowest loss) "
          f"{markov_entropy_rate(cfg['vocab_size'], cfg['order'], cfg['branching']):.3f}")
    print("best LR (read between grid points, mean over trials), log2:")
    for alpha in ns.alphas:
        b = best.sel(DEPTH_ALPHA=alpha).values
        print(f"  DEPTH_ALPHA {alpha:g}: " + "  ".join(f"depth {d}: {np.log2(v):+.2f}" for d, v in zip(ns.depths, b))
              + f"   drift {drift(ns.depths, b):+.2f} octaves per doubling of depth")
    print(f"figure: {os.path.join(ns.out, 'depth_transfer.png')} (drift in the panels: {fig.drift})")

    # the residual stream's change in the first steps, on one batch drawn once for every depth
    batch_fn = markov_bfn(16, gen=torch.Generator().manual_seed(0), vocab_size=cfg["vocab_size"],
                          seq_len=cfg["seq_len"], order=cfg["order"], branching=cfg["branching"])
    print("RMS change of the residual stream after 3 Adam steps at LR 0.01, by depth:")
    for alpha in ns.alphas:
        da = coord_check_depth(lambda d: GPT(width=cfg["WIDTH"], depth=d, n_heads=cfg["n_heads"],
                                             mlp_mult=cfg["mlp_mult"], vocab_size=cfg["vocab_size"],
                                             seq_len=cfg["seq_len"]),
                               ns.depths, batch_fn, steps=3, lr=0.01, depth_alpha=alpha,
                               base_depth=cfg["BASE_DEPTH"], loss_fn=torch.nn.CrossEntropyLoss())
        moved = da.sel(layer="residual", step=3).values
        print(f"  DEPTH_ALPHA {alpha:g}: " + "  ".join(f"{m:.3f}" for m in moved)
              + f"   (largest / smallest {moved.max() / moved.min():.2f})")
        if alpha == max(ns.alphas):
            plot_coord_check(da, os.path.join(ns.out, "coord_check_depth.png"))
    print(f"results: {os.path.join(ns.out, 'results.db')}")
    return res


if __name__ == "__main__":
    main()
