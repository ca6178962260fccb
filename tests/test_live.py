import math
"""Live progress: running jobs report to their driver, which draws a bar by steps and flushes their partial
records to the store, where ``load``, ``show`` and ``watch`` (other processes) see them."""
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from deadlines import scaled  # noqa: E402  (deadlines stretched on a busy machine)
import torch

import modelscape
from modelscape import cli
from modelscape.backend import board as live_board, live
from modelscape.backend.job_iterator import main
from modelscape.backend.store import Driver, Store

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

# A sweep slow enough (a sleep per step) that a job is reliably caught mid-run, reporting often.
SWEEP_SCRIPT = """
import sys, time
import torch
torch.set_num_threads(1)
from modelscape.backend.job_iterator import main

def slow_bfn(bsz, gen, X=None, y=None, dim=4):
    def batch(step):
        time.sleep(0.01)
        X = torch.randn(bsz, dim, generator=gen, device=gen.device)
        return X, X[:, :1] * 0.5
    return batch

def first_weight(model, **kw):
    return float(next(model.parameters()).detach().flatten()[0])

if __name__ == "__main__":
    cfg = dict(WIDTH=8, DEPTH=2, N_SAMPLES=8, N_TEST=8, MAX_ITER=int(sys.argv[3]), LOSS_CHECKPOINTS=[1e-9],
               ONLYTHRESHOLDS=False, EVAL_EVERY=10, LIVE_EVERY=0.05, WORKERS_PER_DEVICE=1, THREADS=1,
               EXECUTOR=sys.argv[2], FUSE="off", otherreturns={"w0": first_weight})
    main([[0.1, 0.05]], ["LR"], cfg, dict(base_bfn=slow_bfn), store=sys.argv[1], progress=False)
"""


def start_sweep(tmp_path, executor, max_iter):
    script = tmp_path / "sweep.py"
    script.write_text(SWEEP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "expt"), executor, str(max_iter)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_running(proc, store, timeout=60.0):
    """Poll ``load`` until a running job has reported steps and a partial curve; return that record."""
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        if (store / "results.db").exists():
            try:
                res = modelscape.load(store)
            except Exception:  # the sweep is still recording itself
                res = None
            for r in (res.records if res is not None else []):
                if r["status"] == "running" and r["steps"] > 0 and len(r.get("train_curve", [])) > 1:
                    return r
        time.sleep(0.05)
    raise AssertionError("no running job appeared in the store")


@pytest.mark.parametrize("executor", ["pool", pytest.param("ray", marks=[pytest.mark.slow, pytest.mark.ray])])
def test_a_running_jobs_partial_curves_are_visible_to_load_from_another_process(tmp_path, executor):
    store = tmp_path / "expt"
    proc = start_sweep(tmp_path, executor, 150)
    try:
        partial = wait_for_running(proc, store)
    finally:
        _, err = proc.communicate(timeout=scaled(120))
    assert proc.returncode == 0, err
    assert 0 < partial["steps"] <= partial["max_iter"] == 150
    final = next(r for r in modelscape.load(store).records if r["job_id"] == partial["job_id"])
    assert final["status"] == "not_reached" and final["steps"] == 150
    n = len(partial["train_curve"])
    assert 0 < n <= partial["steps"]
    # the partial curves are exactly the beginning of the final ones: same losses, same EMA recurrence
    np.testing.assert_array_equal(partial["train_raw"], final["train_raw"][:n])
    np.testing.assert_array_equal(partial["train_curve"], final["train_curve"][:n])
    k = len(partial["eval_steps"])
    assert k >= 1
    np.testing.assert_array_equal(partial["eval_steps"], final["eval_steps"][:k])
    np.testing.assert_array_equal(partial["test_curve"], final["test_curve"][:k])
    np.testing.assert_array_equal(partial["grabs"]["w0"], final["grabs"]["w0"][:k])
    assert partial["train_loss"] == pytest.approx(final["train_curve"][partial["steps"] - 1])
    # once finished, nothing is left running and the final record is what loads
    assert {r["status"] for r in modelscape.load(store).records} == {"not_reached"}


def test_a_driver_killed_mid_sweep_leaves_no_job_running(tmp_path, capsys):
    store = tmp_path / "expt"
    proc = start_sweep(tmp_path, "inprocess", 2000)
    try:
        partial = wait_for_running(proc, store)
    finally:
        proc.kill()
        proc.communicate(timeout=scaled(60))
    res = modelscape.load(store)
    assert [r["status"] for r in res.records] == []  # nothing finished, and the dead driver's job is no result
    assert cli.main(["show", str(store)]) == 0
    rows = [ln.split() for ln in capsys.readouterr().out.splitlines()[1:3]]
    statuses = {float(r[0]): r[1] for r in rows}
    lr = partial["axes"]["LR"]
    assert statuses[lr] == "interrupted" and set(statuses.values()) == {"interrupted", "queued"}
    steps = next(r for r in rows if float(r[0]) == lr)[-2]  # steps column: done/MAX_ITER at the last flush
    assert steps.endswith("/2000") and int(steps.split("/")[0]) >= partial["steps"]


# --- show and watch on a hand-made store -------------------------------------------------------------------

def running_record(job_id, lr, steps, max_iter=100):
    return {"job_id": job_id, "status": "running", "axes": {"LR": lr}, "steps": steps, "max_iter": max_iter,
            "wall_time": 65.0, "train_loss": 0.25, "test_loss": 0.5, "train_curve": np.linspace(1, 0.25, steps),
            "train_raw": np.linspace(1, 0.25, steps),
            "eval_steps": np.array([0, 10]), "test_curve": np.array([1.0, 0.5]), "grabs": {}}


@pytest.fixture
def half_run(tmp_path):
    """A sweep over LR of 5 jobs: a done, b running (held by a live driver of this process, reported 40 of
    100 steps), c queued, d left behind by a dead driver at 70 steps, e claimed by the live driver but not
    started (a driver claims a few jobs ahead of its free workers)."""
    driver = Driver.start()
    with Store(tmp_path / "expt") as st:
        st.begin_sweep(["LR"], [[0.1, 0.2, 0.3, 0.4, 0.5]], ["a", "b", "c", "d", "e"])
        st.write({"job_id": "a", "status": "done", "axes": {"LR": 0.1}, "steps": 100, "train_loss": 0.1})
        st.claim("b", driver)
        st.claim("e", driver)
        st.write_live([(running_record("b", 0.2, 40), time.time()), (running_record("d", 0.4, 70), time.time())])
    yield tmp_path / "expt", driver
    driver.stop()


def test_show_tells_running_from_queued_and_interrupted(half_run, capsys):
    store, _ = half_run
    assert cli.main(["show", str(store)]) == 0
    rows = [ln.split() for ln in capsys.readouterr().out.splitlines()[1:6]]
    assert [(r[0], r[1]) for r in rows] == [("0.1", "done"), ("0.2", "running"), ("0.3", "queued"),
                                            ("0.4", "interrupted"), ("0.5", "queued")]
    assert rows[1][-2] == "40/100" and rows[3][-2] == "70/100"
    assert cli.main(["show", str(store), "--status", "queued"]) == 0
    assert [ln.split()[0] for ln in capsys.readouterr().out.splitlines()[1:]] == ["0.3", "0.5"]


def test_ls_counts_every_job_show_lists(half_run, capsys):
    """ls agrees with show: a sweep's jobs not stored yet count as running, interrupted or queued, not as none."""
    store, _ = half_run
    assert cli.main(["ls", str(store)]) == 0
    header, row = [ln.split() for ln in capsys.readouterr().out.splitlines()]
    assert header == ["experiment", "jobs", "done", "running", "interrupted", "queued", "sweeps"]
    assert row == ["expt", "5", "1", "1", "1", "2", "1"]  # e: claimed ahead of a free worker, not started


def test_load_gives_running_jobs_with_their_partial_records_and_never_a_dead_drivers(half_run):
    store, driver = half_run
    res = modelscape.load(store)
    by_lr = {r["axes"]["LR"]: r for r in res.records}
    assert set(by_lr) == {0.1, 0.2}  # d's driver is gone: not running, and not a result
    run = by_lr[0.2]
    assert run["status"] == "running" and run["steps"] == 40 and run["max_iter"] == 100
    np.testing.assert_array_equal(run["train_curve"], np.linspace(1, 0.25, 40))
    assert res.to_xarray()["status"].sel(LR=0.2).item() == "running"
    assert [r["status"] for r in modelscape.load(store, running=False).records] == ["done"]
    with Store(store) as st:  # the final record lands: it wins, and the live row is gone
        st.write({"job_id": "b", "status": "not_reached", "axes": {"LR": 0.2}, "steps": 100})
    assert {r["axes"]["LR"]: r["status"] for r in modelscape.load(store).records} == {0.1: "done",
                                                                                     0.2: "not_reached"}
    with Store(store, readonly=True) as st:
        assert [r["job_id"] for r in st.live_records()] == ["d"]


def test_watch_prints_the_running_jobs_and_exits_when_none_is_left(half_run, capsys):
    store, driver = half_run
    stopper = threading.Timer(1.5, driver.stop)  # the driver "dies": b no longer runs
    stopper.start()
    t0 = time.monotonic()
    assert cli.main(["watch", str(store), "--every", "0.1"]) == 0
    stopper.join()
    assert time.monotonic() - t0 < scaled(10)
    frames = capsys.readouterr().out.split("\n\n\n")
    first = frames[0].splitlines()
    assert "5 jobs | 1 running, 3 queued, 1 done, 0 failed" in first[0]
    assert first[2].split() == ["LR", "steps", "%", "train", "(ema)", "test", "elapsed"]
    assert first[3].split() == ["0.2", "40/100", "40%", "0.25", "0.5", "01:05"]
    assert "0 running, 4 queued, 1 done" in frames[-1]  # it looked a few times, then gave up


def test_watch_shows_as_many_running_jobs_as_fit(half_run):
    from modelscape.backend.store import StoreUnion
    store, driver = half_run
    with Store(store) as st:
        st.claim("c", driver)
        st.write_live([(running_record("c", 0.3, 10), time.time())])
    with StoreUnion(store) as st:
        text, counts = cli.watch_view(st, max_rows=1)
    assert counts["running"] == 2
    assert text.splitlines()[3].split()[:2] == ["0.2", "40/100"] and text.splitlines()[-1] == "... and 1 more running"


def test_watch_and_show_count_a_job_that_ended_as_finished_before_its_record_lands(half_run, capsys):
    from modelscape.backend.store import StoreUnion
    store, driver = half_run
    with Store(store) as st:  # b, a fused member, ended at 60 steps; its group's records are not back yet
        st.write_live([({**running_record("b", 0.2, 60), "ended": "done"}, time.time())])
    with StoreUnion(store) as st:
        text, counts = cli.watch_view(st)
    assert counts == {"running": 0, "queued": 3, "done": 2, "failed": 0}
    assert "0.2" not in text.split("\n", 1)[-1]  # not among the running rows
    assert cli.main(["show", str(store)]) == 0
    rows = [ln.split() for ln in capsys.readouterr().out.splitlines()[1:6]]
    assert rows[1][:2] == ["0.2", "done"]


def test_watch_stops_on_ctrl_c_with_status_0(half_run, monkeypatch, capsys):
    store, _ = half_run

    def interrupt(_):
        raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", interrupt)
    assert cli.main(["watch", str(store)]) == 0
    assert "1 running" in capsys.readouterr().out


# --- the driver's counting ---------------------------------------------------------------------------------

def test_steps_done_counts_finished_jobs_whole_and_running_jobs_as_reported():
    max_iter = {0: 100, 1: 200, 2: 50, 3: 1000}
    assert live_board.steps_done(max_iter, {}, set()) == 0
    assert live_board.steps_done(max_iter, {1: 30, 3: 400}, {0}) == 100 + 30 + 400
    # job 1 stops early at its thresholds after 60 steps: its remaining 140 steps count once it finishes
    assert live_board.steps_done(max_iter, {1: 60, 3: 400}, {0, 1}) == 100 + 200 + 400
    assert live_board.steps_done(max_iter, {2: 80}, set()) == 50  # never more than its MAX_ITER
    assert live_board.state_counts(6, 2, ["done", "failed", "not_reached", "timeout"]) == {
        "running": 2, "queued": 0, "done": 2, "failed": 2}


def test_the_board_moves_its_bar_by_steps_and_counts_states():
    jobs = [({"LR": lr}, {}, {"MAX_ITER": m}) for lr, m in ((0.1, 100), (0.2, 300), (0.3, 600))]
    ids = ["a", "b", "c"]
    board = live_board.LiveBoard(jobs, ids, [1, 2], bar=True)  # a was stored before: its 100 steps are done
    try:
        assert (board.bar.total, board.bar.n) == (1000, 100)
        board.receive({"key": "b", "steps": 50, "wall_time": 1.0, "train_loss": 0.5})
        board.receive({"key": "c", "steps": 20, "wall_time": 1.0, "train_loss": 0.5})
        board.receive({"key": "zzz", "steps": 20, "wall_time": 1.0, "train_loss": 0.5})  # not ours: ignored
        assert board.counts() == {"running": 2, "queued": 0, "done": 1, "failed": 0}
        board.finished_job(1, {"status": "done"})  # b stopped early at 50 steps: all its 300 count
        assert board.bar.n == 100 + 300 + 20
        assert board.counts() == {"running": 1, "queued": 0, "done": 2, "failed": 0}
        board.receive({"key": "b", "steps": 60, "wall_time": 1.0, "train_loss": 0.5})  # late: ignored
        board.finished_job(2, {"status": "failed"})
        assert board.bar.n == 1000 and board.counts() == {"running": 0, "queued": 0, "done": 2, "failed": 1}
        assert "0 running, 0 queued, 2 done, 1 failed" in str(board.bar)
    finally:
        board.close()


def test_the_finished_bar_is_drawn_once(capsys):
    """A log file keeps every redraw: the bar at 100% is drawn by close() alone, not also by the last job's end
    or by close() catching up first."""
    jobs = [({"LR": lr}, {}, {"MAX_ITER": 100}) for lr in (0.1, 0.2)]
    board = live_board.LiveBoard(jobs, ["a", "b"], [0, 1], bar=True)
    board.bar.mininterval = 0.0  # every count redraws, as on a sweep whose last draw was long ago
    board.receive({"key": "a", "steps": 100, "wall_time": 1.0, "train_loss": 0.5})
    board.finished_job(0, {"status": "done", "steps": 100})
    board._next_draw = 0.0
    board.finished_job(1, {"status": "done", "steps": 100})
    board._next_draw = 0.0
    board.close()
    draws = capsys.readouterr().err.split("\r")
    assert sum("100%" in d for d in draws) == 1, draws
    last = [d for d in draws if "100%" in d][0]
    assert "200/200 steps" in last and "0 running, 0 queued, 2 done, 0 failed" in last, last


def test_the_rate_and_eta_count_trained_steps_not_the_steps_credited_to_an_early_stop():
    assert math.isnan(live_board.step_rate([(0.0, 0)]))
    assert live_board.step_rate([(0.0, 0), (10.0, 500), (20.0, 1500)]) == 75.0
    # a window of 10 s: the rate of the last 10 s only
    assert live_board.step_rate([(0.0, 0), (10.0, 500), (20.0, 1500)], window=10.0) == 100.0
    assert live_board.eta_seconds(1000, 400, 100.0) == 6.0
    assert live_board.eta_seconds(1000, 1000, math.nan) == 0.0
    assert math.isnan(live_board.eta_seconds(1000, 10, math.nan))

    jobs = [({"LR": lr}, {}, {"MAX_ITER": 1000}) for lr in (0.1, 0.2)]
    board = live_board.LiveBoard(jobs, ["a", "b"], [0, 1], bar=True)
    try:
        board.receive({"key": "a", "steps": 40, "wall_time": 1.0, "train_loss": 0.5})
        board.receive({"key": "b", "steps": 60, "wall_time": 1.0, "train_loss": 0.5})
        assert board.trained() == 100
        board.finished_job(0, {"status": "done", "steps": 50})  # a stopped at 50 steps: 950 credited to the bar
        assert board.bar.n == 1000 + 60 and board.trained() == 50 + 60
        board.history[:] = [(0.0, 0), (10.0, board.trained())]
        assert board.rate() == 11.0  # 110 trained steps in 10 s, not the 1060 steps the bar moved
        assert "<01:25, 11.0/s" in str(board.bar)  # 940 steps left at 11 steps/s: 85.5 s
    finally:
        board.close()


def test_a_job_that_ended_counts_as_finished_before_its_record_arrives():
    jobs = [({"LR": lr}, {}, {"MAX_ITER": 100}) for lr in (0.1, 0.2)]
    board = live_board.LiveBoard(jobs, ["a", "b"], [0, 1], bar=True)
    try:
        board.receive({"key": "a", "steps": 30, "wall_time": 1.0, "train_loss": 0.5})
        board.receive({"key": "b", "steps": 30, "wall_time": 1.0, "train_loss": 0.5})
        board.receive({"key": "a", "steps": 40, "wall_time": 2.0, "train_loss": 0.1, "ended": "done"})
        assert board.counts() == {"running": 1, "queued": 0, "done": 1, "failed": 0}
        assert board.position() == 100 + 30
        assert board.running[0].record("a", {"LR": 0.1})["ended"] == "done"
        board.finished_job(0, {"status": "done", "steps": 40})  # the record, later: counted once
        assert board.counts() == {"running": 1, "queued": 0, "done": 1, "failed": 0}
        assert board.position() == 130 and board.trained() == 70
    finally:
        board.close()


def test_the_board_counts_the_stored_jobs_by_their_status():
    jobs = [({"LR": lr}, {}, {"MAX_ITER": 10}) for lr in (0.1, 0.2, 0.3)]
    board = live_board.LiveBoard(jobs, ["a", "b", "c"], [2], stored=["timeout", "not_reached"])
    assert board.counts() == {"running": 0, "queued": 1, "done": 1, "failed": 1}


# --- in the worker ------------------------------------------------------------------------------------------

def quick_bfn(bsz, gen, X=None, y=None, dim=4):
    print("batch function ready")

    def batch(step):
        X = torch.randn(bsz, dim, generator=gen, device=gen.device)
        return X, X[:, :1]
    return batch


def test_worker_output_is_prefixed_with_the_jobs_axes(tmp_path, capfd):
    cfg = dict(WIDTH=8, DEPTH=2, N_SAMPLES=8, N_TEST=8, MAX_ITER=3, VERBOSE=True, WORKERS_PER_DEVICE=1,
               THREADS=1, FUSE="off")
    main([[8, 16], [0]], ["WIDTH", "trial"], cfg, dict(base_bfn=quick_bfn), store=False, progress=False)
    out = capfd.readouterr().out.splitlines()
    for width in (8, 16):
        mine = [ln for ln in out if ln.startswith(f"[WIDTH={width} trial=0] ")]
        assert [ln.split("] ", 1)[1].split(":")[0] for ln in mine if "step" in ln] == ["step 0", "step 1",
                                                                                     "step 2"]
        assert sum("batch function ready" in ln for ln in mine) >= 1
    assert all(ln.startswith("[WIDTH=") for ln in out if ln.strip())


def test_fused_members_report_live_each_under_its_own_key(one_torch_thread):
    from modelscape.backend.fused import run_group
    cfg = dict(WIDTH=8, DEPTH=2, N_SAMPLES=8, N_TEST=8, MAX_ITER=40, LOSS_CHECKPOINTS=[1e-9],
               ONLYTHRESHOLDS=False, EVAL_EVERY=10, LIVE_EVERY=1e-9)
    # job1 stops at its MAX_ITER of 20 while job0 trains on: it says so at once, not with the group's records
    members = [(dict(cfg, LR=lr, JOB_ID=f"job{k}", MAX_ITER=n), {"LR": lr})
               for k, (lr, n) in enumerate(((0.1, 40), (0.05, 20)))]
    messages = []
    with live.reporting(messages.append):
        records = run_group(members, dict(base_bfn=quick_bfn))
    assert {m["key"] for m in messages} == {"job0", "job1"}
    ended = [k for k, m in enumerate(messages) if "ended" in m]
    assert [messages[k]["key"] for k in ended] == ["job1", "job0"]
    assert next(m["steps"] for m in messages[ended[0]:] if m["key"] == "job0") == 21  # job0 went on after
    for k, (record, n) in enumerate(zip(records, (40, 20))):
        mine = [m for m in messages if m["key"] == f"job{k}"]
        assert [m["steps"] for m in mine] == list(range(1, n + 1)) + [n]  # due at every sync here, then ended
        assert mine[-1]["ended"] == record["status"] == "not_reached"
        partial = live_board._Partial(n, 0.0)
        for m in mine:
            partial.add(m)
        got = partial.record(f"job{k}", {"LR": 0})
        np.testing.assert_array_equal(got["train_curve"], record["train_curve"])
        np.testing.assert_array_equal(got["test_curve"], record["test_curve"][:len(got["test_curve"])])


def test_no_observer_without_a_listener_or_with_live_every_0():
    from modelscape.backend.job import prepare_job
    cfg = dict(WIDTH=8, DEPTH=2, N_SAMPLES=8, N_TEST=8, MAX_ITER=5)
    assert prepare_job(cfg, dict(base_bfn=quick_bfn)).observers == []
    with live.reporting(print):
        assert prepare_job(dict(cfg, LIVE_EVERY=0), dict(base_bfn=quick_bfn)).observers == []
        kinds = [type(o) for o in prepare_job(cfg, dict(base_bfn=quick_bfn)).observers]
        assert kinds == [live.LiveObserver]


# --- the bar in a log ----------------------------------------------------------------------------------------

LOGGED_SCRIPT = """
import torch
from modelscape.backend.job_iterator import main
from modelscape.data import powerlaw_bfn

def nudge(model, opt, step):
    pass

cfg = dict(WIDTH=8, DEPTH=2, N_SAMPLES=8, N_TEST=8, MAX_ITER=5, EXECUTOR="inprocess", THREADS=1,
           step_hooks={0: nudge})
main([[0.1, 0.05]], ["LR"], cfg, dict(base_bfn=powerlaw_bfn, dim=4), store=False)
"""


def test_a_redirected_log_has_the_fused_note_on_its_own_line_and_the_bar_once(tmp_path):
    """stderr to a file, as `python sweep.py 2> log`: the note on jobs that cannot fuse is written before the
    bar is drawn, so it does not land on the bar's line, and the bar (its redraws joined by carriage returns)
    is one line of the log."""
    script = tmp_path / "logged.py"
    script.write_text(LOGGED_SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")
    # bytes: text mode would turn the bar's carriage returns into line ends
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, timeout=scaled(120))
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    lines = err.split("\n")
    notes = [ln for ln in lines if "fused trials" in ln]
    assert notes == ["fused trials: 2 job(s) run one by one: step_hooks act on the model between steps"]
    bars = [ln for ln in lines if "steps [" in ln]
    assert len(bars) == 1 and "10/10 steps" in bars[0].split("\r")[-1]
    assert lines.index(notes[0]) < lines.index(bars[0])

