"""EXECUTOR=ray on a local Ray (127.0.0.1, 2 CPUs, no dashboard, no usage reporting): the same numbers as
in-process, a raising job and a crashed worker recorded as failed, resume. Ray starts in seconds, so one
module fixture serves every test here."""
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_sweep import config, notebook, read_log  # noqa: E402

from modelscape.backend.executors import JobSpec, make_executor  # noqa: E402
from modelscape.backend.job_iterator import main  # noqa: E402
from modelscape.backend.store import Store  # noqa: E402

import ray  # the ray extra, pinned in requirements-test.txt: a missing install fails here, not skips

pytestmark = [pytest.mark.slow, pytest.mark.ray]  # a cluster backend: one xdist worker runs every Ray test

# More than 2x apart: each width is a width bucket of its own, so the two trials of a width are one fused group, and
# the group whose worker dies (CRASH) takes no other width with it.
WIDTHS = [16, 40, 100, 250]
RAISE, CRASH = 40, 100


@pytest.fixture(scope="module")
def ray_executor():
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    ex = make_executor("ray", workers_per_device=1)
    assert len(ex.slots) == 2  # one task per CPU Ray was given
    yield ex
    ex.shutdown()
    ray.shutdown()


def sweep(executor, tmp_path, widths=WIDTHS, store=None):
    ns = notebook()
    g = config(otherreturns={"nb": ns["nb_grab"]}, logfile=str(tmp_path / "log"), raise_width=RAISE)
    return main([widths, [0, 1]], ["WIDTH", "trial"], g, dict(base_bfn=ns["nb_bfn"], dim=8, crash_width=CRASH),
                executor=executor, store=store if store is not None else tmp_path / "store", progress=False)


def test_ray_matches_inprocess_and_records_failures(ray_executor, tmp_path):
    res = sweep(ray_executor, tmp_path)
    by = {(r["axes"]["WIDTH"], r["axes"]["trial"]): r for r in res.records}
    assert len(by) == 8
    torch.set_num_threads(1)
    ref = sweep("inprocess", tmp_path, widths=[16, 250], store=False)  # WIDTH CRASH would kill this process
    for r in ref.records:
        got = by[(r["axes"]["WIDTH"], r["axes"]["trial"])]
        assert got["status"] == r["status"] != "failed"
        assert (got["train_loss"], got["test_loss"], got["steps"]) == (r["train_loss"], r["test_loss"], r["steps"])
        assert list(got["timekeys"]) == list(r["timekeys"])
        np.testing.assert_array_equal(got["grabs"]["nb"], r["grabs"]["nb"])
    for t in (0, 1):
        assert by[(RAISE, t)]["status"] == "failed" and f"grab refuses WIDTH={RAISE}" in by[(RAISE, t)]["error"]
        assert by[(CRASH, t)]["status"] == "failed" and "Ray worker process died" in by[(CRASH, t)]["error"]


def test_ray_resume_runs_only_what_is_not_done(ray_executor, tmp_path):
    sweep(ray_executor, tmp_path)
    with Store(tmp_path / "store", readonly=True) as st:
        before = st.statuses()
    first = [e for e in read_log(tmp_path / "log") if e["kind"] == "batch0"]
    res = sweep(ray_executor, tmp_path)
    assert len(res.records) == 8
    again = [e for e in read_log(tmp_path / "log") if e["kind"] == "batch0"][len(first):]
    assert not [e for e in again if e["WIDTH"] in (16, 250)]  # done jobs are not trained again
    with Store(tmp_path / "store", readonly=True) as st:
        after = st.statuses()
    for job_id, (status, created) in after.items():
        assert (created > before[job_id][1]) == (status == "failed")  # only failed jobs ran again


def test_ray_task_that_raises_outside_the_job_is_a_failed_record(ray_executor):
    ns = {}
    exec("class Poison:\n    def __reduce__(self):\n        return (explode, ())\n"
         "def explode():\n    raise RuntimeError('this context cannot be unpickled')\n", ns)
    spec = JobSpec(0, {"WIDTH": 8}, {"WIDTH": 8}, "poisoned", ({}, {"data": ns["Poison"]()}))
    fut = ray_executor.submit(spec)
    assert list(ray_executor.as_completed([fut])) == [fut]
    record = fut.result()
    assert record["status"] == "failed" and record["axes"] == {"WIDTH": 8}
    assert "the Ray task failed" in record["error"] and "this context cannot be unpickled" in record["error"]


def test_ray_tasks_output_and_progress_reach_the_driver_labelled(ray_executor, capfd):
    ns = {}  # by value to the Ray workers, as a notebook's functions go
    exec("import torch\n"
         "def talking_bfn(bsz, gen, X=None, y=None, dim=4):\n"
         "    print('batch function ready')\n"
         "    return lambda step: (lambda X: (X, X[:, :1]))(\n"
         "        torch.randn(bsz, dim, generator=gen, device=gen.device))\n", ns)
    seen = []
    from modelscape.backend import board as live_board, live
    real = live_board.LiveBoard.receive

    def receive(board, msg):
        seen.append((msg, board.index.get(msg["key"]) in board.finished))
        real(board, msg)
    cfg = config(MAX_ITER=3, VERBOSE=True, FUSE="off", LIVE_EVERY=1e-9, EVAL_EVERY=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(live_board.LiveBoard, "receive", receive)
        res = main([[8, 16], [0]], ["WIDTH", "trial"], cfg, dict(base_bfn=ns["talking_bfn"]),
                   executor=ray_executor, store=False, progress=False)
    assert {r["status"] for r in res.records} == {"not_reached"}
    out = capfd.readouterr().out.splitlines()
    for width in (8, 16):  # Ray's own log forwarding is off here: these lines came through the relay
        mine = [ln for ln in out if ln.startswith(f"[WIDTH={width} trial=0] ")]
        assert [ln.split("] ", 1)[1].split(":")[0] for ln in mine if "step" in ln] == ["step 0", "step 1", "step 2"]
        assert sum("batch function ready" in ln for ln in mine) >= 1
        # progress at every sync, then the end, under the job's key, all before its record
        mine = [(m["steps"], late) for m, late in seen if m["key"] == live.job_key(None, {"WIDTH": width, "trial": 0})]
        assert mine == [(1, False), (2, False), (3, False), (3, False)]


def test_a_lost_relay_stops_live_progress_but_no_job(ray_executor, tmp_path):
    from modelscape.backend.executors.ray_executor import _Relay
    ns = notebook()
    g = config(MAX_ITER=5, LIVE_EVERY=1e-9, logfile=str(tmp_path / "log"))
    spec = JobSpec(0, {"WIDTH": 16}, {"WIDTH": 16}, "lost-relay", (g, dict(base_bfn=ns["nb_bfn"], dim=8)))
    dead = ray.remote(num_cpus=0)(_Relay).remote()
    ray.kill(dead)
    heard = []
    ray_executor._relay, ray_executor.on_live = dead, heard.append
    try:
        fut = ray_executor.submit(spec)
        with pytest.warns(UserWarning, match="live progress stopped, its relay actor is gone"):
            assert list(ray_executor.as_completed([fut])) == [fut]
        assert fut.result()["status"] == "not_reached" and heard == []
        assert ray_executor._relay is None and ray_executor.on_live is None
    finally:
        ray_executor._relay, ray_executor.on_live = None, None
