"""Synthetic power-law regression, trained online: how many SGD steps to reach each loss, by batch size?

A linear teacher on Gaussian inputs whose covariance has a power-law spectrum (``lambda_k = k**-alpha``) is
learnt by a muP MLP with online SGD: every step draws a fresh batch of ``N_SAMPLES`` samples. The sweep runs
every batch size for several trials and records the step at which the smoothed train loss first falls below
each of ``LOSS_CHECKPOINTS`` (the "timekeys"). Small batches pay for their gradient noise in steps; above a
critical batch size more samples per step stop buying fewer steps.

Runs as is on a CPU, with no downloads or environment variables; the default run took 7 s on a quiet 2-core
machine (load average 1.2) and 19 s while other work kept its load average at 8.5:

    python examples/example_synthetic_run.py
    python examples/example_synthetic_run.py --out /tmp/synthetic --N_SAMPLES 1 2 4 8 16 32 64 128 \\
        --NUM_TRIALS 8 --WIDTH 512 --MAX_ITER 5000        # any hyperparameter flag scales it up

Writes ``<out>/results.db`` (reload it with ``modelscape.load(out)``; a rerun skips the jobs already stored)
and ``<out>/timekeys.png``; ``--out`` defaults to RESULTS_DIR/EXPT_NAME, ``results/example_synthetic_run`` unless
``--RESULTS_DIR`` or ``--EXPT_NAME`` say otherwise.
"""
import argparse
import os
import sys

import numpy as np

from modelscape import plotting
from modelscape.backend.cli import parse_args
from modelscape.utils import as_list
from modelscape.backend.job_iterator import main as run_job_iterator
from modelscape.data import powerlaw_bfn

NAME = "example_synthetic_run"
# This example's defaults (parse_args(defaults=...)): flags on the command line win over them.
DEFAULTS = {
    "N_SAMPLES": [2, 8, 32, 128, 512],        # the swept batch sizes
    "NUM_TRIALS": 3,
    "WIDTH": 128,
    "DEPTH": 2,
    "PARAMETERIZATION": "mup",
    "LR": 0.1,
    "MAX_ITER": 1000,
    # The initial loss is about 1.6. The smoothed loss starts at the first batch's loss, so with tiny batches a
    # lucky first batch can cross a loose threshold at step 0: keep thresholds well below the initial loss.
    "LOSS_CHECKPOINTS": [0.1, 0.03, 0.01],
    "N_TEST": 2000,
}
DATA = dict(dim=32, alpha=1.5, beta=1.0)    # the batch function's arguments (passed by bfn_config)


def parse(argv):
    """``--out`` is this script's own flag; every other flag is a hyperparameter for ``parse_args``."""
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    own.add_argument("--out", default=None,
                     help=f"folder for the results store and the figure (default: RESULTS_DIR/EXPT_NAME, "
                          f"results/{NAME})")
    ns, rest = own.parse_known_args(argv)
    args = parse_args(rest, defaults={**DEFAULTS, "EXPT_NAME": NAME}, description=__doc__, parents=[own])
    return ns.out or os.path.join(args.RESULTS_DIR, args.EXPT_NAME), args


def main(argv=None):
    out, args = parse(sys.argv[1:] if argv is None else argv)
    global_config = vars(args)
    sizes = as_list(global_config["N_SAMPLES"])
    trials = range(global_config["NUM_TRIALS"])
    bfn_config = dict(base_bfn=powerlaw_bfn, **DATA)

    res = run_job_iterator([sizes, trials], ["N_SAMPLES", "trial"], global_config, bfn_config, store=out)

    fig_path = os.path.join(out, "timekeys.png")
    plotting.plot_timekeys(res, x="N_SAMPLES", xlabel="N_SAMPLES (batch size, fresh samples every step)",
                           path=fig_path)
    report(res)
    print(f"\nresults: {os.path.join(out, 'results.db')} (modelscape.load({out!r}))\nfigure:  {fig_path}")
    return res


def report(res):
    """Mean steps (and samples seen) to reach each threshold, by batch size."""
    ds = res.to_xarray()
    thresholds = np.nanmedian(ds["thresholds"].values.reshape(-1, ds.sizes["threshold"]), axis=0)
    tk = ds["timekeys"]  # dims: N_SAMPLES, trial, threshold
    n_trials = ds.sizes["trial"]
    print(f"\nsteps to reach each train loss (mean over the trials that reached it; {n_trials} trials):")
    print("N_SAMPLES " + "".join(f"{'loss<' + format(t, 'g'):>14s}" for t in thresholds))
    for n in ds["N_SAMPLES"].values:
        cells = []
        for j in range(len(thresholds)):
            v = tk.sel(N_SAMPLES=n).isel(threshold=j).values
            k = int(np.isfinite(v).sum())
            cells.append(f"{np.nanmean(v):10.0f} ({k}/{n_trials})" if k else f"{'not reached':>14s}")
        print(f"{int(n):9d} " + "".join(f"{c:>14s}" for c in cells))
    last = tk.isel(threshold=-1).mean("trial", skipna=True)
    ok = np.isfinite(last.values)
    if ok.sum() >= 2:
        sizes = ds["N_SAMPLES"].values[ok]
        steps = last.values[ok]
        critical = sizes[np.argmax(steps <= 1.1 * steps[-1])]  # the smallest batch within 10% of the largest's
        print(f"\nfound: to reach loss < {thresholds[-1]:g}, batch {sizes[0]} needs {steps[0]:.0f} steps and batch "
              f"{sizes[-1]} {steps[-1]:.0f}; from batch {critical} on the step count is within 10% of the largest "
              f"batch's: past this critical batch size, more samples per step no longer buy fewer steps.")
    never = [int(n) for n, o in zip(ds["N_SAMPLES"].values, ok) if not o]
    if never:
        print(f"       batch sizes {never} never reached loss < {thresholds[-1]:g} within MAX_ITER in any trial.")
    print(f"status of the {len(res.records)} jobs: {res.status_counts()}")


if __name__ == "__main__":
    main()
