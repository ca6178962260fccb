"""End to end: the results store survives a crash, and a re-run trains only what is missing.

Every test runs real (tiny) sweeps through ``job_iterator.main`` and counts the jobs actually trained: the batch
function below appends one line per job to the file named by $RESUME_TEST_LOG when it is built for training
(built once per job for the training data, once for the test set). The log path, an optional per-job sleep and
an optional injected failure come from environment variables, so that they change nothing in the jobs'
identities. The crash tests run the sweep in a subprocess (``SWEEP_SCRIPT``) that imports this module.
"""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from deadlines import scaled  # noqa: E402  (deadlines stretched on a busy machine)
import xarray as xr

import modelscape
from modelscape.backend.store import Store, StoreError
from modelscape.config import ConfigError

from test_store import as_stored, assert_same

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
LOG_ENV, SLEEP_ENV, FAIL_ENV = "RESUME_TEST_LOG", "RESUME_TEST_SLEEP", "RESUME_TEST_FAIL"


# --- instrumented batch function and grabs -----------------------------------------------------------------

def counting_bfn(bsz, gen=None, X=None, y=None, dim=8, WIDTH=None, LR=None, trial=None, N_TEST=None, **kwargs):
    """powerlaw_bfn that logs each job it is built to train for, may sleep, and may fail on request."""
    from modelscape.data import powerlaw_bfn
    if bsz != N_TEST and X is None:  # the training batch function: built once per job (offline: then again
        # with the training set it drew as X, y; not counted twice)
        job = {"WIDTH": WIDTH, "LR": LR, "trial": trial}
        if os.environ.get(LOG_ENV):
            with open(os.environ[LOG_ENV], "a") as f:
                f.write(json.dumps(job) + "\n")
        if float(os.environ.get(SLEEP_ENV) or 0):
            time.sleep(float(os.environ[SLEEP_ENV]))
        for pattern in json.loads(os.environ.get(FAIL_ENV) or "[]"):
            if all(job[k] == v for k, v in pattern.items()):
                raise RuntimeError(f"injected failure for {job}")
    return powerlaw_bfn(bsz, gen, X, y, dim=dim, **kwargs)


def grab_norms(model, X_te, **kwargs):
    """A small array: the mean |weight| of the first two parameter tensors."""
    return np.array([p.detach().abs().mean().item() for p in list(model.parameters())[:2]])


def grab_out_mean(model, X_te, **kwargs):
    """A scalar."""
    return float(model(X_te).detach().mean())


BFN = dict(base_bfn=counting_bfn, dim=8)
BASE = dict(PARAMETERIZATION="sp", N_TEST=64, N_SAMPLES=32, MAX_ITER=120, LR=0.1, LOSS_CHECKPOINTS=[0.5, 0.05],
            EVAL_EVERY=25, DETERMINISTIC=True)


def crash_sweep():
    """The 12-job sweep the subprocess runs: curves and grabs along them, so records are large-ish."""
    # THREADS=1: by default a job's threads follow the idle cores, and two runs compared bit for bit must not
    # differ in how their sums are split across threads because the machine was busier during one of them.
    # FUSE_MAX=6: widths 16 and 32 share a width bucket, and a group of 12 would store the whole sweep at once; in
    # groups of 6 (near widths together: one width each) the kill lands between them.
    cfg = dict(BASE, MAX_ITER=200, ONLYTHRESHOLDS=False, EVAL_EVERY=50, THREADS=1, FUSE_MAX=6,
               otherreturns={"norms": grab_norms, "out_mean": grab_out_mean})
    return [[16, 32], [0.05, 0.1, 0.2], [0, 1]], ["WIDTH", "LR", "trial"], cfg, BFN


SWEEP_SCRIPT = """
import sys
import torch
torch.set_num_threads(1)
from modelscape.backend.job_iterator import main
from test_resume import crash_sweep
iters, names, cfg, bfn = crash_sweep()
res = main(iters, names, cfg, bfn, executor="inprocess", store=sys.argv[1], progress=False)
print("finished", len(res.records), flush=True)
"""


# --- helpers ---------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def torch_state():
    # Tiny jobs with torch's default intra-op threads crawl on a loaded 2-core machine (x50 measured); and
    # DETERMINISTIC jobs switch torch's deterministic mode on, which the tests that follow should not inherit.
    import torch
    n, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    torch.use_deterministic_algorithms(det, warn_only=warn_only)


@pytest.fixture
def log(tmp_path, monkeypatch):
    path = tmp_path / "trained.log"
    monkeypatch.setenv(LOG_ENV, str(path))
    monkeypatch.delenv(SLEEP_ENV, raising=False)
    monkeypatch.delenv(FAIL_ENV, raising=False)
    return path


def take(log_path):
    """The jobs trained since the last call, as sorted (WIDTH, LR, trial) tuples; empties the log."""
    if not os.path.exists(log_path):
        return []
    with open(log_path) as f:
        jobs = [json.loads(line) for line in f if line.strip()]
    os.remove(log_path)
    return sorted((j["WIDTH"], j["LR"], j["trial"]) for j in jobs)


def sweep(iters, names, cfg, store, **kw):
    from modelscape.backend.job_iterator import main
    return main(iters, names, cfg, BFN, executor="inprocess", store=store, progress=False, **kw)


def sub_env(log_path, sleep=0.0):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, TESTS]), OMP_NUM_THREADS="1")
    env[LOG_ENV] = str(log_path)
    env[SLEEP_ENV] = str(sleep)
    env.pop(FAIL_ENV, None)
    return env


def start_sweep(script, store, log_path, sleep=0.0):
    return subprocess.Popen([sys.executable, str(script), str(store)], env=sub_env(log_path, sleep), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(p, timeout=120):
    out, err = p.communicate(timeout=scaled(timeout))
    assert p.returncode == 0, f"sweep subprocess failed ({p.returncode}):\n{out}\n{err}"
    assert "finished 12" in out, out + err
    return out


def n_stored(path) -> int:
    """Jobs stored so far, or -1 while there is no store to read yet."""
    try:
        with Store(path, readonly=True) as st:
            return sum(st.status_counts().values())
    except StoreError:
        return -1


def without_wall_time(ds):
    return ds.drop_vars("wall_time")


def by_id(records):
    return {r["job_id"]: r for r in records}


def assert_same_but_wall_time(a, b, where):
    a, b = dict(a), dict(b)
    a.pop("wall_time"), b.pop("wall_time")
    assert_same(a, b, where)


def all_jobs(iters):
    import itertools
    return sorted(itertools.product(*iters))


def status_of(ds):
    return {str(s) for s in np.unique(ds.status.values)}


# --- 1. SIGKILL part-way, then resume --------------------------------------------------------------------

def test_sigkill_mid_sweep_leaves_a_readable_store_and_resume_trains_only_the_missing_jobs(tmp_path):
    script = tmp_path / "sweep.py"
    script.write_text(SWEEP_SCRIPT)
    killed, full = tmp_path / "killed", tmp_path / "full"
    iters = crash_sweep()[0]
    everything = all_jobs(iters)

    # The uninterrupted reference run goes alongside the one we kill (2 cores, 1 thread each).
    ref = start_sweep(script, full, tmp_path / "full.log")
    victim = start_sweep(script, killed, tmp_path / "killed.log", sleep=0.4)
    try:
        deadline = time.time() + scaled(90)
        while n_stored(killed) < 3:
            assert victim.poll() is None, "the sweep ended before it could be killed:\n" + victim.stderr.read()
            assert time.time() < deadline, "the sweep stored fewer than 3 jobs in 90 s"
            time.sleep(0.02)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(30)
        finish(ref)
    finally:
        for p in (victim, ref):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert victim.returncode == -signal.SIGKILL
    assert take(tmp_path / "full.log") == everything

    # The killed store: readable, intact, holding complete records of the jobs finished before the kill.
    db = killed / "results.db"
    with sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    partial = modelscape.load(killed)
    n_done = len(partial.records)
    assert 3 <= n_done < 12, f"the kill did not land mid-sweep: {n_done} jobs stored"
    assert partial.axis_names == ["WIDTH", "LR", "trial"] and partial.axis_values == iters
    reference = modelscape.load(full)
    ref_records = by_id(reference.records)
    for r in partial.records:
        assert r["status"] in ("done", "not_reached"), r.get("error")
        # complete: the same record (curves, grabs, config) as the uninterrupted run's, except its wall time
        assert_same_but_wall_time(ref_records[r["job_id"]], r, f"job {r['axes']}")
    ds = partial.to_xarray()
    assert int((ds.status == "missing").sum()) == 12 - n_done
    assert "grab_norms" in ds and "train_curve" in ds
    trained_before_kill = take(tmp_path / "killed.log")
    stored = sorted((r["axes"]["WIDTH"], r["axes"]["LR"], r["axes"]["trial"]) for r in partial.records)
    # lost: at most the unit of work in flight, a fused group of 6 (LR x trial, one width), whose records are
    # stored in one transaction: the store holds whole groups, so the resumed run trains the groups the
    # uninterrupted one did, and gets its numbers to the bit
    assert set(stored) <= set(trained_before_kill) and len(trained_before_kill) <= n_done + 6
    assert set(stored) == {job for job in everything if job[0] in {w for w, _, _ in stored}}

    # Re-running the same sweep trains only the missing jobs...
    finish(start_sweep(script, killed, tmp_path / "resumed.log"))
    assert take(tmp_path / "resumed.log") == sorted(set(everything) - set(stored))
    with Store(killed, readonly=True) as st:
        sweeps = st.sweeps()
        assert len(st.records()) == 12
    assert len(sweeps) == 1 and sweeps[0]["runs"] == 2  # the same sweep, run twice
    # ...the jobs stored before the kill are kept as they were...
    resumed = modelscape.load(killed)
    resumed_records = by_id(resumed.records)
    for r in partial.records:
        assert_same(r, resumed_records[r["job_id"]], f"job {r['axes']}")
    # ...and the results equal the uninterrupted run's.
    assert set(resumed_records) == set(ref_records)
    assert status_of(resumed.to_xarray()) <= {"done", "not_reached"}
    xr.testing.assert_identical(without_wall_time(resumed.to_xarray()), without_wall_time(reference.to_xarray()))


# --- 2. a new axis value -------------------------------------------------------------------------------

def test_adding_an_axis_value_trains_only_the_new_jobs(tmp_path, log):
    cfg = dict(BASE)
    first = sweep([[16, 32], [0, 1]], ["WIDTH", "trial"], cfg, tmp_path)
    assert take(log) == [(16, 0.1, 0), (16, 0.1, 1), (32, 0.1, 0), (32, 0.1, 1)]

    second = sweep([[16, 24, 32], [0, 1]], ["WIDTH", "trial"], cfg, tmp_path)
    assert take(log) == [(24, 0.1, 0), (24, 0.1, 1)]
    assert len(second.records) == 6
    ds = second.to_xarray()
    assert list(ds.WIDTH.values) == [16, 24, 32] and list(ds.trial.values) == [0, 1]
    assert "missing" not in status_of(ds) and "failed" not in status_of(ds)
    # the old jobs come back exactly as the first run returned them (wall time included: they were not re-run)
    xr.testing.assert_identical(ds.sel(WIDTH=[16, 32]), first.to_xarray())
    np.testing.assert_array_equal(second["timekeys"].get(WIDTH=16).filled(np.nan),
                                  first["timekeys"].get(WIDTH=16).filled(np.nan))
    # and the store agrees: the latest sweep is the new one, with every job
    xr.testing.assert_identical(modelscape.load(tmp_path).to_xarray(), ds)
    with Store(tmp_path, readonly=True) as st:
        assert len(st.records()) == 6 and [s["n_jobs"] for s in st.sweeps()] == [4, 6]

    # a third run of the same sweep trains nothing
    third = sweep([[16, 24, 32], [0, 1]], ["WIDTH", "trial"], cfg, tmp_path)
    assert take(log) == []
    xr.testing.assert_identical(third.to_xarray(), ds)


# --- 3. a global hyperparameter changes ---------------------------------------------------------------

def test_changing_lr_retrains_everything_and_keeps_the_old_results(tmp_path, log):
    iters, names = [[16, 32], [0, 1]], ["WIDTH", "trial"]
    old = sweep(iters, names, dict(BASE, LR=0.05), tmp_path)
    assert take(log) == [(16, 0.05, 0), (16, 0.05, 1), (32, 0.05, 0), (32, 0.05, 1)]
    with Store(tmp_path, readonly=True) as st:
        old_sweep = st.latest_sweep()

    new = sweep(iters, names, dict(BASE, LR=0.2), tmp_path)
    assert take(log) == [(16, 0.2, 0), (16, 0.2, 1), (32, 0.2, 0), (32, 0.2, 1)]
    assert not np.array_equal(new.to_xarray().train_loss.values, old.to_xarray().train_loss.values)
    with Store(tmp_path, readonly=True) as st:
        records = st.records()
        assert len(records) == 8  # the old results stay, under their own identity
        assert sorted(r["config"]["LR"] for r in records) == [0.05] * 4 + [0.2] * 4
        assert len(st.sweeps()) == 2
    xr.testing.assert_identical(modelscape.load(tmp_path, sweep=old_sweep).to_xarray(), old.to_xarray())
    xr.testing.assert_identical(modelscape.load(tmp_path).to_xarray(), new.to_xarray())

    # going back to the old LR finds the old jobs
    again = sweep(iters, names, dict(BASE, LR=0.05), tmp_path)
    assert take(log) == []
    xr.testing.assert_identical(again.to_xarray(), old.to_xarray())


# DEVICES is ignored without CUDA, so the CPU runs this; with CUDA it must name GPUs that exist
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                    reason="DEVICES=[0, 1] needs 2 GPUs when jobs run on CUDA (MODELSCAPE_TEST_DEVICE=cpu runs it)")
def test_moving_a_sweep_to_other_devices_and_workers_trains_nothing(tmp_path, log):
    iters, names = [[16, 32], [0, 1]], ["WIDTH", "trial"]
    old = sweep(iters, names, dict(BASE, LR=0.05), tmp_path)
    assert len(take(log)) == 4
    # DEVICES, WORKERS_PER_DEVICE and EXPT_NAME say where and how a sweep runs, not what it computes
    again = sweep(iters, names, dict(BASE, LR=0.05, DEVICES=[0, 1], WORKERS_PER_DEVICE=2, EXPT_NAME="moved"),
                  tmp_path)
    assert take(log) == []
    xr.testing.assert_identical(again.to_xarray(), old.to_xarray())


# --- 4. failed jobs and forced re-runs ----------------------------------------------------------------

def test_failed_jobs_rerun_by_default_and_resume_false_reruns_everything(tmp_path, log, monkeypatch):
    iters, names = [[16, 32], [0, 1]], ["WIDTH", "trial"]
    everything = [(16, 0.1, 0), (16, 0.1, 1), (32, 0.1, 0), (32, 0.1, 1)]
    monkeypatch.setenv(FAIL_ENV, json.dumps([{"WIDTH": 32}]))
    first = sweep(iters, names, dict(BASE), tmp_path)
    assert take(log) == everything
    assert first.status_counts().get("failed") == 2
    assert all("injected failure" in r["error"] for r in first.failed())
    with Store(tmp_path, readonly=True) as st:
        assert st.status_counts()["failed"] == 2

    monkeypatch.delenv(FAIL_ENV)
    second = sweep(iters, names, dict(BASE), tmp_path)
    assert take(log) == [(32, 0.1, 0), (32, 0.1, 1)]  # only the failed jobs
    assert "failed" not in second.status_counts() and len(second.records) == 4
    with Store(tmp_path, readonly=True) as st:
        assert "failed" not in st.status_counts() and len(st.records()) == 4  # replaced, not added
    xr.testing.assert_identical(second.to_xarray().sel(WIDTH=[16]), first.to_xarray().sel(WIDTH=[16]))

    sweep(iters, names, dict(BASE), tmp_path)
    assert take(log) == []
    sweep(iters, names, dict(BASE), tmp_path, resume=False)
    assert take(log) == everything
    sweep(iters, names, dict(BASE, RESUME=False), tmp_path)
    assert take(log) == everything
    sweep(iters, names, dict(BASE, RESUME=False), tmp_path, resume=True)  # the argument wins
    assert take(log) == []
    with Store(tmp_path, readonly=True) as st:
        assert len(st.records()) == 4  # a forced re-run replaces the jobs' rows (same identity)
    # RESUME is not part of a job's identity
    final = sweep(iters, names, dict(BASE), tmp_path)
    assert take(log) == []
    xr.testing.assert_identical(without_wall_time(final.to_xarray()), without_wall_time(second.to_xarray()))


# --- 5. what the iterator returns is what load gives back -----------------------------------------------

@pytest.mark.parametrize("onlythresholds", [False, True], ids=["curves", "final"])
def test_iterator_results_equal_loaded_results(tmp_path, log, monkeypatch, onlythresholds):
    monkeypatch.setenv(FAIL_ENV, json.dumps([{"WIDTH": 32, "LR": 0.2}]))  # a failed job comes back too
    cfg = dict(BASE, ONLYTHRESHOLDS=onlythresholds, otherreturns={"norms": grab_norms, "out_mean": grab_out_mean})
    res = sweep([[16, 32], [0.05, 0.2]], ["WIDTH", "LR"], cfg, tmp_path)
    assert len(take(log)) == 4
    assert res.status_counts().get("failed") == 1
    back = modelscape.load(tmp_path)
    ds, ds_back = res.to_xarray(), back.to_xarray()
    assert {"grab_norms", "grab_out_mean", "timekeys"} <= set(ds.data_vars)
    if not onlythresholds:
        assert {"train_curve", "test_curve"} <= set(ds.data_vars) and "eval_step" in ds.grab_norms.dims
    xr.testing.assert_identical(ds_back, ds)  # wall time included
    assert back.axis_names == res.axis_names and back.axis_values == res.axis_values
    assert len(back.records) == len(res.records) == 4
    for a, b in zip(res.records, back.records):
        assert_same(as_stored(a), b, f"job {a['axes']}")
    for key in ("losses", "train_losses", "timekeys"):
        np.testing.assert_array_equal(back[key].get(WIDTH=16).filled(np.nan), res[key].get(WIDTH=16).filled(np.nan))
    for name in ("norms", "out_mean"):
        np.testing.assert_array_equal(back["extras"][name].get(LR=0.05).filled(np.nan),
                                      res["extras"][name].get(LR=0.05).filled(np.nan))
    xr.testing.assert_identical(back.get("test_loss", WIDTH=32), res.get("test_loss", WIDTH=32))

    # a resumed run returns stored and fresh records together; still what load gives back
    monkeypatch.delenv(FAIL_ENV)
    res2 = sweep([[16, 32], [0.05, 0.2]], ["WIDTH", "LR"], cfg, tmp_path)
    assert take(log) == [(32, 0.2, None)]
    xr.testing.assert_identical(modelscape.load(tmp_path).to_xarray(), res2.to_xarray())


# --- 6. loading while another process writes -----------------------------------------------------------

def test_load_while_a_sweep_is_writing_returns_the_jobs_finished_so_far(tmp_path):
    script = tmp_path / "sweep.py"
    script.write_text(SWEEP_SCRIPT)
    path = tmp_path / "expt"
    iters = crash_sweep()[0]
    snapshots, thread_counts, errors = [], [], []
    stop = threading.Event()

    def thread_reader():  # a second reader, holding one read-only connection open throughout
        try:
            while n_stored(path) < 0 and not stop.is_set():
                time.sleep(0.01)
            with Store(path, readonly=True) as st:
                while not stop.is_set():
                    try:
                        thread_counts.append(len(st.results().records))
                    except StoreError as e:
                        if "no recorded sweep" not in str(e):
                            raise
                    time.sleep(0.03)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    p = start_sweep(script, path, tmp_path / "log", sleep=0.15)
    t = threading.Thread(target=thread_reader)
    t.start()
    try:
        deadline = time.time() + scaled(90)
        while p.poll() is None and time.time() < deadline:
            try:
                snapshots.append(modelscape.load(path, running=False))  # finished jobs only (test_live: running)
            except StoreError:
                # only before the sweep is recorded: no file yet, or no sweep in it yet
                assert not snapshots, "load failed after it had worked once"
            time.sleep(0.05)
        finish(p)
    finally:
        stop.set()
        t.join(30)
        if p.poll() is None:
            p.kill()
            p.wait()
    assert not errors, errors
    final = modelscape.load(path)
    assert len(final.records) == 12
    final_records = by_id(final.records)
    counts = [len(s.records) for s in snapshots]
    assert counts == sorted(counts), counts
    assert any(0 < c < 12 for c in counts), f"no load happened mid-sweep: {counts}"
    assert thread_counts == sorted(thread_counts) and any(0 < c < 12 for c in thread_counts), thread_counts
    for s in snapshots:
        assert s.axis_names == final.axis_names and s.axis_values == iters
        for r in s.records:  # complete, final records: exactly what is stored at the end
            assert_same(r, final_records[r["job_id"]], f"job {r['axes']}")
        ds = s.to_xarray()
        assert int((ds.status == "missing").sum()) == 12 - len(s.records)


# --- 7. a typo fails before anything happens ----------------------------------------------------------

@pytest.mark.parametrize("where", ["config", "axis"])
def test_a_typo_fails_before_the_store_exists_or_anything_trains(tmp_path, log, where):
    cfg = dict(BASE, RESULTS_DIR=str(tmp_path / "results"), EXPT_NAME="expt")
    if where == "config":
        iters, names, cfg = [[0, 1]], ["trial"], dict(cfg, WIDHT=16)
    else:
        iters, names = [[16, 32]], ["WIDHT"]
    for store in (None, tmp_path / "explicit"):
        with pytest.raises(ConfigError, match="WIDHT") as e:
            sweep(iters, names, cfg, store)
        assert "WIDTH" in str(e.value)
    assert not (tmp_path / "results").exists() and not (tmp_path / "explicit").exists()
    assert take(log) == []
