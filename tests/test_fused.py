"""Fused trials: a group trained as one stacked model gives each job the record run_config gives it."""
import logging

import numpy as np
import pytest
import torch
from torch import nn

from modelscape.backend.fused import fuse_cap, fuse_key, member_bytes, run_group, train_fused, why_not_fusable
from modelscape.backend.job import prepare_job, run_config
from modelscape.config import canonicalize
from modelscape.data import powerlaw_bfn

BFN = dict(base_bfn=powerlaw_bfn, dim=8)
RTOL = 1e-5


def out_norm(model, trial, **kwargs):
    """A grab that reads the member's own model (and a config value), along training."""
    return torch.stack([model.output_layer.weight.norm(), model.input_layer.bias.sum() * (trial + 1)])


def base(**kw):
    c = dict(PARAMETERIZATION="mup", WIDTH=32, DEPTH=2, MAX_ITER=60, N_SAMPLES=64, N_TEST=128,
             LOSS_CHECKPOINTS=[0.5, 0.3], EVAL_EVERY=20, ONLYTHRESHOLDS=False, otherreturns={"norms": out_norm})
    c.update(kw)
    return c


def assert_same_record(ref, got, where):
    assert set(ref) == set(got), (where, set(ref) ^ set(got))
    for key in ref:
        if key == "wall_time":
            continue
        a, b = ref[key], got[key]
        if isinstance(a, dict):
            assert_same_record(a, b, f"{where}.{key}")
        elif isinstance(a, str) or a is None:
            assert a == b, (where, key, a, b)
        else:
            a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
            assert a.shape == b.shape, (where, key, a.shape, b.shape)
            np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b), err_msg=f"{where}.{key}")
            np.testing.assert_array_equal(a[~np.isfinite(a)], b[~np.isfinite(b)], err_msg=f"{where}.{key}")
            np.testing.assert_allclose(b[np.isfinite(b)], a[np.isfinite(a)], rtol=RTOL, atol=0,
                                       err_msg=f"{where}.{key}")


# (LR, GAMMA, trial, PARAMETERIZATION, extra): early exits at different steps, one divergence (LR 50), one
# member stopped by its own MAX_ITER, momentum and weight decay on one member.
MEMBERS = [(0.05, 1.0, 0, "mup", {}), (0.2, 1.0, 1, "mup", {}), (0.5, 2.0, 0, "ntp", {}),
           (50.0, 1.0, 2, "mup", {}), (0.1, 0.5, 3, "sp", dict(MOMENTUM=0.9, WEIGHT_DECAY=1e-3)),
           (0.02, 1.0, 1, "mup", dict(MAX_ITER=17))]


@pytest.mark.parametrize("online,sync", [(True, 1), (False, 4)])
def test_fused_group_equals_one_by_one(online, sync):
    jobs = [(base(LR=lr, GAMMA=g, PARAMETERIZATION=p, ONLINE=online, SYNC_EVERY=sync, **extra), {"trial": t, "LR": lr})
            for lr, g, t, p, extra in MEMBERS]
    ref = [run_config(c, BFN, axes=a, quiet=True) for c, a in jobs]
    prepared = [prepare_job(c, BFN, axes=a, quiet=True) for c, a in jobs]
    assert all(why_not_fusable(j) is None for j in prepared)
    got = train_fused(prepared)
    # the group really is what the test claims: exits at different steps, a divergence, a MAX_ITER stop
    statuses = [r["status"] for r in ref]
    assert statuses.count("diverged") == 1 and "not_reached" in statuses
    assert len({r["steps"] for r in ref if r["status"] == "done"}) >= 3
    for (c, a), r, f in zip(jobs, ref, got):
        assert (f["status"], f["steps"]) == (r["status"], r["steps"]), a
        np.testing.assert_array_equal(f["timekeys"], r["timekeys"])
        assert_same_record(r, f, str(a))
        assert f["grabs"]["norms"].shape == (len(r["eval_steps"]), 2)


@pytest.mark.parametrize("opt", ["Adam", "AdamW"])
def test_fused_adam_equals_one_by_one(opt):
    jobs = [(base(OPTIMIZER=opt, LR=lr, GAMMA=g, WEIGHT_DECAY=wd, MAX_ITER=25, ONLYTHRESHOLDS=True,
                  LOSS_CHECKPOINTS=[0.8]), {"trial": t})
            for lr, g, t, wd in [(0.01, 1.0, 0, 0.0), (0.03, 2.0, 1, 0.1), (0.005, 0.5, 2, 0.0)]]
    ref = [run_config(c, BFN, axes=a, quiet=True) for c, a in jobs]
    got = run_group(jobs, BFN)
    for (c, a), r, f in zip(jobs, ref, got):
        assert_same_record(r, f, str(a))


def test_a_failing_grab_fails_only_its_member():
    def picky(model, trial, **kwargs):
        if trial == 1:
            raise ValueError("no grab for trial 1")
        return model.output_layer.weight.norm()

    jobs = [(base(ONLYTHRESHOLDS=True, MAX_ITER=15, otherreturns={"n": picky}), {"trial": t}) for t in range(3)]
    got = run_group(jobs, BFN)
    assert [r["status"] for r in got].count("failed") == 1
    assert "no grab for trial 1" in got[1]["error"]
    for (c, a), f in zip(jobs, got):
        if a["trial"] != 1:
            assert_same_record(run_config(c, BFN, axes=a, quiet=True), f, str(a))


class Custom(nn.Module):
    def __init__(self, d_in=8, width=16, d_out=1):
        super().__init__()
        self.a, self.b = nn.Linear(d_in, width), nn.Linear(width, d_out)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def test_unfusable_jobs_run_one_by_one_with_a_note(caplog):
    plain = dict(ONLYTHRESHOLDS=True, MAX_ITER=10, otherreturns={})
    jobs = [(base(MODEL=Custom, **plain), {"trial": t}) for t in range(2)]
    jobs.append((base(OPTIMIZER="RMSprop", **plain), {"trial": 0}))
    with caplog.at_level(logging.WARNING, logger="modelscape.backend.fused"):
        got = run_group(jobs, BFN)
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 2 and any("Custom" in n for n in notes) and any("RMSprop" in n for n in notes)
    for (c, a), f in zip(jobs, got):
        ref = run_config(c, BFN, axes=a, quiet=True)
        assert f["train_loss"] == ref["train_loss"] and f["test_loss"] == ref["test_loss"]  # the same code ran


def test_fuse_key_ignores_numbers_and_the_width_only():
    k = lambda **kw: fuse_key(canonicalize(base(**kw)))  # noqa: E731
    assert k(LR=0.1, GAMMA=2.0, PARAMETERIZATION="sp", SEED=3, WIDTH=64) == k(LR=0.2)
    assert k(DEPTH=3) != k() and k(N_SAMPLES=32) != k() and k(CENTER=False) != k()


def test_fuse_cap_bounds_groups_on_cpu_and_by_free_gpu_memory(monkeypatch):
    assert fuse_cap(1000, "cpu") == 64 and fuse_cap(8, "cpu") == 8 and fuse_cap(0, "cpu") == 1
    job = prepare_job(base(), BFN, quiet=True)
    need = member_bytes(job)
    assert need >= 4 * 6 * sum(p.numel() for p in job.model.parameters())
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (20 * need, 40 * need))
    assert fuse_cap(64, "cuda:0", need) == 10 and fuse_cap(4, "cuda:0", need) == 4


def test_sweep_fuses_and_stores_the_same_rows_as_one_by_one(tmp_path):
    from modelscape.backend.cli import base_args
    from modelscape.backend.job_iterator import main
    from modelscape.backend.store import Store

    g = vars(base_args())
    g.update(base(MAX_ITER=40, ONLYTHRESHOLDS=True), FUSE_MAX=3)
    axes, names = [[0.05, 0.2, 50.0], [0, 1]], ["LR", "trial"]
    out = {}
    for fuse in ("off", "auto"):
        res = main(axes, names, dict(g, FUSE=fuse), BFN, executor="inprocess", store=str(tmp_path / fuse),
                   progress=False)
        st = Store(str(tmp_path / fuse))
        out[fuse] = (res, {r["job_id"]: r for r in st.records()})
        st.close()
    (res_off, rows_off), (res_on, rows_on) = out["off"], out["auto"]
    assert sorted(rows_off) == sorted(rows_on)  # the same job identities: FUSE changes no result
    for job_id, r in rows_off.items():
        assert r["config"].pop("FUSE") == "off" and rows_on[job_id]["config"].pop("FUSE") == "auto"
        assert_same_record(r, rows_on[job_id], str(r["axes"]))
    assert res_on.status_counts() == res_off.status_counts() and "diverged" in res_on.status_counts()


def test_plan_units_groups_fusable_jobs_and_notes_the_rest(caplog):
    from modelscape.backend.fused import plan_units
    jobs = [(i, canonicalize(base(LR=0.1 * (i + 1), FUSE_MAX=3))) for i in range(7)]
    jobs += [(7, canonicalize(base(WIDTH=64))), (8, canonicalize(base(FUSE="off")))]
    jobs += [(9 + i, canonicalize(base(MODEL=Custom))) for i in range(2)]
    with caplog.at_level(logging.WARNING, logger="modelscape.backend.fused"):
        units = plan_units(jobs)
    assert units == [[0, 1], [2, 3], [4, 5, 6], [7], [8], [9], [10]]
    assert len(caplog.records) == 1 and "2 job(s)" in caplog.records[0].getMessage()


def test_a_resumed_sweep_keeps_each_whole_missing_group_and_regroups_only_the_rest(caplog):
    from modelscape.backend.fused import plan_units
    jobs = [(i, canonicalize(base(LR=0.01 * (i + 1), FUSE_MAX=3))) for i in range(10)]
    jobs += [(10, canonicalize(base(MODEL=Custom)))]
    assert plan_units(jobs) == [[0, 1], [2, 3, 4], [5, 6], [7, 8, 9], [10]]
    # Planned from the missing jobs alone, these five would be cut [2, 3], [4, 5, 6]: other groups than the
    # first run's, so other float32 roundings. Whole missing groups keep their members.
    assert plan_units(jobs, todo=[2, 3, 4, 5, 6]) == [[2, 3, 4], [5, 6]]
    # Jobs left over from partly stored groups (1; 3, 4) are grouped anew; a job that cannot fuse stays alone.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="modelscape.backend.fused"):
        assert plan_units(jobs, todo=[1, 3, 4, 5, 6, 10]) == [[1, 3, 4], [5, 6], [10]]
    assert len(caplog.records) == 1 and "1 job(s)" in caplog.records[0].getMessage()  # counts the jobs to run
    # A plan made before (a Slurm shard's) is kept the same way.
    assert plan_units(jobs, todo=[0, 1, 9], units=[[0, 1, 2], [9]]) == [[0, 1], [9]]


# --- widths: members padded to the widest of their bucket ----------------------------------------------------

def weight_norms(model, **kwargs):
    """A grab that reads the member's own (unpadded) model: its weights' norms."""
    return torch.stack([model.input_layer.weight.norm(), model.output_layer.weight.norm()])


# (WIDTH, LR, trial, PARAMETERIZATION, extra): the only width-32 member leaves first (at its MAX_ITER of 9), so the stack narrows to 24 while the others train on; momentum and weight decay on one member,
# one stopped by its own MAX_ITER of 17.
WIDTH_MEMBERS = [(16, 0.05, 0, "mup", {}), (24, 0.1, 1, "mup", dict(MOMENTUM=0.9, WEIGHT_DECAY=1e-3)),
                 (32, 0.5, 2, "mup", dict(MAX_ITER=9)), (20, 0.02, 1, "ntp", dict(MAX_ITER=17)),
                 (24, 0.1, 0, "sp", {})]
ADAM_WIDTH_MEMBERS = [(16, 0.01, 0, "mup", {}), (24, 0.03, 1, "mup", dict(WEIGHT_DECAY=0.1)),
                      (32, 0.05, 2, "sp", dict(MAX_ITER=9)), (20, 0.005, 1, "ntp", dict(MAX_ITER=17)),
                      (24, 0.1, 0, "mup", {})]


@pytest.mark.parametrize("optimizer,online,center,nonlinearity", [
    ("SGD", True, True, "relu"), ("SGD", False, False, "sigmoid"), ("SGD", True, False, "tanh"),
    ("Adam", True, False, "sigmoid"), ("AdamW", False, True, "relu")])
def test_fused_widths_equal_one_by_one(optimizer, online, center, nonlinearity, monkeypatch):
    from modelscape.backend.stacked import StackedMLP
    widths_seen = []
    select = StackedMLP.select
    monkeypatch.setattr(StackedMLP, "select", lambda self, keep: widths_seen.append(select(self, keep)) or
                        widths_seen[-1])
    members = WIDTH_MEMBERS if optimizer == "SGD" else ADAM_WIDTH_MEMBERS
    jobs = [(base(WIDTH=w, LR=lr, PARAMETERIZATION=p, OPTIMIZER=optimizer, ONLINE=online, CENTER=center,
                  nonlinearity=nonlinearity, SYNC_EVERY=1 if online else 4, otherreturns={"norms": weight_norms},
                  **extra), {"trial": t, "WIDTH": w})
            for w, lr, t, p, extra in members]
    ref = [run_config(c, BFN, axes=a, quiet=True) for c, a in jobs]
    prepared = [prepare_job(c, BFN, axes=a, quiet=True) for c, a in jobs]
    assert all(why_not_fusable(j) is None for j in prepared)
    got = train_fused(prepared)
    assert ref[2]["steps"] <= 9 and ref[3]["steps"] == 17  # the group is what it claims
    assert len({r["steps"] for r in ref}) >= 3
    assert widths_seen and widths_seen[0] == 24  # the widest left first: the stack narrowed
    for (c, a), r, f in zip(jobs, ref, got):
        assert (f["status"], f["steps"]) == (r["status"], r["steps"]), a
        assert_same_record(r, f, str(a))


@pytest.mark.parametrize("optimizer", ["SGD", "Adam", "AdamW"])
def test_padding_stays_exactly_zero_whatever_the_nonlinearity(optimizer):
    """Sigmoid(0) = 0.5: without the mask a padded unit would be 0.5 and its outgoing weights would learn."""
    from modelscape.backend.stacked import StackedMLP, StackedOptimizer
    extra = dict(MOMENTUM=0.9) if optimizer == "SGD" else {}
    jobs = [prepare_job(base(WIDTH=w, OPTIMIZER=optimizer, LR=0.1, WEIGHT_DECAY=0.01, nonlinearity="sigmoid",
                             **extra), BFN, axes={"trial": 0}, quiet=True) for w in (8, 13, 16)]
    stack = StackedMLP([j.model for j in jobs])
    opt = StackedOptimizer(jobs, stack)
    X = torch.randn(3, 32, 8)
    for _ in range(5):
        loss = stack.forward(stack.params, X).pow(2).mean((1, 2)).sum()
        opt.step(stack.params, torch.autograd.grad(loss, stack.params))
    for name, p in zip(stack.names, stack.params):
        for row, w in enumerate((8, 13, 16)):
            padding = p[row].detach().clone()
            padding[tuple(slice(0, w) if d in [x - 1 for x in stack.width_dims[stack.names.index(name)]]
                          else slice(None) for d in range(padding.ndim))] = 0
            assert padding.abs().max() == 0, (optimizer, name, w)
        assert p.detach().abs().sum() > 0
    # and each member's own part moved: its write-back is its model's shape
    stack.write_back(0, jobs[0].model)
    assert jobs[0].model.hidden_layers[0].weight.shape == (8, 8)


def test_width_buckets_keep_widths_within_2x_of_the_smallest():
    from modelscape.backend.plan import width_buckets
    widths = [512, 256, 2048, 1024, 300, 256, 4096, 64]
    buckets = width_buckets(widths)
    assert [[widths[k] for k in b] for b in buckets] == [[64], [256, 256, 300, 512], [1024, 2048], [4096]]
    assert buckets[1] == [1, 5, 4, 0]  # by width, then position
    assert width_buckets([]) == [] and width_buckets([7]) == [[0]]


def test_run_group_fuses_each_width_bucket_padded_to_its_widest(monkeypatch):
    import modelscape.backend.fused as fused
    groups = []
    train = fused.train_fused
    monkeypatch.setattr(fused, "train_fused", lambda js: groups.append([j.model.width for j in js]) or train(js))
    jobs = [(base(WIDTH=w, MAX_ITER=5, ONLYTHRESHOLDS=True, otherreturns={}), {"trial": t, "WIDTH": w})
            for w, t in [(40, 0), (16, 0), (32, 1), (16, 1), (64, 0), (128, 0), (96, 1)]]
    got = run_group(jobs, BFN)
    assert groups == [[16, 16, 32], [40, 64], [96, 128]]
    for (c, a), f in zip(jobs, got):
        assert f["axes"] == a and f["status"] in ("done", "not_reached")


def test_member_bytes_counts_the_padded_member():
    small = prepare_job(base(WIDTH=16), BFN, quiet=True)
    wide = prepare_job(base(WIDTH=32), BFN, quiet=True)
    assert member_bytes(small, 32) == member_bytes(wide) > member_bytes(small)
