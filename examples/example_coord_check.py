"""Coordinate check: do the layers' activations keep their size as the network gets wider?

Trains MLPs of widths 64..2048 for a few SGD steps on a synthetic regression task (a tanh teacher), once in the
standard parameterization (sp, PyTorch's default init and one learning rate) and once under muP, and plots
the RMS of every layer's output against width, one panel per step. Under muP the lines stay flat; under sp
the read-out and then the hidden layers grow with width after the first steps, which is why sp's best
learning rate shrinks as the model widens.

``--model gpt`` does the same for ``modelscape.models.GPT`` (2 blocks) on the synthetic language of
``modelscape.data.markov_bfn``, recording the change of every layer's output from init (embeddings,
LayerNorms and Linear layers), with ``--optimizer SGD`` or ``Adam``.

    python examples/example_coord_check.py [--out results/coord_check] [--steps 4] [--lr 0.5]
    python examples/example_coord_check.py --model gpt --optimizer Adam --widths 64 256 1024

Writes coord_check_sp.png and coord_check_mup.png (``coord_check_gpt_<optimizer>_<param>.png`` for the GPT) to
--out and prints the hidden layers' values at the last step. The default run took 14 s on a 2-core machine
busy with other work (load average 5.6).
"""
import argparse
import os

import torch
from torch import nn

from modelscape.data import markov_bfn
from modelscape.data.synthetic import powerlaw_bfn
from modelscape.models import GPT, MLP
from modelscape.mup import coord_check, plot_coord_check

D_IN = 32
# learning rates per (model, optimizer, parameterization) where --lr is not given
LRS = {("mlp", "SGD"): {"sp": 0.5, "mup": 0.5}, ("mlp", "Adam"): {"sp": 0.003, "mup": 0.05},
       ("gpt", "SGD"): {"sp": 0.5, "mup": 0.5}, ("gpt", "Adam"): {"sp": 0.003, "mup": 0.05}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/coord_check", help="folder for the figures")
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048])
    parser.add_argument("--steps", type=int, default=4, help="SGD steps (panels: steps 0..steps)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate, the same for both (default: "
                        "0.5 for SGD; Adam 0.003 under sp, 0.05 under mup)")
    parser.add_argument("--model", choices=["mlp", "gpt"], default="mlp")
    parser.add_argument("--optimizer", choices=["SGD", "Adam"], default="SGD")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    optimizer = getattr(torch.optim, args.optimizer)

    # coord_check draws the batches once, so every width sees the same data.
    if args.model == "mlp":
        # Isotropic inputs (alpha=0: every coordinate has unit variance) and a tanh teacher.
        batch_fn = powerlaw_bfn(128, gen=torch.Generator().manual_seed(0), dim=D_IN, alpha=0.0, nonlinear=True)
        measure, loss_fn, prefix = "rms", None, "coord_check"

        def model_fn(width):
            return MLP(d_in=D_IN, width=width, depth=3, d_out=1)
    else:
        batch_fn = markov_bfn(8, gen=torch.Generator().manual_seed(0), vocab_size=16, seq_len=16)
        measure, loss_fn, prefix = "delta", nn.CrossEntropyLoss(), f"coord_check_gpt_{args.optimizer.lower()}"

        def model_fn(width):
            return GPT(vocab_size=16, seq_len=16, width=width, depth=2)

    results = {}
    for param in ("sp", "mup"):
        lr = args.lr if args.lr is not None else LRS[args.model, args.optimizer][param]
        da = coord_check(model_fn, args.widths, batch_fn, steps=args.steps, param=param, optimizer=optimizer,
                         lr=lr, loss_fn=loss_fn, measure=measure)
        path = os.path.join(args.out, f"{prefix}_{param}.png")
        plot_coord_check(da, path)
        print(f"wrote {path}")
        results[param] = da.sel(step=args.steps)

    hidden = [str(n) for n in results["mup"]["layer"].values
              if str(n).startswith("hidden") or str(n).endswith(("fc2", "ln_f"))]
    cols = [(param, layer) for param in results for layer in hidden]
    what = "RMS" if measure == "rms" else "RMS of the change"
    print(f"\n{what} of hidden-layer outputs after {args.steps} {args.optimizer} steps:")
    print(f"{'width':>6} " + " ".join(f"{p + ' ' + l:>20}" for p, l in cols))
    for width in args.widths:
        row = [float(results[p].sel(width=width, layer=l)) for p, l in cols]
        print(f"{width:>6} " + " ".join(f"{v:>20.3g}" for v in row))
    for param, da in results.items():
        ratio = float((da.max("width") / da.min("width")).sel(layer=hidden).max())
        print(f"{param}: largest max/min ratio across widths of a hidden layer's value = {ratio:.2f}")


if __name__ == "__main__":
    main()
