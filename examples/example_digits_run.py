"""Real data, no download: scikit-learn's handwritten digits, offline, width x GAMMA under muP.

Every job trains a muP MLP with full-batch SGD on a fixed training set of ``N_SAMPLES`` digit images (8x8,
flattened to 64 inputs), 10-class cross-entropy, and records the train and test loss curves and, along
training, the accuracy on the held-out test images (a *grab*). The sweep crosses ``WIDTH`` with ``GAMMA``
(richness: outputs divided by gamma, learning rate times gamma, or gamma**2 below 1) over trials.

    python examples/example_digits_run.py
    python examples/example_digits_run.py --binary          # even vs odd digits, +-1 targets, MSE
    python examples/example_digits_run.py --out /tmp/digits --WIDTH 64 256 1024 2048 --GAMMA 0.1 1 10 \\
        --NUM_TRIALS 4 --MAX_ITER 3000                      # any hyperparameter flag scales it up

The test set is the held-out part of a fixed split of the 1797 images (``digits_test_set``), given to the jobs
as ``X_te``/``y_te``; training images are drawn, per trial, only from the rest. Writes ``<out>/results.db``
(``modelscape.load(out)``; a rerun skips the jobs already stored), ``<out>/loss_curves_train.png`` and
``<out>/loss_curves_test.png``; ``--out`` defaults to RESULTS_DIR/EXPT_NAME, ``results/example_digits_run`` unless
``--RESULTS_DIR`` or ``--EXPT_NAME`` say otherwise.
"""
import argparse
import os
import sys

import numpy as np
import torch

from modelscape import plotting
from modelscape.backend.cli import parse_args
from modelscape.utils import as_list
from modelscape.backend.job_iterator import main as run_job_iterator
from modelscape.data import digits_bfn, digits_test_set

NAME = "example_digits_run"
DEFAULTS = {
    "ONLINE": False,              # one fixed training set per trial
    "N_SAMPLES": 1000,            # of the 1347 training images
    "WIDTH": [32, 128, 512],
    "GAMMA": [0.25, 1.0, 4.0],
    "NUM_TRIALS": 2,
    "DEPTH": 2,
    "PARAMETERIZATION": "mup",
    "LR": 1.0,                    # muP: the same base learning rate suits every width
    "MAX_ITER": 500,
    "LOSS": "cross_entropy",
    "LOSS_CHECKPOINTS": [0.1, 0.01],
    "ONLYTHRESHOLDS": False,      # record curves, and the accuracy grab along training
    "EVAL_EVERY": 25,
    # Train the plain model: under muP its initial output is already small, and accuracy is then read off
    # the network itself.
    "CENTER": False,
}
BINARY = {"LOSS": "mse", "LR": 0.5}   # --binary: even (+1) vs odd (-1) digits


def accuracy(model, X_te, y_te, trained_model=None, **kwargs):
    """Test accuracy: argmax over classes, or the sign for one +-1 output. A grab: runs inside the job.

    ``trained_model`` is the function actually trained (f - f0 when CENTER is on); ``model`` is the bare net."""
    with torch.no_grad():
        out = (trained_model or model)(X_te)
    if out.shape[-1] == 1:
        return float((torch.sign(out) == torch.sign(y_te)).float().mean())
    return float((out.argmax(-1) == y_te).float().mean())


def parse(argv):
    """``--out`` and ``--binary`` are this script's own flags; the others are hyperparameters (parse_args)."""
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    own.add_argument("--out", default=None,
                     help=f"folder for the results store and the figures (default: RESULTS_DIR/EXPT_NAME, "
                          f"results/{NAME})")
    own.add_argument("--binary", action="store_true",
                     help="even vs odd digits with +-1 targets and MSE, instead of 10 classes")
    ns, rest = own.parse_known_args(argv)
    defaults = {**DEFAULTS, **(BINARY if ns.binary else {}), "EXPT_NAME": NAME}
    args = parse_args(rest, defaults=defaults, description=__doc__, parents=[own])
    if args.ONLYTHRESHOLDS:
        own.error("this example plots loss curves and accuracy along training: --ONLYTHRESHOLDS must stay False")
    return ns.out or os.path.join(args.RESULTS_DIR, args.EXPT_NAME), ns.binary, args


def main(argv=None):
    out, binary, args = parse(sys.argv[1:] if argv is None else argv)
    data = dict(binary=binary)  # classes=None: all ten digits, or even vs odd when binary
    X_te, y_te = digits_test_set(**data)
    global_config = vars(args)
    global_config.update(X_te=X_te, y_te=y_te, otherreturns={"acc": accuracy})
    bfn_config = dict(base_bfn=digits_bfn, **data)
    widths, gammas = as_list(global_config["WIDTH"]), as_list(global_config["GAMMA"])
    trials = range(global_config["NUM_TRIALS"])

    res = run_job_iterator([widths, gammas, trials], ["WIDTH", "GAMMA", "trial"], global_config, bfn_config,
                           store=out)

    paths = [os.path.join(out, f"loss_curves_{which}.png") for which in ("train", "test")]
    for which, path in zip(("train", "test"), paths):
        plotting.plot_loss_curves(res, color="WIDTH", facet="GAMMA", which=which, path=path)
    report(res, global_config, binary, len(X_te))
    print(f"\nresults: {os.path.join(out, 'results.db')} (modelscape.load({out!r}))\nfigures: {', '.join(paths)}")
    return res


def final_values(da):
    """The last recorded value of each job along ``eval_step`` (jobs stop at different steps)."""
    arr = np.moveaxis(da.values, da.dims.index("eval_step"), -1)
    finite = np.isfinite(arr)
    last = np.where(finite.any(-1), arr.shape[-1] - 1 - np.argmax(finite[..., ::-1], axis=-1), 0)
    vals = np.take_along_axis(arr, last[..., None], -1)[..., 0]
    return np.where(finite.any(-1), vals, np.nan)


def report(res, cfg, binary, n_test):
    ds = res.to_xarray()
    acc = final_values(ds["grab_acc"])  # dims WIDTH, GAMMA, trial
    widths, gammas = ds["WIDTH"].values, ds["GAMMA"].values
    task = "even vs odd (binary, MSE)" if binary else "10 classes (cross-entropy)"
    n_samples, lr = as_list(cfg["N_SAMPLES"])[0], as_list(cfg["LR"])[0]  # parse_args gives sweepables as lists
    print(f"\ndigits, {task}, {cfg['PARAMETERIZATION']}, {n_samples} training images, {n_test} held-out "
          f"test images, LR {lr:g}, at most {cfg['MAX_ITER']} steps")
    print("final test accuracy (mean over trials):")
    print("WIDTH " + "".join(f"{'GAMMA=' + format(g, 'g'):>12s}" for g in gammas) + f"{'all GAMMA':>12s}")
    for i, w in enumerate(widths):
        row = [np.nanmean(acc[i, j]) for j in range(len(gammas))]
        print(f"{int(w):5d} " + "".join(f"{100 * a:11.1f}%" for a in row) + f"{100 * np.nanmean(acc[i]):11.1f}%")
    steps = ds["steps"].mean("trial")
    print("steps run (mean over trials; a job stops once its train loss is below every LOSS_CHECKPOINT):")
    for j, g in enumerate(gammas):
        print(f"  GAMMA={g:g}: " + ", ".join(f"width {int(w)}: {float(steps.isel(WIDTH=i, GAMMA=j)):.0f}"
                                          for i, w in enumerate(widths)))
    best = np.unravel_index(np.nanargmax(np.nanmean(acc, -1)), acc.shape[:2])
    by_width = np.nanmean(acc, axis=(1, 2))
    by_gamma = steps.mean("WIDTH").values
    print(f"found: best test accuracy {100 * np.nanmean(acc[best]):.1f}% at WIDTH={int(widths[best[0]])}, "
          f"GAMMA={gammas[best[1]]:g}; across widths the accuracy spans {100 * by_width.min():.1f}-"
          f"{100 * by_width.max():.1f}% at one learning rate ({cfg['PARAMETERIZATION']})"
          + (f"; steps run go from {by_gamma[0]:.0f} at GAMMA={gammas[0]:g} to {by_gamma[-1]:.0f} at "
             f"GAMMA={gammas[-1]:g}." if len(gammas) > 1 else "."))
    print(f"status of the {len(res.records)} jobs: {res.status_counts()}")


if __name__ == "__main__":
    main()
