"""muTransfer end to end on the GPT: tune at a small width, train wide models at the tuned values, and compare them
with the best a full sweep at the widest width finds.

The model is ``modelscape.models.GPT`` on a synthetic language (a random second-order Markov chain,
``modelscape.data.markov_bfn``), trained online with Adam under muP with ``BASE_WIDTH`` = the tuning width: at
that width muP *is* sp (PyTorch's init, one learning rate), so the tuning run is an ordinary sp sweep, and from
there muP scales every layer's init, multipliers and learning rate with width (Microsoft's mup).

1. tune: the learning rate ``LR`` and the output multiplier ``OUTPUT_MULT`` on a grid at ``--base-width``;
   the pair with the lowest final test loss (mean over trials) wins.
2. transfer: ``--widths`` trained at the winning pair, under mup (the transfer) and under sp (what one gets
   reusing sp's values without muP).
3. check: the same grid at the widest width (``--full-width``); the gap between the transferred run's final
   test loss and the grid's best, in percent, measures how well the tuned values carried over.

    python examples/example_mutransfer.py                       # ~25 min on 2 busy CPU cores
    python examples/example_mutransfer.py --widths 256 --MAX_ITER 50    # a minute

Flags of its own: ``--base-width``, ``--widths``, ``--full-width``, ``--lrs`` (log2 of the learning rates),
``--mults`` (output multipliers), ``--out``. Any hyperparameter flag (``--MAX_ITER``, ``--N_SAMPLES``,
``--DEPTH``, ``--NUM_TRIALS``, ``--EPS_SCALING`` ...) applies to every run. Writes ``<out>/results.db`` (a rerun
skips the jobs already stored), ``<out>/mutransfer.png`` and ``<out>/mutransfer.json`` (the numbers);
``--out`` defaults to RESULTS_DIR/EXPT_NAME, ``results/example_mutransfer``.
"""
import argparse
import json
import os
import sys

import numpy as np

from modelscape.backend.cli import build_parser, parse_args
from modelscape.backend.job_iterator import main as run_job_iterator
from modelscape.data import markov_bfn, markov_entropy_rate

NAME = "example_mutransfer"
LANGUAGE = {"vocab_size": 16, "seq_len": 16, "order": 2, "branching": 3}
COMMON = {"MODEL": "GPT", "OPTIMIZER": "Adam", "LOSS": "cross_entropy", "DEPTH": 1, "n_heads": 4, "mlp_mult": 2,
          "ONLINE": True, "N_SAMPLES": 16, "N_TEST": 256, "MAX_ITER": 120, "NUM_TRIALS": 1,
          "LOSS_CHECKPOINTS": [1e-6],  # out of reach: every job trains for MAX_ITER steps
          "CENTER": False, **LANGUAGE}
AXES = ["PARAMETERIZATION", "WIDTH", "LR", "OUTPUT_MULT", "trial"]


def parse(argv):
    """``(out folder, this script's own flags, the hyperparameters, those given on the command line)``."""
    own = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    own.add_argument("--out", default=None, help=f"folder for the store, figure and numbers (default: "
                                                 f"RESULTS_DIR/EXPT_NAME, results/{NAME})")
    own.add_argument("--base-width", type=int, default=128, help="tuning width = BASE_WIDTH (default: 128)")
    own.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024],
                     help="widths trained at the tuned values (default: 256 512 1024)")
    own.add_argument("--full-width", type=int, default=None, help="width of the check sweep (default: the widest)")
    own.add_argument("--lrs", type=float, nargs="+", default=[-9, -8, -7, -6, -5],
                     help="log2 of the learning rates of the grid (default: -9 ... -5)")
    own.add_argument("--mults", type=float, nargs="+", default=[0.25, 1.0, 4.0],
                     help="output multipliers of the grid (default: 0.25 1 4)")
    ns, rest = own.parse_known_args(argv)
    args = parse_args(rest, defaults={"EXPT_NAME": NAME}, description=__doc__, parents=[own])
    given = set(vars(build_parser().parse_known_args(rest)[0]))  # flags typed on the command line
    overrides = {k: v for k, v in vars(args).items() if k in given}
    ns.out = ns.out or os.path.join(args.RESULTS_DIR, args.EXPT_NAME)
    ns.full_width = ns.full_width or max(ns.widths)
    return ns.out, ns, vars(args), overrides


def sweep(cfg, out, params, widths, lrs, mults):
    """Final test loss, mean over trials: an xarray over (PARAMETERIZATION, WIDTH, LR, OUTPUT_MULT)."""
    res = run_job_iterator([params, widths, lrs, mults, list(range(cfg["NUM_TRIALS"]))], AXES, cfg,
                           {"base_bfn": markov_bfn}, store=out)
    ds = res.to_xarray()
    loss = ds["test_loss"].where(ds["status"].isin(["done", "not_reached"]))
    return loss.mean("trial")


def best_of(loss):
    """``(lr, mult, loss)`` of the grid point with the lowest loss (NaN: diverged)."""
    flat = loss.stack(point=("LR", "OUTPUT_MULT"))
    i = int(np.nanargmin(flat.values))
    point = flat.isel(point=i)
    return float(point["LR"]), float(point["OUTPUT_MULT"]), float(point.values)


def main(argv=None):
    _, ns, base, overrides = parse(sys.argv[1:] if argv is None else argv)
    cfg = {**base, **COMMON, **overrides, "BASE_WIDTH": ns.base_width}
    lrs = [2.0 ** k for k in ns.lrs]
    # 1. tune at the base width (mup there is sp to the bit, so one run serves both)
    tune = sweep(cfg, ns.out, ["mup"], [ns.base_width], lrs, ns.mults).squeeze(("PARAMETERIZATION", "WIDTH"))
    lr, mult, tuned = best_of(tune)
    # 2. transfer: the widths at the tuned values, under mup and, for contrast, sp
    widths = sorted({ns.base_width, *ns.widths, ns.full_width})
    moved = sweep(cfg, ns.out, ["mup", "sp"], widths, [lr], [mult]).squeeze(("LR", "OUTPUT_MULT"))
    # 3. check: the full grid at the widest width
    full = sweep(cfg, ns.out, ["mup"], [ns.full_width], lrs, ns.mults).squeeze(("PARAMETERIZATION", "WIDTH"))
    full_lr, full_mult, full_best = best_of(full)
    transferred = float(moved.sel(PARAMETERIZATION="mup", WIDTH=ns.full_width))
    sp_transferred = float(moved.sel(PARAMETERIZATION="sp", WIDTH=ns.full_width))
    numbers = {
        "base_width": ns.base_width, "full_width": ns.full_width, "steps": cfg["MAX_ITER"],
        "entropy_rate": markov_entropy_rate(cfg["vocab_size"], cfg["order"], cfg["branching"]),
        "tuned": {"LR": lr, "OUTPUT_MULT": mult, "test_loss": tuned},
        "full_sweep_best": {"LR": full_lr, "OUTPUT_MULT": full_mult, "test_loss": full_best},
        "transferred": {p: {int(w): float(moved.sel(PARAMETERIZATION=p, WIDTH=w)) for w in widths}
                        for p in ("mup", "sp")},
        "gap_percent": 100 * (transferred / full_best - 1),
        "sp_gap_percent": 100 * (sp_transferred / full_best - 1),
        "full_grid": {f"{a:g},{b:g}": float(full.sel(LR=a, OUTPUT_MULT=b)) for a in lrs for b in ns.mults},
        "tune_grid": {f"{a:g},{b:g}": float(tune.sel(LR=a, OUTPUT_MULT=b)) for a in lrs for b in ns.mults},
    }
    os.makedirs(ns.out, exist_ok=True)
    with open(os.path.join(ns.out, "mutransfer.json"), "w") as f:
        json.dump(numbers, f, indent=1)
    figure(tune, full, moved, numbers, os.path.join(ns.out, "mutransfer.png"))
    report(numbers, ns)
    return numbers


def report(n, ns):
    edge = [k for k, v in (("LR", n["full_sweep_best"]["LR"]), ("OUTPUT_MULT", n["full_sweep_best"]["OUTPUT_MULT"]))
            if v in (min(2.0 ** k for k in ns.lrs), max(2.0 ** k for k in ns.lrs)) or
            (k == "OUTPUT_MULT" and v in (min(ns.mults), max(ns.mults)))]
    print(f"\nGPT, {n['steps']} Adam steps; the language's entropy rate (lowest loss) {n['entropy_rate']:.3f}")
    print(f"tuned at width {n['base_width']}: LR {n['tuned']['LR']:g}, OUTPUT_MULT {n['tuned']['OUTPUT_MULT']:g} "
          f"(test loss {n['tuned']['test_loss']:.4f})")
    print("final test loss at the tuned values:")
    for w in n["transferred"]["mup"]:
        print(f"  width {w:5d}: mup {n['transferred']['mup'][w]:.4f}   sp {n['transferred']['sp'][w]:.4f}")
    fb = n["full_sweep_best"]
    print(f"full sweep at width {n['full_width']}: best LR {fb['LR']:g}, OUTPUT_MULT {fb['OUTPUT_MULT']:g}, "
          f"test loss {fb['test_loss']:.4f}" + (f" (at the edge of the grid in {', '.join(edge)})" if edge else ""))
    print(f"gap of the transferred run to the sweep's best: {n['gap_percent']:+.2f}% under mup, "
          f"{n['sp_gap_percent']:+.2f}% with sp's values under sp")
    print(f"results: {os.path.join(ns.out, 'results.db')}\nfigure:  {os.path.join(ns.out, 'mutransfer.png')}")


def figure(tune, full, moved, n, path):
    from matplotlib.figure import Figure  # optional until a figure is drawn

    fig = Figure(figsize=(11, 3.8), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for mult, color in zip(tune["OUTPUT_MULT"].values, ("C0", "C1", "C2", "C3", "C4", "C5")):
        ax1.plot(tune["LR"], tune.sel(OUTPUT_MULT=mult), "--o", color=color, ms=3,
                 label=f"width {n['base_width']}, OUTPUT_MULT {mult:g}")
        ax1.plot(full["LR"], full.sel(OUTPUT_MULT=mult), "-s", color=color, ms=3,
                 label=f"width {n['full_width']}, OUTPUT_MULT {mult:g}")
    ax1.axvline(n["tuned"]["LR"], color="gray", lw=0.8)
    ax1.set(yscale="log", xlabel="LR", ylabel="final test loss", title="the grid at the base and the full width (mup)")
    ax1.set_xscale("log", base=2)
    ax1.legend(fontsize="x-small")
    widths = sorted(n["transferred"]["mup"])
    for p, style in (("mup", "-o"), ("sp", "--x")):
        ax2.plot(widths, [n["transferred"][p][w] for w in widths], style, label=f"{p} at the tuned values")
    ax2.axhline(n["full_sweep_best"]["test_loss"], color="k", lw=0.8,
                label=f"best of the full sweep at width {n['full_width']}")
    ax2.axhline(n["entropy_rate"], color="gray", lw=0.8, ls=":", label="entropy rate of the language")
    ax2.set(xlabel="width", ylabel="final test loss",
            title=f"transfer: gap {n['gap_percent']:+.1f}% (mup), {n['sp_gap_percent']:+.1f}% (sp)")
    ax2.set_xscale("log", base=2)
    ax2.legend(fontsize="x-small")
    fig.suptitle(f"muTransfer on the GPT: LR and OUTPUT_MULT tuned at width {n['base_width']} (BASE_WIDTH)")
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
