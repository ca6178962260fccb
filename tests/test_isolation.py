"""Every job runs in a worker process, under the default config too (one slot): a job that segfaults, calls
``os._exit`` or ``sys.exit``, or hangs costs that job alone; the driver's death or a Ctrl-C leaves no worker
behind and no traceback.

The faulty batch function below misbehaves by WIDTH while the file ``armed`` exists in its ``fault_dir``, and
logs every attempt (pid, WIDTH) there, so the tests count how often each job ran and in which process.
Worker start-up (spawn, import torch) is the cost here: the fault sweep starts about ten workers in all.
"""
import ctypes
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from deadlines import scaled  # noqa: E402  (deadlines stretched on a busy machine)

import modelscape
from modelscape.backend.cli import base_args
from modelscape.backend.executors import default_threads, make_executor
from modelscape.backend.executors.base import cpu_cores
from modelscape.backend.job_iterator import main, summary
from modelscape.config import ConfigError, canonicalize, check_job_config
from modelscape.data import powerlaw_bfn

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)

HEALTHY, SEGFAULT, OS_EXIT, SYS_EXIT, HANG, CRASH_ONCE, CLEAN_EXIT = 16, 17, 18, 19, 20, 21, 23


def faulty_bfn(bsz, gen, X, y, WIDTH, fault_dir, N_TEST, dim=8):
    """powerlaw_bfn that, for the training batches of an armed job, crashes its process in one of four ways."""
    if bsz != N_TEST:
        with open(os.path.join(fault_dir, "attempts"), "a") as f:
            f.write(json.dumps({"WIDTH": WIDTH, "pid": os.getpid()}) + "\n")
        once = os.path.join(fault_dir, "crashed_once")
        if os.path.exists(os.path.join(fault_dir, "armed")):
            if WIDTH == SEGFAULT:
                ctypes.string_at(0)
            elif WIDTH == OS_EXIT:
                os._exit(3)
            elif WIDTH == SYS_EXIT:
                sys.exit(2)
            elif WIDTH == CLEAN_EXIT:  # must not pass for a clean end of the worker, nor for a result
                sys.exit()
            elif WIDTH == HANG:
                time.sleep(1e9)
            elif WIDTH == CRASH_ONCE and not os.path.exists(once):
                open(once, "w").close()
                os._exit(5)
    return powerlaw_bfn(bsz, gen, X, y, dim=dim)


def threads_grab(**kw):
    import torch
    return torch.get_num_threads()


def config(**kw):
    g = vars(base_args())  # the defaults: EXECUTOR auto, one worker slot on a CPU machine
    # FUSE=off: these jobs differ only in WIDTH, and would train as one fused group, which a job that kills its
    # worker takes down whole (README); here each job must be a unit of its own
    g.update(PARAMETERIZATION="sp", MAX_ITER=10, N_TEST=32, N_SAMPLES=16, EVAL_EVERY=0, FUSE="off",
             otherreturns={"threads": threads_grab})
    g.update(kw)
    return g


def attempts(fault_dir):
    """{WIDTH: [pid of each attempt]}; empties the log."""
    path = os.path.join(fault_dir, "attempts")
    if not os.path.exists(path):
        return {}
    out = {}
    with open(path) as f:
        for line in f:
            e = json.loads(line)
            out.setdefault(e["WIDTH"], []).append(e["pid"])
    os.remove(path)
    return out


WIDTHS = [HEALTHY, SEGFAULT, OS_EXIT, SYS_EXIT, CLEAN_EXIT, HANG, CRASH_ONCE, 22]


@pytest.fixture(scope="module")
def fault_sweep(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    (d / "armed").touch()
    store = d / "store"
    # long enough for a healthy job's 10 steps on a busy machine, short enough that the hung job costs little
    g = config(WORKERS_PER_DEVICE=1, JOB_TIMEOUT=float(round(scaled(8.0))))
    bfn = dict(base_bfn=faulty_bfn, fault_dir=str(d))
    res = main([WIDTHS], ["WIDTH"], g, bfn, store=str(store), progress=False)
    return d, store, g, bfn, res, attempts(d)


def by_width(res):
    return {r["axes"]["WIDTH"]: r for r in res.records}


def test_default_config_isolates_crashes_and_hangs_among_healthy_jobs(fault_sweep):
    d, store, g, bfn, res, tries = fault_sweep
    assert g["EXECUTOR"] == "auto" and g["WORKERS_PER_DEVICE"] == 1
    r = by_width(res)
    assert sorted(r) == sorted(WIDTHS)
    for w in (HEALTHY, 22):
        assert r[w]["status"] in ("done", "not_reached") and np.isfinite(r[w]["test_loss"])
        assert len(tries[w]) == 1 and os.getpid() not in tries[w]  # ran once, in a worker
        assert 1 <= r[w]["grabs"]["threads"] <= cpu_cores()  # the one worker has the idle cores
    expected = {SEGFAULT: "signal 11 (SIGSEGV)", OS_EXIT: "exit code 3", SYS_EXIT: "exit code 2",
                CLEAN_EXIT: "exit code 0"}
    for w, reason in expected.items():
        assert r[w]["status"] == "crashed", r[w]
        assert r[w]["error"].count(reason) == 2 and "2 times" in r[w]["error"]
        assert np.isnan(r[w]["test_loss"])
        assert len(tries[w]) == 2 and len(set(tries[w])) == 2, "the retry must run on a fresh worker"
    assert r[HANG]["status"] == "timeout" and f"JOB_TIMEOUT={g['JOB_TIMEOUT']:g} s" in r[HANG]["error"]
    assert len(tries[HANG]) == 1  # a timeout is not retried
    # a job that killed its worker once, and then ran on a fresh one: its result, not a crash
    assert r[CRASH_ONCE]["status"] in ("done", "not_reached") and len(set(tries[CRASH_ONCE])) == 2
    # what the store holds is what came back; the summary names each bad job and its reason
    stored = by_width(modelscape.load(store))
    assert {w: x["status"] for w, x in stored.items()} == {w: x["status"] for w, x in r.items()}
    text = summary(res)
    assert "4 crashed" in text and "1 timeout" in text
    assert any(f"crashed {{'WIDTH': {SEGFAULT}}}" in ln and "SIGSEGV" in ln for ln in text.splitlines())
    ds = res.to_xarray()
    assert np.isnan(ds["test_loss"].sel(WIDTH=HANG)) and np.isnan(ds["steps"].sel(WIDTH=SEGFAULT))


def test_resume_skips_crashed_and_timed_out_jobs_unless_retry_failed(fault_sweep):
    d, store, g, bfn, first, _ = fault_sweep
    again = main([WIDTHS], ["WIDTH"], g, bfn, store=str(store), progress=False)
    assert attempts(d) == {}, "resume trained a job again"
    assert {w: x["status"] for w, x in by_width(again).items()} == {w: x["status"] for w, x in by_width(first).items()}
    (d / "armed").unlink()  # the bugs are fixed
    fixed = main([WIDTHS], ["WIDTH"], dict(g, RETRY_FAILED=True), bfn, store=str(store), progress=False)
    assert sorted(attempts(d)) == sorted([SEGFAULT, OS_EXIT, SYS_EXIT, CLEAN_EXIT, HANG])
    assert {x["status"] for x in fixed.records} <= {"done", "not_reached"}


# --- the driver dies or is interrupted -------------------------------------------------------------------

DRIVER = textwrap.dedent('''
    import os, sys, threading, time
    from modelscape.backend.cli import base_args
    from modelscape.backend.job_iterator import main
    from modelscape.data import powerlaw_bfn

    def sleepy_bfn(bsz, gen, X, y, WIDTH, log, N_TEST, dim=8):
        if bsz != N_TEST:
            with open(log, "a") as f:
                f.write(f"{WIDTH} {os.getpid()}\\n")
            time.sleep(float(os.environ["NAP"]))
        return powerlaw_bfn(bsz, gen, X, y, dim=dim)

    log, store, where = sys.argv[1], sys.argv[2], sys.argv[3]
    g = vars(base_args())
    g.update(PARAMETERIZATION="sp", MAX_ITER=5, N_TEST=32, N_SAMPLES=16, EVAL_EVERY=0, WORKERS_PER_DEVICE=1, FUSE="off")  # a job a unit
    sweep = lambda: main([[16, 24, 32, 40, 48, 56]], ["WIDTH"], g, dict(base_bfn=sleepy_bfn, log=log),
                         store=store, progress=True)
    if where == "thread":  # a sweep started from another thread (a GUI, a notebook's background job)
        t = threading.Thread(target=sweep)
        t.start()
        t.join()
    else:
        sweep()
''')


def start_driver(tmp_path, nap, where="main"):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    log = tmp_path / "log"
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", NAP=str(nap))
    proc = subprocess.Popen([sys.executable, str(script), str(log), str(tmp_path / "store"), where],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group, as a terminal's foreground job
    return proc, log


def wait_for_lines(proc, log, n, timeout=120):
    """The log's lines once it has ``n`` (jobs started in the workers)."""
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        lines = log.read_text().split("\n")[:-1] if log.exists() else []
        if len(lines) >= n:
            return lines
        if proc.poll() is not None:
            pytest.fail(f"the driver ended early: {proc.communicate()}")
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"no {n} jobs started within {timeout} s")


def alive(pid):
    """Whether ``pid`` runs (a zombie waiting for a parent to reap it has ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_hung_worker_ends_within_seconds_of_its_driver_being_killed(tmp_path):
    """The sweep runs in a thread of the driver, so the kernel's parent-death signal is not asked for (it
    fires when the spawning thread ends) and the worker's own watchdog thread must end it, while its job
    sleeps for ever. (From the main thread both are in place.)"""
    proc, log = start_driver(tmp_path, nap=1e9, where="thread")
    (line,) = wait_for_lines(proc, log, 1)
    worker = int(line.split()[1])
    assert alive(worker)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + scaled(10)
    while alive(worker) and time.monotonic() < deadline:
        time.sleep(0.2)
    gone = not alive(worker)
    if not gone:
        os.kill(worker, signal.SIGKILL)
    assert gone, "the worker outlived its driver by 10 s"


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs process groups")
def test_ctrl_c_prints_one_line_and_exits_130(tmp_path):
    proc, log = start_driver(tmp_path, nap=0.3)
    wait_for_lines(proc, log, 3)  # two jobs done, the third running
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends on Ctrl-C: the driver and its workers
    out, err = proc.communicate(timeout=scaled(60))
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    (line,) = [ln for ln in err.splitlines() if "interrupted" in ln]
    done = modelscape.load(tmp_path / "store").records
    assert f"interrupted: {len(done)} of 6 jobs done, 1 lost in flight; re-run to resume" in line
    assert 2 <= len(done) < 6  # kept for the re-run (resume is tested in test_resume.py)


def test_jobs_lost_in_flight_count_every_job_of_a_fused_group(monkeypatch):
    """Ctrl-C reports the jobs it loses: a fused group of 3 in flight is 3 jobs, as the bar counted them."""
    from types import SimpleNamespace
    from modelscape.backend.executors import JobSpec, PoolExecutor, RayExecutor, inprocess
    group = JobSpec(0, {}, {}, "ctx", ({}, {}), members=[({"LR": lr}, {}) for lr in (0.1, 0.2, 0.3)])
    single = JobSpec(3, {"LR": 0.4}, {}, "ctx", ({}, {}))

    ex = make_executor("inprocess")
    seen = []
    monkeypatch.setattr(inprocess, "run_unit", lambda *a, **k: seen.append(ex.in_flight()) or {})
    list(ex.as_completed([ex.submit(group), ex.submit(single)]))
    assert seen == [3, 1] and ex.in_flight() == 0

    pool = PoolExecutor.__new__(PoolExecutor)  # its bookkeeping only: no worker is started
    pool._workers = [SimpleNamespace(job=(group, None)), SimpleNamespace(job=None), SimpleNamespace(job=(single, None))]
    assert pool.in_flight() == 4
    ray_ex = RayExecutor.__new__(RayExecutor)
    ray_ex._running = {"ref-a": (group, None), "ref-b": (single, None)}
    assert ray_ex.in_flight() == 4


# --- threads and the new keys ----------------------------------------------------------------------------

def test_thread_defaults_share_the_cores_and_threads_overrides(monkeypatch):
    import torch
    monkeypatch.setattr("modelscape.backend.executors.base.cpu_cores", lambda: 8)
    # a machine without CUDA (on one, an in-process job's threads default to 2: its work is the GPU's)
    monkeypatch.setattr("modelscape.backend.executors.cuda_devices", lambda devices: [])
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))  # an idle machine
    assert default_threads(1) == 8 and default_threads(3) == 2 and default_threads(16) == 1
    assert make_executor("inprocess", threads=0).threads == 8
    assert make_executor("inprocess", threads=3).threads == 3
    monkeypatch.setattr(os, "getloadavg", lambda: (2.7, 0.0, 0.0))  # three cores busy with other work
    assert default_threads(1) == 5 and default_threads(2) == 2 and default_threads(8) == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (30.0, 0.0, 0.0))
    assert default_threads(1) == 1
    # in-process: the job runs with the executor's threads, and the caller's setting comes back afterwards
    before = torch.get_num_threads()
    res = main([[16]], ["WIDTH"], config(THREADS=before + 1), dict(base_bfn=powerlaw_bfn, dim=8),
               executor="inprocess", store=False, progress=False)
    assert res.records[0]["grabs"]["threads"] == before + 1
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("key, value, words", [
    ("THREADS", -1, ["THREADS", "[0, inf)"]),
    ("JOB_TIMEOUT", 0, ["JOB_TIMEOUT", "(0, inf)"]),
    ("JOB_TIMEOUT", -5, ["JOB_TIMEOUT", "(0, inf)"]),
    ("JOB_TIMEOUT", "soon", ["JOB_TIMEOUT", "'soon'"]),
    ("RETRY_FAILED", "maybe", ["RETRY_FAILED", "'maybe'"]),
])
def test_bad_execution_keys_fail_before_anything_runs(key, value, words):
    with pytest.raises(ConfigError) as info:
        main([[16]], ["WIDTH"], config(**{key: value}), dict(base_bfn=powerlaw_bfn), store=False, progress=False)
    for w in words:
        assert w in str(info.value)


def test_execution_keys_defaults_and_coercion():
    cfg = canonicalize({"JOB_TIMEOUT": "30", "THREADS": "2", "RETRY_FAILED": "yes"})
    assert (cfg["JOB_TIMEOUT"], cfg["THREADS"], cfg["RETRY_FAILED"]) == (30.0, 2, True)
    cfg = canonicalize({})
    assert (cfg["JOB_TIMEOUT"], cfg["THREADS"], cfg["RETRY_FAILED"], cfg["EXECUTOR"]) == (None, 0, False, "auto")
    check_job_config(cfg)


def test_inprocess_warns_that_it_cannot_enforce_job_timeout():
    with pytest.warns(UserWarning, match="JOB_TIMEOUT=5.0 is not enforced"):
        make_executor("inprocess", job_timeout=5.0)


def test_a_callers_pool_interrupted_mid_sweep_stays_usable(tmp_path, monkeypatch):
    """Ctrl-C in a notebook while a sweep runs on the user's own pool: the pool drops the interrupted sweep's
    jobs (none of them runs later) and runs the next sweep."""
    import modelscape.backend.job_iterator as job_iterator
    from modelscape.backend.executors import PoolExecutor
    monkeypatch.setattr(job_iterator, "_interactive", lambda: True)
    d = tmp_path
    (d / "armed").touch()
    bfn = dict(base_bfn=faulty_bfn, fault_dir=str(d))
    pool = PoolExecutor(["cpu"], threads_per_worker=1)
    try:
        def interrupt_once_started():
            while not (d / "attempts").exists():
                time.sleep(0.05)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

        threading.Thread(target=interrupt_once_started, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):  # the hanging job is the first
            # JOB_TIMEOUT only so that a lost Ctrl-C fails this test instead of hanging the suite
            main([[HANG, HEALTHY, 22]], ["WIDTH"], config(JOB_TIMEOUT=float(round(scaled(120)))), bfn,
                 executor=pool, store=False, progress=False)
        assert pool.in_flight() == 0
        attempts(d)
        res = main([[24]], ["WIDTH"], config(), bfn, executor=pool, store=False, progress=False)
        assert res.status_counts() == {"not_reached": 1} or res.status_counts() == {"done": 1}
        assert sorted(attempts(d)) == [24], "a job of the interrupted sweep ran later"
    finally:
        pool.shutdown()


def test_a_fused_group_of_n_jobs_gets_n_times_job_timeout():
    """A unit of work holding n fused jobs may run n * JOB_TIMEOUT before its worker is killed (checked on the
    pool's deadline logic with stand-in workers, so no process has to hang for it)."""
    from concurrent.futures import Future
    from types import SimpleNamespace

    from modelscape.backend.executors.base import JobSpec
    from modelscape.backend.executors.pool import PoolExecutor

    def worker(size, ran_for):
        spec = JobSpec(0, {"WIDTH": 8}, {}, "ctx", ({}, {}), size=size)
        killed = []
        w = SimpleNamespace(job=(spec, Future()), started=time.monotonic() - ran_for, device="cpu",
                            proc=SimpleNamespace(kill=lambda: killed.append(True)))
        return w, killed

    pool = PoolExecutor.__new__(PoolExecutor)  # the deadline logic alone: no worker processes
    pool.job_timeout = 1.0
    pool._replace = lambda w: None
    group, group_killed = worker(size=3, ran_for=2.5)  # 2.5 s < 3 jobs x 1 s: still within its time
    single, single_killed = worker(size=1, ran_for=1.5)  # 1.5 s > 1 s
    pool._workers = [group, single]
    finished = []
    pool._enforce_timeout(finished)
    assert group_killed == [] and group.job is not None
    assert single_killed == [True] and single.job is None
    record = finished[0].result()
    assert record["status"] == "timeout" and "JOB_TIMEOUT=1" in record["error"]
    group.started -= 1.0  # now 3.5 s: past 3 x 1 s
    pool._enforce_timeout(finished)
    assert group_killed == [True] and "fused group of 3 jobs" in finished[1].result()["error"]


def test_the_default_pool_fills_the_cores_or_sizes_itself_by_gpu_memory(monkeypatch):
    from modelscape.backend import executors
    from modelscape.config import defaults
    assert defaults()["WORKERS_PER_DEVICE"] == 0
    monkeypatch.setattr(executors, "cpu_cores", lambda: 6)
    monkeypatch.setattr(executors, "cuda_devices", lambda devices: [])  # without CUDA, whatever this machine has
    assert executors.slots([0], 0) == ["cpu"] * 6 and executors.slots([0], 2) == ["cpu"] * 2
    # on CUDA: the least free memory (2 GiB a worker) and the cores shared by the GPUs decide, at most 8
    monkeypatch.setattr(executors, "cuda_devices", lambda devices: list(devices))
    free = {0: 40 * 2 ** 30, 1: 5 * 2 ** 30}
    monkeypatch.setattr(executors.torch.cuda, "mem_get_info", lambda d: (free[d], 80 * 2 ** 30))
    assert executors.slots([0], 0) == ["cuda:0"] * 6  # 6 cores for one GPU
    assert executors.slots([0, 1], 0) == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]  # 5 GiB free: 2 each
    monkeypatch.setattr(executors, "cpu_cores", lambda: 64)
    assert executors.slots([0], 0) == ["cuda:0"] * 8
    assert executors.slots([0], 3) == ["cuda:0"] * 3
