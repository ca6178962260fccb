"""Fused groups in a sweep: width buckets, a group cut so that every worker has work, and a recorded plan that a
resumed sweep reuses, so that it trains each missing group as the first run did and gets its numbers to the bit."""
import logging
import os
import sqlite3
from collections import Counter

import numpy as np
import pytest
import torch

from modelscape.backend.cli import base_args
from modelscape.backend.job_iterator import main
from modelscape.backend.plan import plan_units
from modelscape.backend.store import Store
from modelscape.config import canonicalize

from test_fused import BFN, base
from test_store import assert_same


def fusable(n, **kw):
    return [(i, canonicalize(base(LR=0.01 * (i + 1), **kw))) for i in range(n)]


@pytest.fixture(autouse=True)
def one_thread():
    # bit-for-bit comparisons need the same split of sums over threads in both runs (see test_resume)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --- the plan --------------------------------------------------------------------------------------------------

def test_a_group_larger_than_a_workers_share_is_cut_so_every_worker_has_work():
    jobs = fusable(14)
    assert plan_units(jobs) == [list(range(14))]
    assert plan_units(jobs, workers=2) == [list(range(7)), list(range(7, 14))]
    assert plan_units(jobs, workers=4) == [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13]]
    assert plan_units(jobs, workers=100) == [[i] for i in range(14)]
    # FUSE_MAX still bounds a group
    assert plan_units(fusable(14, FUSE_MAX=5), workers=2) == [[0, 1, 2, 3], [4, 5, 6, 7, 8], [9, 10, 11, 12, 13]]
    # the share counts every job planned: beside 14 jobs that cannot fuse, the group of 14 is one worker's share
    from test_fused import Custom
    more = jobs + [(14 + i, canonicalize(base(MODEL=Custom))) for i in range(14)]
    assert plan_units(more, workers=2)[0] == list(range(14))


def test_widths_are_planned_in_buckets_within_2x_near_widths_together():
    widths = [16, 64, 24, 32, 128, 16, 48]
    jobs = [(i, canonicalize(base(WIDTH=w))) for i, w in enumerate(widths)]
    assert plan_units(jobs) == [[0, 5, 2, 3], [4], [6, 1]]
    assert plan_units(jobs, workers=3) == [[0, 5], [2, 3], [4], [6, 1]]  # a share of 3: 16, 16 | 24, 32
    # other shapes never share a group, whatever the width
    jobs.append((7, canonicalize(base(WIDTH=16, DEPTH=3))))
    assert [7] in plan_units(jobs)


def test_a_recorded_plan_is_kept_where_it_still_holds(caplog):
    jobs = fusable(14)
    recorded = plan_units(jobs, workers=4)
    assert recorded == [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13]]
    missing = list(range(7, 14))
    # planned afresh by one worker, the missing jobs would be one group of 7: other roundings than the first run's
    assert plan_units(jobs, todo=missing) == [missing]
    assert plan_units(jobs, todo=missing, previous=recorded) == [[7, 8, 9], [10, 11, 12, 13]]
    # jobs of a partly stored group are planned anew, the whole missing groups kept
    assert plan_units(jobs, todo=[5, 6] + missing, previous=recorded) == [[5, 6], [7, 8, 9], [10, 11, 12, 13]]
    # a lower FUSE_MAX, or FUSE=off, given to the resumed run is obeyed
    assert plan_units(fusable(14, FUSE_MAX=2), todo=missing, previous=recorded) == [[7], [8, 9], [10, 11], [12, 13]]
    assert plan_units(fusable(14, FUSE="off"), todo=missing, previous=recorded) == [[i] for i in missing]
    # a job that cannot fuse is still noted, though its unit comes from the record
    from test_fused import Custom
    jobs[13] = (13, canonicalize(base(MODEL=Custom)))
    with caplog.at_level(logging.WARNING, logger="modelscape.backend.fused"):
        units = plan_units(jobs, todo=missing, previous=recorded)
    assert units == [[7, 8, 9], [10, 11, 12], [13]]  # the group that held it is no longer whole-fusable
    assert len(caplog.records) == 1 and "1 job(s)" in caplog.records[0].getMessage()


def test_the_store_records_units_and_reads_back_only_whole_ones(tmp_path):
    with Store(tmp_path) as st:
        assert st.units(["a"]) == []
        st.record_units([["c", "a", "b"], ["d", "e"]])
        assert st.units(["a"]) == [["a", "b", "c"]]
        assert sorted(st.units(["a", "e", "x"])) == [["a", "b", "c"], ["d", "e"]]
        st.record_units([["a", "b"]])  # a and b planned again, into a group of their own
        assert st.units(["c"]) == []  # c's group is not whole any more
        assert st.units(["a", "c"]) == [["a", "b"]]
    # a store no writer of this version has opened has no units table: nothing recorded
    with sqlite3.connect(tmp_path / "results.db") as c:
        c.execute("DROP TABLE units")
    with Store(tmp_path, readonly=True) as st:
        assert st.units(["a"]) == []


# --- sweeps ----------------------------------------------------------------------------------------------------

def pid(model, **kwargs):
    """A grab: the process that trained the job."""
    return os.getpid()


def sweep_config(**kw):
    g = vars(base_args())
    g.update(base(WIDTH=64, MAX_ITER=20, ONLYTHRESHOLDS=True, LOSS_CHECKPOINTS=[1e-12], otherreturns={"pid": pid}),
             DEVICES=[], THREADS=1, LIVE_EVERY=0)
    g.update(kw)
    return g


def test_a_fusable_sweep_keeps_both_workers_of_a_pool_busy():
    from modelscape.backend.executors import PoolExecutor
    lrs = [0.01 * (k + 1) for k in range(7)]
    with PoolExecutor(["cpu", "cpu"], threads_per_worker=1) as pool:
        pool.wait_ready()  # else a worker still starting could leave both groups to the other (tiny jobs)
        res = main([lrs, [0, 1]], ["LR", "trial"], sweep_config(WORKERS_PER_DEVICE=2), BFN, executor=pool,
                   store=False, progress=False)
    assert res.status_counts() == {"not_reached": 14}
    pids = Counter(r["grabs"]["pid"] for r in res.records)
    assert sorted(pids.values()) == [7, 7] and os.getpid() not in pids  # two groups of 7, one in each worker


def test_a_resumed_sweep_trains_each_missing_group_as_recorded_to_the_bit(tmp_path, monkeypatch):
    from modelscape.backend import fused
    from modelscape.backend.executors import InProcessExecutor

    iters, names = [[16, 24], [0.05, 0.1, 0.2], [0, 1]], ["WIDTH", "LR", "trial"]
    cfg = sweep_config(MAX_ITER=40, ONLYTHRESHOLDS=False, EVAL_EVERY=10, LOSS_CHECKPOINTS=[0.3, 0.1],
                       DETERMINISTIC=True, otherreturns={"pid": pid})
    three = InProcessExecutor("cpu", threads=1)
    three.slots = ["cpu"] * 3  # plans as a pool of 3 would: groups of 4
    first = {r["job_id"]: r for r in main(iters, names, cfg, BFN, executor=three, store=str(tmp_path),
                                          progress=False).records}
    with Store(tmp_path) as st:
        recorded = sorted(st.units(list(first)))
    assert [len(u) for u in recorded] == [4, 4, 4]
    widths = sorted(sorted(first[j]["axes"]["WIDTH"] for j in u) for u in recorded)
    assert widths == [[16, 16, 16, 16], [16, 16, 24, 24], [24, 24, 24, 24]]  # near widths together
    # A crash before two groups were stored: their rows are missing.
    lost = recorded[0] + recorded[2]
    with sqlite3.connect(tmp_path / "results.db") as c:
        c.executemany("DELETE FROM jobs WHERE job_id = ?", [(j,) for j in lost])
    groups = []
    train = fused.train_fused
    monkeypatch.setattr(fused, "train_fused", lambda js: groups.append(len(js)) or train(js))
    second = {r["job_id"]: r for r in main(iters, names, cfg, BFN, executor="inprocess", store=str(tmp_path),
                                           progress=False).records}
    assert groups == [4, 4]  # as recorded, though one worker plans the 8 missing jobs as one group
    for job_id in lost:
        a, b = dict(first[job_id]), dict(second[job_id])
        a.pop("wall_time"), b.pop("wall_time")
        assert_same(a, b, f"job {a['axes']}")
    assert np.isfinite([second[j]["train_loss"] for j in lost]).all()
