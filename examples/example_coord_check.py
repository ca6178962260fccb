"""Coordinate check: do the layers' activations keep their size as the network gets wider?

Trains MLPs of widths 64..2048 for a few SGD steps on a synthetic regression task (a tanh teacher), once in the
standard parameterization (sp, PyTorch's default init and one learning rate) and once under muP, and plots
the RMS of every layer's output against width, one panel per step. Under muP the lines stay flat; under sp
the read-out and then the hidden layers grow with width after the first steps, which is why sp's best
learning rate shrinks as the model widens.

    python examples/example_coord_check.py [--out results/coord_check] [--steps 4] [--lr 0.5]

Writes coord_check_sp.png and coord_check_mup.png to --out and prints the RMS of the hidden layers at the
last step. Runs in well under a minute on a laptop CPU.
"""
import argparse
import os

import torch

from modelscape.data.synthetic import powerlaw_bfn
from modelscape.models import MLP
from modelscape.mup import coord_check, plot_coord_check

D_IN = 32


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/coord_check", help="folder for the figures")
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    parser.add_argument("--steps", type=int, default=4, help="SGD steps (panels: steps 0..steps)")
    parser.add_argument("--lr", type=float, default=0.5, help="learning rate, the same for both")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    # Isotropic inputs (alpha=0: every coordinate has unit variance) and a tanh teacher. coord_check draws
    # the batches once, so every width sees the same data.
    batch_fn = powerlaw_bfn(128, gen=torch.Generator().manual_seed(0), dim=D_IN, alpha=0.0, nonlinear=True)

    def model_fn(width):
        return MLP(d_in=D_IN, width=width, depth=3, d_out=1)

    results = {}
    for param in ("sp", "mup"):
        da = coord_check(model_fn, args.widths, batch_fn, steps=args.steps, param=param,
                         optimizer=torch.optim.SGD, lr=args.lr)
        path = os.path.join(args.out, f"coord_check_{param}.png")
        plot_coord_check(da, path)
        print(f"wrote {path}")
        results[param] = da.sel(step=args.steps)

    hidden = [str(n) for n in results["mup"]["layer"].values if str(n).startswith("hidden")]
    cols = [(param, layer) for param in results for layer in hidden]
    print(f"\nRMS of hidden-layer outputs after {args.steps} SGD steps (lr={args.lr}):")
    print(f"{'width':>6} " + " ".join(f"{p + ' ' + l:>20}" for p, l in cols))
    for width in args.widths:
        row = [float(results[p].sel(width=width, layer=l)) for p, l in cols]
        print(f"{width:>6} " + " ".join(f"{v:>20.3g}" for v in row))
    for param, da in results.items():
        ratio = float((da.max("width") / da.min("width")).sel(layer=hidden).max())
        print(f"{param}: largest max/min ratio across widths of a hidden layer's RMS = {ratio:.2f}")


if __name__ == "__main__":
    main()
