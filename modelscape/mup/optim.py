"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), written here from the paper: torch has
no Lion, and sign-based optimizers need their own muP rule (Adam's: every entry moves by exactly lr)."""
from __future__ import annotations

import torch

__all__ = ["Lion"]


class Lion(torch.optim.Optimizer):
    """``p -= lr * (sign(beta1 * m + (1 - beta1) * g) + weight_decay * p)``, then ``m = beta2 * m + (1 - beta2)
    * g``. Its step has the same size in every entry whatever the gradient's scale, so muP gives it Adam's
    learning-rate rule (``mup_update_rule``); useful learning rates are 3-10x smaller than Adam's. Weight
    decay is decoupled, as in AdamW."""

    mup_update_rule = "adam"

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        if not lr >= 0:
            raise ValueError(f"Lion: lr must be >= 0, got {lr}")
        if not all(0 <= b < 1 for b in betas) or len(betas) != 2:
            raise ValueError(f"Lion: betas must be two numbers in [0, 1), got {betas}")
        if not weight_decay >= 0:
            raise ValueError(f"Lion: weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                direction = m.mul(beta1).add_(p.grad, alpha=1 - beta1).sign_()
                p.add_(direction, alpha=-group["lr"])
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss
