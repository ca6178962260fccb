"""Perturb the weights at initialization by epsilon: how far does training carry a small change of the init?

A step hook (``step_hooks={0: perturb}``) adds ``eps`` x (each weight tensor's RMS) x Gaussian noise to every
parameter before the first step, for several epsilons (``eps`` is a sweep axis, named by the hook) and trials.
Within a trial every epsilon gets the same noise direction and the same data (both seeded from SEED and the
trial), so ``eps = 0`` is that trial's control; each trial draws a fresh direction. Every job trains a muP MLP
online on a power-law linear teacher and records its loss curves. The figure shows the test loss along training
(mean over trials per epsilon, band: min-max over trials) and how far each perturbed run's test loss is from its
trial's control, log axes.

    python examples/example_perturb_init.py       # 7 s on 2 quiet cores; 21 s at load average 8.5
    python examples/example_perturb_init.py --eps 0 1e-4 1e-3 1e-2 1e-1 1 --NUM_TRIALS 8 --MAX_ITER 2000

Any hyperparameter flag changes every job (``--WIDTH``, ``--LR``, ``--MAX_ITER``, ``--NUM_TRIALS``,
``--PARAMETERIZATION`` ...). Writes ``<out>/results.db`` (``modelscape.load(out)``; a rerun skips the jobs
already stored, and a changed hook trains them anew) and ``<out>/perturb_init.png``; ``--out`` defaults to
RESULTS_DIR/EXPT_NAME, ``results/example_perturb_init`` unless ``--RESULTS_DIR`` or ``--EXPT_NAME`` say
otherwise.
"""
import argparse
import os
import sys

import numpy as np
import torch

from modelscape.backend.cli import parse_args
from modelscape.backend.job_iterator import main as run_job_iterator
from modelscape.data import powerlaw_bfn
from modelscape.utils import as_list, derive_seed

NAME = "example_perturb_init"
DEFAULTS = {
    "WIDTH": 128,
    "DEPTH": 2,
    "PARAMETERIZATION": "mup",
    "LR": 0.1,
    "N_SAMPLES": 64,             # fresh samples every step (ONLINE)
    "N_TEST": 512,
    "MAX_ITER": 400,
    "NUM_TRIALS": 3,
    "LOSS_CHECKPOINTS": [1e-6],  # out of reach: every job trains for MAX_ITER steps, so the curves line up
    "ONLYTHRESHOLDS": False,     # record the loss curves
    "EVAL_EVERY": 5,
    "CENTER": False,             # perturb the network itself; a centered one would subtract the unperturbed f0
}
EPSILONS = [0.0, 1e-3, 1e-2, 1e-1, 1.0]
DATA = dict(dim=16, alpha=1.0)


def perturb(model, opt, step, eps, SEED, trial):
    """The step hook: every parameter += eps x its RMS x unit Gaussian noise, the noise fixed by SEED and trial."""
    if eps == 0:
        return
    gen = torch.Generator().manual_seed(derive_seed(SEED, trial, "perturb"))
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)
            p.add_(eps * p.pow(2).mean().sqrt() * noise)


def parse(argv):
    """``--out`` and ``--eps`` are this script's own flags; every other flag is a hyperparameter."""
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    own.add_argument("--out", default=None,
                     help=f"folder for the results store and the figure (default: RESULTS_DIR/EXPT_NAME, "
                          f"results/{NAME})")
    own.add_argument("--eps", type=float, nargs="+", default=EPSILONS,
                     help="perturbation sizes, relative to each weight tensor's RMS; 0, the control, is always run "
                          "(default: %(default)s)")
    ns, rest = own.parse_known_args(argv)
    if any(e < 0 for e in ns.eps):
        own.error(f"--eps takes sizes >= 0, got {ns.eps}")
    eps = sorted(set(ns.eps) | {0.0})  # the control is always run: the deviations are measured from it
    args = parse_args(rest, defaults={**DEFAULTS, "EXPT_NAME": NAME}, description=__doc__, parents=[own])
    if args.ONLYTHRESHOLDS:
        own.error("this example plots loss curves: --ONLYTHRESHOLDS must stay False")
    return ns.out or os.path.join(args.RESULTS_DIR, args.EXPT_NAME), eps, args


def main(argv=None):
    out, eps, args = parse(sys.argv[1:] if argv is None else argv)
    config = vars(args)
    config["step_hooks"] = {0: perturb}
    trials = range(config["NUM_TRIALS"])
    res = run_job_iterator([eps, trials], ["eps", "trial"], config, dict(base_bfn=powerlaw_bfn, **DATA), store=out)
    path = os.path.join(out, "perturb_init.png")
    plot(res.to_xarray(), path, config)
    report(res.to_xarray())
    print(f"\nresults: {os.path.join(out, 'results.db')} (modelscape.load({out!r}))\nfigure:  {path}")
    return res


def deviation(ds):
    """|test loss - the same trial's control (eps = 0)| / control, along the evaluation steps."""
    test = ds["test_curve"]
    control = test.sel(eps=0.0)
    return abs(test - control) / control


def plot(ds, path, cfg):
    """Two panels: the test loss by epsilon, and its relative distance from the control, log-log."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    steps = ds["eval_step"].values
    shown = steps > 0  # log x: step 0 cannot be drawn
    fig = Figure(figsize=(10.5, 4.2), layout="constrained")
    ax_loss, ax_dev = fig.subplots(1, 2)
    dev = deviation(ds)
    eps = [float(e) for e in ds["eps"].values]
    colors = [colormaps["viridis"](x) for x in np.linspace(0.0, 0.85, len(eps))]
    for e, color in zip(eps, colors):
        label = "0 (control)" if e == 0 else f"{e:g}"
        for ax, da in ((ax_loss, ds["test_curve"]), (ax_dev, dev)):
            if ax is ax_dev and e == 0:
                continue
            arr = da.sel(eps=e).transpose("eval_step", "trial").values
            mean = np.nanmean(arr, axis=1)
            ax.plot(steps[shown], mean[shown], color=color, lw=1.6, label=label)
            if arr.shape[1] > 1:
                ax.fill_between(steps[shown], np.nanmin(arr, 1)[shown], np.nanmax(arr, 1)[shown], color=color,
                                alpha=0.2, lw=0)
    n = ds.sizes["trial"]
    ax_loss.set(xscale="log", yscale="log", xlabel="training step", ylabel="test loss",
                title=f"test loss (mean of {n} trials, band: min-max)")
    ax_dev.set(xscale="log", yscale="log", xlabel="training step", ylabel="|loss - control| / control",
               title="relative distance from the unperturbed run")
    for ax in (ax_loss, ax_dev):
        ax.grid(True, which="major", alpha=0.3)
    ax_loss.legend(title="eps (x weight RMS)", fontsize="small")
    width, lr = as_list(cfg["WIDTH"])[0], as_list(cfg["LR"])[0]
    fig.suptitle(f"weights perturbed at initialization by eps: {cfg['PARAMETERIZATION']} MLP, width {width}, "
                 f"LR {lr:g}, {as_list(cfg['N_SAMPLES'])[0]} fresh samples per step", fontsize="medium")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)


def report(ds):
    dev = deviation(ds)
    last = ds["eval_step"].values[-1]
    print(f"\ntest loss at step {int(last)} and its relative distance from the control (mean over "
          f"{ds.sizes['trial']} trials):")
    print(f"{'eps':>8} {'test loss':>10} {'distance':>10}   largest distance (at step)")
    for e in ds["eps"].values:
        loss = float(ds["test_curve"].sel(eps=e, eval_step=last).mean())
        d = dev.sel(eps=e).mean("trial")
        peak = int(d["eval_step"][int(np.nanargmax(d.values))]) if e > 0 else 0
        print(f"{e:8g} {loss:10.4g} {float(d.sel(eval_step=last)):10.3g}   "
              + (f"{float(d.max()):.3g} ({peak})" if e > 0 else "-"))
    eps = np.array([e for e in ds["eps"].values if e > 0])
    final = np.array([float(dev.sel(eps=e, eval_step=last).mean()) for e in eps])
    if len(eps) >= 2 and np.all(final > 0):
        slope = np.polyfit(np.log(eps), np.log(final), 1)[0]
        print(f"found: at step {int(last)} the distance from the control grows about as eps^{slope:.2f} over eps "
              f"{eps.min():g}..{eps.max():g} (1 = in proportion: training neither amplifies nor forgets the change)")
    print(f"status of the {int(ds['status'].size)} jobs: "
          + ", ".join(f"{s}: {int((ds['status'] == s).sum())}" for s in np.unique(ds["status"].values)))


if __name__ == "__main__":
    main()
