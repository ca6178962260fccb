"""Several drivers on one store: each job is claimed by one driver, trained once, and taken over if its driver dies.

The sweeps use test_resume's ``counting_bfn``, which appends one line per job it trains to $RESUME_TEST_LOG, so the
tests count trainings across processes.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import pytest

from deadlines import scaled  # deadlines stretched on a busy machine
from modelscape.backend.store import Driver, Store

from test_resume import BASE, n_stored, sub_env, sweep

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

SWEEP = [[8, 12, 16, 20, 24], [0.05, 0.1], [0, 1, 2, 3]]  # WIDTH x LR x trial: 40 jobs
# FUSE_MAX=6: the widths of a sweep share width buckets; in groups of at most 6 a driver stores its jobs a few at a
# time, so that one killed part-way leaves some stored and some claimed
SMALL = dict(BASE, MAX_ITER=5, N_TEST=16, N_SAMPLES=8, DETERMINISTIC=False, FUSE_MAX=6)  # no seconds-long torch import
DRIVER_SCRIPT = """
import json, sys
import torch
torch.set_num_threads(1)
from modelscape.backend.job_iterator import main
from test_resume import BFN
from test_claims import SMALL
cfg = dict(SMALL, CLAIM_TIMEOUT=float(sys.argv[3]))
res = main(json.loads(sys.argv[2]), ["WIDTH", "LR", "trial"], cfg, BFN, executor="inprocess", store=sys.argv[1],
           progress=False)
print("finished", len(res.records), flush=True)
"""


def start_driver(tmp_path, store, log, sleep, iters=SWEEP, claim_timeout=30.0):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER_SCRIPT)
    return subprocess.Popen([sys.executable, str(script), str(store), json.dumps(iters), str(claim_timeout)],
                            env=sub_env(log, sleep), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def trainings(log):
    with open(log) as f:
        return Counter(tuple(json.loads(line).values()) for line in f if line.strip())


def test_two_drivers_started_together_train_each_job_once(tmp_path):
    store, log = tmp_path / "expt", tmp_path / "trained.log"
    drivers = [start_driver(tmp_path, store, log, sleep=0.05) for _ in range(2)]
    outs = []
    for p in drivers:
        out, err = p.communicate(timeout=scaled(240))
        assert p.returncode == 0, err
        outs.append(out)
    counts = trainings(log)
    assert len(counts) == 40 and set(counts.values()) == {1}, counts.most_common(3)
    # both drivers took part, and each returns the whole sweep (the other's jobs read from the store)
    for out in outs:
        assert "finished 40" in out, out
    with Store(store) as st:
        assert sum(st.status_counts().values()) == 40
        assert st.live_claims() == [] and st.heartbeat(Driver.start()) == 0  # every claim released


def test_a_dead_drivers_claims_are_taken_over_at_once_on_the_same_host(tmp_path, monkeypatch):
    store, log = tmp_path / "expt", tmp_path / "trained.log"
    iters = [[8, 16], [0.05, 0.1], [0, 1, 2]]  # 12 jobs
    p = start_driver(tmp_path, store, log, sleep=0.3, iters=iters)
    deadline = time.time() + scaled(120)
    while n_stored(store) < 3:
        assert time.time() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)
    p.wait()
    with Store(store) as st:
        stale = st.live_claims(stale_after=1e9)  # the dead driver's claims as the store holds them
        assert stale == []  # ... which are dead: its pid is gone
        held = st._conn.execute("SELECT pid FROM claims").fetchall()
        assert held and {pid for (pid,) in held} == {p.pid}
        stored_before = sum(st.status_counts().values())
    first = trainings(log)
    os.remove(log)
    monkeypatch.setenv("RESUME_TEST_LOG", str(log))
    monkeypatch.setenv("RESUME_TEST_SLEEP", "0")
    t0 = time.perf_counter()
    res = sweep(iters, ["WIDTH", "LR", "trial"], dict(SMALL, CLAIM_TIMEOUT=600.0), store)
    assert time.perf_counter() - t0 < 300  # did not wait for the 600 s heartbeat timeout
    second = trainings(log)
    assert len(res.records) == 12 and set(second.values()) == {1}
    assert len(second) == 12 - stored_before  # the killed driver's stored jobs are not trained again
    assert set(first) | set(second) == {(w, lr, t) for w in iters[0] for lr in iters[1] for t in iters[2]}


@pytest.mark.serial  # a thread must beat within the timeout: run when no other test competes for the cores
def test_the_heartbeat_thread_keeps_a_drivers_claims_alive_and_close_releases_them(tmp_path):
    from modelscape.backend.sweep import _Claims
    stale = scaled(1.2)  # 1.2 s on a quiet machine; the thread beats 6 times per timeout
    with Store(tmp_path / "s.db") as st:
        claims = _Claims(st, stale_after=stale)
        try:
            assert claims.claim("job", since=None) == "claimed"
            time.sleep(2 * stale + 0.1)  # twice the timeout: alive only if the thread refreshed the claim meanwhile
            (live,) = st.live_claims(stale_after=stale)
            assert live["job_id"] == "job" and time.time() - live["heartbeat"] < stale
            assert live["heartbeat"] > live["claimed"] + stale
        finally:
            claims.close()
        assert st.live_claims(stale_after=1e9) == [] and not claims._thread.is_alive()


def _fake_claim(st, job_id, host, pid, heartbeat):
    st._conn.execute("INSERT INTO claims VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (job_id, f"{host}:{pid}:x", host, pid, heartbeat, heartbeat, heartbeat))


def test_claim_outcomes(tmp_path):
    me = Driver.start()
    try:
        with Store(tmp_path / "s.db") as st:
            now = time.time()
            assert st.claim("free", me) == ("claimed", None)
            assert st.claim("free", me)[0] == "claimed"  # claiming again is harmless
            _fake_claim(st, "remote-live", "some-other-host", 1, now)
            outcome, owner = st.claim("remote-live", me)
            assert outcome == "busy" and owner["host"] == "some-other-host"
            _fake_claim(st, "remote-silent", "some-other-host", 1, now - 100)
            assert st.claim("remote-silent", me, stale_after=30)[0] == "taken_over"
            time.sleep(0.01)  # the claims above may take less than the timeout below on a fast machine
            assert st.claim("remote-live", me, stale_after=1e-3)[0] == "taken_over"  # configurable timeout
            dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True).stdout.strip()
            _fake_claim(st, "local-dead", socket.gethostname(), int(dead), now)
            assert st.claim("local-dead", me)[0] == "taken_over"  # same host, pid gone: no need to wait
            other = Driver.start()  # another live driver of this very process
            assert st.claim("mine", other)[0] == "claimed"
            assert st.claim("mine", me)[0] == "busy"
            other.stop()  # it ended without releasing (a crash): its claims are dead at once
            assert st.claim("mine", me)[0] == "taken_over"
            assert {c["job_id"] for c in st.live_claims()} == {"free", "remote-silent", "remote-live",
                                                               "local-dead", "mine"}
            before = {c["job_id"]: c["heartbeat"] for c in st.live_claims()}
            time.sleep(0.01)
            assert st.heartbeat(me) == 5
            assert all(c["heartbeat"] > before[c["job_id"]] for c in st.live_claims())
            st.write({"job_id": "free", "status": "done"})
            assert st.claim("free", me, since=now)[0] == "stored"  # written after the driver started
            assert st.claim("free", me, since=time.time() + 1)[0] == "claimed"  # an older record: run again
            st.release(me, ["free"])
            assert "free" not in {c["job_id"] for c in st.live_claims()}
            st.release(me)
            assert st.live_claims() == []
    finally:
        me.stop()


def test_a_schema_1_store_is_read_and_migrated_on_write(tmp_path):
    import sqlite3
    db = tmp_path / "old.db"
    with Store(db) as st:
        st.write({"job_id": "a", "status": "done", "train_loss": 0.5})
    with sqlite3.connect(db) as c:  # make it what modelscape 0.1 wrote: no claims table, user_version 1
        c.execute("DROP TABLE claims")
        c.execute("PRAGMA user_version = 1")
    with Store(db, readonly=True) as st:
        assert [r["job_id"] for r in st.records()] == ["a"] and st.live_claims() == []
    with Store(db) as st:
        me = Driver.start()
        assert st.claim("b", me)[0] == "claimed"
        me.stop()
    with sqlite3.connect(db) as c:
        assert c.execute("PRAGMA user_version").fetchone()[0] == 2


def test_show_marks_the_jobs_a_live_driver_holds_as_running(tmp_path, capsys):
    from modelscape import cli
    other = Driver.start()
    try:
        with Store(tmp_path / "expt") as st:
            st.begin_sweep(["WIDTH"], [[8, 16, 32]], ["a", "b", "c"])
            st.write({"job_id": "a", "status": "done", "axes": {"WIDTH": 8}})
            st.claim("b", other)
        assert cli.main(["show", str(tmp_path / "expt")]) == 0
        rows = [ln.split()[:2] for ln in capsys.readouterr().out.splitlines()[1:]]
        assert rows == [["8", "done"], ["16", "running"], ["32", "queued"]]
        other.stop()  # its process "died": the claim is dead, the job queued again
        assert cli.main(["show", str(tmp_path / "expt")]) == 0
        assert capsys.readouterr().out.splitlines()[2].split()[:2] == ["16", "queued"]
    finally:
        other.stop()
