"""Learning-rate transfer with Adam: does the best learning rate of a narrow network carry over to a wide one?

Widths x learning rates, under the standard parameterization (``sp``: PyTorch's default init, one global
learning rate) and under muP (``mup``), on two tasks:

- ``digits``: an MLP (DEPTH 2) trained full-batch on a fixed set of ``N_SAMPLES`` digit images (10-class
  cross-entropy; scikit-learn's bundled digits, no download), widths 32 to 512, 50 steps;
- ``gpt``: ``modelscape.models.GPT`` (DEPTH 2 blocks) trained online on a synthetic language, a random
  second-order Markov chain (``modelscape.data.markov_bfn``; ``N_SAMPLES`` sequences of ``seq_len`` tokens
  per step), widths 64 to 512, 200 steps.

Every job trains for ``MAX_ITER`` Adam steps and records its final (EMA) train loss. Under sp the best learning
rate falls as the network widens (Adam moves every weight entry by about lr, so a layer's output moves by
lr x fan-in); under muP it stays put, so it can be tuned on a small model and reused on a large one. The two
parameterizations have their own learning-rate grids, each around its optimum (muP's learning rates are in
units of "how far a layer's output moves per step", so they are larger).

    python examples/example_lr_transfer.py                   # both tasks: ~9 min on 2 busy CPU cores
    python examples/example_lr_transfer.py --task digits --WIDTH 64 256 1024 --NUM_TRIALS 3
    python examples/example_lr_transfer.py --task gpt --PARAMETERIZATION mup --LR 0.03 0.06 0.125 0.25

Any hyperparameter flag overrides the task's setting for every task run: ``--WIDTH``, ``--MAX_ITER``,
``--N_SAMPLES``, ``--DEPTH``, ``--NUM_TRIALS``, ``--OPTIMIZER`` ...; ``--LR`` replaces both grids by one, and
``--PARAMETERIZATION`` runs that parameterization alone (``auto`` is muP; one without a grid of its own, such as
``ntp``, is swept over a grid spanning both). Writes ``<out>/<task>/results.db`` (one sweep per
parameterization; a rerun skips the jobs already stored) and ``<out>/<task>/lr_transfer.png``; ``--out``
defaults to RESULTS_DIR/EXPT_NAME, ``results/example_lr_transfer`` unless ``--RESULTS_DIR`` or ``--EXPT_NAME``
say otherwise.
"""
import argparse
import os
import sys

import numpy as np
import xarray as xr

from modelscape import plotting
from modelscape.backend.cli import build_parser, parse_args
from modelscape.backend.job_iterator import main as run_job_iterator
from modelscape.data import digits_bfn, digits_test_set, markov_bfn, markov_entropy_rate
from modelscape.utils import as_list

NAME = "example_lr_transfer"
OCTAVES = lambda lo, hi: [2.0 ** k for k in range(lo, hi + 1)]  # noqa: E731
COMMON = {"OPTIMIZER": "Adam", "LOSS": "cross_entropy", "DEPTH": 2, "NUM_TRIALS": 1, "MAX_ITER": 200,
          "LOSS_CHECKPOINTS": [1e-6],  # out of reach: every job trains for MAX_ITER steps
          "CENTER": False}            # sp's initial function is not small; compare the networks as they are
# The language: 16 tokens, each pair of tokens allows 3 successors. The GPT and markov_bfn both read
# vocab_size and seq_len from the config.
LANGUAGE = {"vocab_size": 16, "seq_len": 16, "order": 2, "branching": 3}
TASKS = {
    # 50 full-batch steps on 1024 images: long enough to separate the learning rates, short of memorising
    "digits": {"config": {"MODEL": "MLP", "ONLINE": False, "N_SAMPLES": 1024, "MAX_ITER": 50,
                          "WIDTH": [32, 128, 512]},
               "lrs": {"sp": OCTAVES(-12, 0), "mup": OCTAVES(-8, 3)}},
    "gpt": {"config": {"MODEL": "GPT", "ONLINE": True, "N_SAMPLES": 16, "N_TEST": 256,
                       "WIDTH": [64, 128, 256, 512], **LANGUAGE},
            "lrs": {"sp": OCTAVES(-13, -5), "mup": OCTAVES(-7, 0)}},
}


def parse(argv):
    """``--out`` and ``--task`` are this script's own flags; every other flag is a hyperparameter."""
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    own.add_argument("--out", default=None,
                     help=f"folder for each task's results store and figure, <out>/<task>/ (default: "
                          f"RESULTS_DIR/EXPT_NAME, results/{NAME})")
    own.add_argument("--task", choices=["digits", "gpt", "both"], default="both",
                     help="which task to run (default: %(default)s)")
    ns, rest = own.parse_known_args(argv)
    args = parse_args(rest, defaults={"EXPT_NAME": NAME}, description=__doc__, parents=[own])
    given = set(vars(build_parser().parse_known_args(rest)[0]))  # flags typed on the command line
    overrides = {k: v for k, v in vars(args).items() if k in given}
    out = ns.out or os.path.join(args.RESULTS_DIR, args.EXPT_NAME)
    return out, ["digits", "gpt"] if ns.task == "both" else [ns.task], vars(args), overrides


def lr_grid(spec, param):
    """The learning rates a parameterization is swept over: its own grid, muP's for ``auto`` (which is muP),
    and for a parameterization without a grid of its own one spanning both."""
    grids = spec["lrs"]
    if param in grids:
        return grids[param]
    if param == "auto":
        return grids["mup"]
    return sorted(set(grids["sp"]) | set(grids["mup"]))


def plan_task(task, base, overrides):
    """The sweeps of one task: ``(config, bfn_config, [(iterators, iterator_names), ...])``, one sweep per
    parameterization (sp and mup, or the ``--PARAMETERIZATION`` given alone)."""
    spec = TASKS[task]
    cfg = {**base, **COMMON, **spec["config"], **overrides}
    bfn_config = {"base_bfn": markov_bfn} if task == "gpt" else {"base_bfn": digits_bfn}
    if task == "digits":
        cfg["X_te"], cfg["y_te"] = digits_test_set()
    params = [overrides["PARAMETERIZATION"]] if "PARAMETERIZATION" in overrides else list(spec["lrs"])
    widths, trials = as_list(cfg["WIDTH"]), range(cfg["NUM_TRIALS"])
    sweeps = []
    for p in params:
        lrs = sorted(as_list(overrides["LR"])) if "LR" in overrides else lr_grid(spec, p)
        sweeps.append(([[p], widths, lrs, trials], ["PARAMETERIZATION", "WIDTH", "LR", "trial"]))
    return cfg, bfn_config, sweeps


def run_task(task, out, base, overrides):
    """The sweeps of one task (``plan_task``); returns their results as one Dataset, and the config."""
    cfg, bfn_config, sweeps = plan_task(task, base, overrides)
    store = os.path.join(out, task)
    parts = [run_job_iterator(iterators, names, cfg, bfn_config, store=store).to_xarray()
             for iterators, names in sweeps]
    ds = xr.concat(parts, dim="PARAMETERIZATION", join="outer", data_vars="all", coords="minimal",
                   compat="override") if len(parts) > 1 else parts[0]
    ds["status"] = ds["status"].fillna("missing")  # grid points a parameterization did not run
    return ds, cfg


def main(argv=None):
    out, tasks, base, overrides = parse(sys.argv[1:] if argv is None else argv)
    found = {}
    for task in tasks:
        ds, cfg = run_task(task, out, base, overrides)
        path = os.path.join(out, task, "lr_transfer.png")
        what = "MLP on digits" if task == "digits" else "GPT on a synthetic language"
        fig = plotting.plot_lr_transfer(ds, lr="LR", width="WIDTH", param="PARAMETERIZATION",
                                        metric="train_loss", path=path,
                                        title=f"{what}, Adam: final train loss vs learning rate, by width")
        report(task, ds, fig.best_lr, cfg)
        print(f"results: {os.path.join(out, task, 'results.db')}\nfigure:  {path}")
        found[task] = fig.best_lr
    return found


def report(task, ds, best_lr, cfg):
    if task == "digits":
        print(f"\n[digits] MLP, 10 classes, {cfg['N_SAMPLES']} training images, {cfg['MAX_ITER']} Adam steps")
    else:
        floor = markov_entropy_rate(cfg["vocab_size"], cfg["order"], cfg["branching"])
        print(f"\n[gpt] GPT, {cfg['N_SAMPLES']} sequences of {cfg['seq_len']} tokens per step, "
              f"{cfg['MAX_ITER']} Adam steps (the language's entropy rate, the lowest loss: {floor:.3f})")
    print("best learning rate per width (lowest final train loss, mean over trials):")
    for p, by_width in best_lr.items():
        print(f"  {p:>4s}: " + ", ".join(f"width {int(w)} -> LR {lr:g}" for w, lr in by_width.items()))
    for p in best_lr:
        bad = ds["status"].sel(PARAMETERIZATION=p).isin(["diverged", "failed"])
        if bool(bad.any()):
            worst = {int(w): float(ds["LR"][bad.sel(WIDTH=w).any("trial").values].min())
                     for w in ds["WIDTH"].values if bool(bad.sel(WIDTH=w).any())}
            print(f"  {p:>4s}: diverged from LR " + ", ".join(f"{lr:g} at width {w}" for w, lr in worst.items()))
    spread = {p: np.log2(max(b.values()) / min(b.values())) for p, b in best_lr.items() if b}
    print("found: from the narrowest to the widest network the best LR moves by "
          + ", ".join(f"{spread[p]:.0f} octave(s) under {p}" for p in spread) + ".")


if __name__ == "__main__":
    main()
