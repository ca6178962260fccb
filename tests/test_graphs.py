"""CUDA graphs in the step loop (``backend.graphs``): when a job may be recorded, and, where CUDA is, that a
replayed step gives the eager step's numbers and falls back to eager steps (logged) when it cannot go on."""
import logging

import numpy as np
import pytest
import torch

from modelscape.backend.graphs import WARMUP, why_not_graphed
from modelscape.backend.interventions import StepHooks
from modelscape.backend.trainloop import train_loop
from modelscape.models import MLP

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def test_who_may_be_recorded():
    model = MLP(d_in=4, width=8, depth=1)
    assert why_not_graphed("off", model, [], 100) == "CUDA_GRAPHS=off"
    assert "not CUDA" in why_not_graphed("auto", model, [], 100)
    if torch.cuda.is_available():
        model = model.cuda()
        assert why_not_graphed("auto", model, [], 100) is None
        hooks = StepHooks({0: lambda model, opt, step: None}, {})
        assert "StepHooks acts between steps" in why_not_graphed("auto", model, [hooks.before_step], 100)
        assert "no step to replay" in why_not_graphed("auto", model, [], WARMUP)


def run(device, cuda_graphs, opt_cls=torch.optim.SGD, offline=False, steps=12, change_at=None, **opt_kwargs):
    torch.manual_seed(0)
    model = MLP(d_in=8, width=32, depth=2).to(device)
    opt = opt_cls(model.parameters(), lr=0.05, **opt_kwargs)
    gen = torch.Generator(device=device).manual_seed(1)
    fixed = (torch.randn(16, 8, generator=gen, device=device), torch.randn(16, 1, generator=gen, device=device))

    def batch(step):
        if offline:
            return fixed
        n = 12 if change_at is not None and step >= change_at else 16
        return torch.randn(n, 8, generator=gen, device=device), torch.randn(n, 1, generator=gen, device=device)

    out = train_loop(model, batch, opt, torch.nn.MSELoss(), max_iter=steps, thresholds=[1e-9],
                     only_thresholds=False, eval_every=5, sync_every=4, cuda_graphs=cuda_graphs, label="[t]")
    return out, [p.detach().cpu() for p in model.parameters()]


def test_on_the_cpu_auto_is_the_eager_loop_and_says_nothing(caplog):
    with caplog.at_level(logging.INFO, logger="modelscape.backend.trainloop"):
        a, pa = run("cpu", "auto")
    b, pb = run("cpu", "off")
    np.testing.assert_array_equal(a["train_raw"], b["train_raw"])
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert not caplog.records


@cuda
@pytest.mark.parametrize("opt_cls,kw", [(torch.optim.SGD, dict(momentum=0.9, weight_decay=1e-3)),
                                        (torch.optim.Adam, {}), (torch.optim.AdamW, dict(weight_decay=0.01))])
@pytest.mark.parametrize("offline", [False, True])
def test_a_replayed_step_gives_the_eager_numbers(opt_cls, kw, offline):
    a, pa = run("cuda", "auto", opt_cls, offline, **kw)
    b, pb = run("cuda", "off", opt_cls, offline, **kw)
    np.testing.assert_allclose(a["train_raw"], b["train_raw"], rtol=1e-5, atol=1e-7)
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@cuda
def test_a_batch_that_changes_shape_falls_back_to_eager_steps(caplog):
    with caplog.at_level(logging.WARNING, logger="modelscape.backend.graphs"):
        a, _ = run("cuda", "auto", change_at=WARMUP + 3, steps=10)
    b, _ = run("cuda", "off", change_at=WARMUP + 3, steps=10)
    assert a["steps"] == 10 and "steps eagerly from here" in caplog.text and "[t]" in caplog.text
    np.testing.assert_allclose(a["train_raw"], b["train_raw"], rtol=1e-5, atol=1e-7)


@cuda
def test_a_step_that_cannot_be_captured_runs_eagerly(caplog):
    class Syncs(MLP):
        def forward(self, x):
            if float(x.abs().sum()) < 0:  # a read back to the CPU: capture fails here
                x = -x
            return super().forward(x)

    torch.manual_seed(0)
    model = Syncs(d_in=8, width=16, depth=1).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator(device="cuda").manual_seed(1)
    with caplog.at_level(logging.WARNING, logger="modelscape.backend.graphs"):
        out = train_loop(model, lambda s: (torch.randn(16, 8, generator=gen, device="cuda"),
                                           torch.randn(16, 1, generator=gen, device="cuda")),
                         opt, torch.nn.MSELoss(), max_iter=8, thresholds=[1e-9], cuda_graphs="auto")
    assert out["steps"] == 8 and np.isfinite(out["train_loss"]) and "capture failed" in caplog.text
