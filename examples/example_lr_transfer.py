"""Learning-rate transfer: does the best learning rate of a narrow network carry over to a wide one?

Widths x learning rates, under the standard parameterization (``sp``, PyTorch's default init and one global
learning rate) and under muP (``mup``), with the parameterization a sweep axis like any other. Every job
trains an MLP for ``MAX_ITER`` full-batch SGD steps on a fixed set of ``N_SAMPLES`` digit images (10-class
cross-entropy; scikit-learn's bundled digits, no download) and records its final train loss. Under sp the best
learning rate moves with width (and wide networks diverge at rates narrow ones take); under muP it stays put,
so it can be tuned on a small model and reused on a large one (``example_coord_check.py`` shows why).

    python examples/example_lr_transfer.py
    python examples/example_lr_transfer.py --out /tmp/transfer --WIDTH 64 256 1024 4096 \\
        --LR 0.03 0.06 0.125 0.25 0.5 1 2 4 8 16 --NUM_TRIALS 3 --MAX_ITER 1000   # any hyperparameter flag scales it up

Writes ``<out>/results.db`` (``modelscape.load(out)``; a rerun skips the jobs already stored) and
``<out>/lr_transfer.png``; ``--out`` defaults to ``results/example_lr_transfer``.
"""
import argparse
import os
import sys

import numpy as np

from modelscape import plotting
from modelscape.backend.cli import parse_args
from modelscape.utils import as_list
from modelscape.backend.job_iterator import main as run_job_iterator
from modelscape.data import digits_bfn, digits_test_set

NAME = "example_lr_transfer"
DEFAULTS = {
    "ONLINE": False,
    "N_SAMPLES": 256,
    "WIDTH": [32, 128, 512],
    "LR": [0.25, 0.5, 1, 2, 4, 8, 16],   # factors of 2: the best LR sits near the edge of divergence
    "NUM_TRIALS": 1,
    "DEPTH": 2,
    "MAX_ITER": 200,
    "LOSS": "cross_entropy",
    "LOSS_CHECKPOINTS": [1e-6],   # out of reach: every job trains for MAX_ITER steps
    "CENTER": False,              # sp's initial function is not small; compare the networks as they are
}
PARAMETERIZATIONS = ["sp", "mup"]  # swept as an axis; the PARAMETERIZATION flag is not used here


def parse(argv):
    """``--out`` is this script's own flag; every other flag is a hyperparameter for ``parse_args``."""
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    own.add_argument("--out", default=os.path.join("results", NAME))
    ns, rest = own.parse_known_args(argv)
    return ns.out, parse_args(rest, defaults=DEFAULTS, description=__doc__)


def main(argv=None):
    out, args = parse(sys.argv[1:] if argv is None else argv)
    X_te, y_te = digits_test_set()
    global_config = vars(args)
    global_config.update(X_te=X_te, y_te=y_te)
    bfn_config = dict(base_bfn=digits_bfn)
    widths, lrs = as_list(global_config["WIDTH"]), sorted(as_list(global_config["LR"]))
    trials = range(global_config["NUM_TRIALS"])

    res = run_job_iterator([PARAMETERIZATIONS, widths, lrs, trials], ["PARAMETERIZATION", "WIDTH", "LR", "trial"],
                           global_config, bfn_config, store=out)

    path = os.path.join(out, "lr_transfer.png")
    fig = plotting.plot_lr_transfer(res, lr="LR", width="WIDTH", param="PARAMETERIZATION", metric="train_loss",
                                    path=path)
    report(res, fig.best_lr, global_config)
    print(f"\nresults: {os.path.join(out, 'results.db')} (modelscape.load({out!r}))\nfigure:  {path}")
    return res


def report(res, best_lr, cfg):
    ds = res.to_xarray()
    print(f"\ndigits, 10 classes, {as_list(cfg['N_SAMPLES'])[0]} training images, {cfg['MAX_ITER']} SGD steps per job")
    print("best learning rate per width (lowest final train loss, mean over trials):")
    for p, by_width in best_lr.items():
        print(f"  {p:>4s}: " + ", ".join(f"width {int(w)} -> LR {lr:g}" for w, lr in by_width.items()))
    for p in best_lr:
        st = ds["status"].sel(PARAMETERIZATION=p)
        bad = (st == "diverged") | (st == "failed")
        if bool(bad.any()):
            worst = {int(w): float(ds["LR"][bad.sel(WIDTH=w).any("trial").values].min())
                     for w in ds["WIDTH"].values if bool(bad.sel(WIDTH=w).any())}
            print(f"  {p:>4s}: diverged from LR " + ", ".join(f"{lr:g} at width {w}" for w, lr in worst.items()))
    spread = {p: np.log2(max(b.values()) / min(b.values())) for p, b in best_lr.items() if b}
    print("found: from the narrowest to the widest network the best LR moves by "
          + ", ".join(f"{spread[p]:.0f} octave(s) under {p}" for p in spread) + ".")
    if "mup" in spread and "sp" in spread:
        verdict = ("it transfers better under muP" if spread["mup"] < spread["sp"] else
                   "here muP does not transfer it better than sp" if spread["mup"] > spread["sp"] else
                   "both move alike on this grid")
        print(f"       {verdict}; see the figure for how the whole curves line up.")
    print(f"status of the {len(res.records)} jobs: {res.status_counts()}")


if __name__ == "__main__":
    main()
