"""LoopObserver: the one extension point of the step loop, called the same way alone and fused."""
import numpy as np
import torch

from modelscape.backend.fused import train_fused, why_not_fusable
from modelscape.backend.job import prepare_job, train_prepared
from modelscape.backend.trainloop import LoopObserver, train_loop
from modelscape.data import powerlaw_bfn

BFN = dict(base_bfn=powerlaw_bfn, dim=8)


class Seen(LoopObserver):
    """Records what the loop shows it: steps before updates, read-backs with the losses fed so far, the end."""

    def __init__(self):
        self.before, self.syncs, self.end = [], [], None

    def before_step(self, step, model, opt):
        self.before.append(step)

    def after_sync(self, step, tracker, evals):
        self.syncs.append((step, tracker.seen, len(tracker.raw)))

    def at_end(self, record, model, opt):
        self.end = (record["steps"], record["status"], model)


class Reporter(LoopObserver):
    def __init__(self):
        self.syncs, self.end = [], None

    def after_sync(self, step, tracker, evals):
        self.syncs.append((step, tracker.seen, float(tracker.ema)))

    def at_end(self, record, model, opt):
        self.end = (record["steps"], record["train_loss"], model)


def test_train_loop_calls_each_point_in_order():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)

    def bfn(step):
        return torch.randn(8, 3, generator=gen), torch.randn(8, 1, generator=gen)

    seen = Seen()
    out = train_loop(model, bfn, opt, torch.nn.MSELoss(), max_iter=10, thresholds=[1e-9], sync_every=4,
                     only_thresholds=False, eval_every=5, observers=[seen])
    assert seen.before == list(range(10))
    # read back after steps 4 and 8 (sync_every) and at MAX_ITER; the tracker has every loss up to there
    assert seen.syncs == [(4, 4, 4), (8, 8, 8), (10, 10, 10)]
    assert seen.end == (10, out["status"], model)
    assert Reporter().wants("after_sync") and not Reporter().wants("before_step")


def test_fused_members_get_their_own_reports_and_before_step_prevents_fusing():
    cfgs = [dict(PARAMETERIZATION="mup", WIDTH=16, DEPTH=2, MAX_ITER=30, N_SAMPLES=32, N_TEST=32, LR=lr,
                 LOSS_CHECKPOINTS=[0.9], ONLYTHRESHOLDS=True) for lr in (0.05, 0.3)]
    alone = []
    for c in cfgs:
        job = prepare_job(c, BFN, quiet=True)
        job.observers = [Reporter()]
        train_prepared(job)
        alone.append(job.observers[0])
    fused = [prepare_job(c, BFN, quiet=True) for c in cfgs]
    for job in fused:
        job.observers = [Reporter()]
        assert why_not_fusable(job) is None
    records = train_fused(fused)
    for a, job, rec in zip(alone, fused, records):
        f = job.observers[0]
        assert [s[:2] for s in f.syncs] == [s[:2] for s in a.syncs]
        np.testing.assert_allclose([s[2] for s in f.syncs], [s[2] for s in a.syncs], rtol=1e-5)
        assert f.end[0] == rec["steps"] and f.end[2] is job.model
    blocked = prepare_job(cfgs[0], BFN, quiet=True)
    blocked.observers = [Seen()]
    assert "Seen acts on the model before steps" in why_not_fusable(blocked)
