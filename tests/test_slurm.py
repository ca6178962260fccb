"""EXECUTOR=slurm through submitit's local executor (no Slurm here): 2 shards, each an array task writing its
own shard file; a shard killed part-way loses only its running job; a re-run trains only the missing jobs;
the store directory reads as one (load, ls, show)."""
import os
import signal
import sys
import textwrap
import time

import pytest
from deadlines import scaled  # noqa: E402  (deadlines stretched on a busy machine)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_sweep import config, read_log  # noqa: E402

from modelscape import cli  # noqa: E402
from modelscape.backend import slurm  # noqa: E402
from modelscape.backend.job_iterator import main  # noqa: E402
from modelscape.backend.store import Store, StoreUnion, load  # noqa: E402
from modelscape.config import ConfigError  # noqa: E402

import submitit  # noqa: F401  (the slurm extra, pinned in requirements-test.txt: a missing install fails, not skips)

pytestmark = pytest.mark.slow  # a cluster backend (a stand-in Slurm on this machine)

# Defined by exec, as in a notebook: the array tasks (fresh processes) receive it by value.
CELL = textwrap.dedent(r'''
    import json, os, time
    import torch

    def bfn(bsz, gen, X, y, WIDTH, logfile, hold, trial=0, dim=4):
        """Linear teacher; logs each job it starts; the job (WIDTH, trial) == hold waits for the file
        logfile + '.go' (at most 30 s)."""
        with open(logfile, "a") as f:
            f.write(json.dumps(dict(WIDTH=WIDTH, trial=trial, pid=os.getpid())) + "\n")
        if [WIDTH, trial] == hold:
            for _ in range(300):
                if os.path.exists(logfile + ".go"):
                    break
                time.sleep(0.1)
        w = torch.linspace(-1.0, 1.0, dim, device=gen.device)

        def batch_fn(step):
            Xb = torch.randn(bsz, dim, generator=gen, device=gen.device)
            return Xb, (Xb @ w).unsqueeze(1)
        return batch_fn
''')

WIDTHS, TRIALS = [8, 16, 24], [0, 1]


@pytest.fixture(autouse=True)
def local_cluster(monkeypatch):
    monkeypatch.setattr(slurm, "CLUSTER", "local")


def sweep(tmp_path, **kw):
    ns = {}
    exec(compile(CELL, "<cell>", "exec"), ns)
    g = config(EXECUTOR="slurm", SLURM_SHARDS=2, RESULTS_DIR=str(tmp_path), EXPT_NAME="expt", MAX_ITER=50,
               logfile=str(tmp_path / "log"), hold=[24, 0], **kw)
    return main([WIDTHS, TRIALS], ["WIDTH", "trial"], g, dict(base_bfn=ns["bfn"]), progress=False)


def wait_for(pred, what, timeout=120):
    deadline = time.monotonic() + scaled(timeout)
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def live_claims(db):
    with Store(db, readonly=True) as st:
        return st.live_claims()


def done_count(d):
    with StoreUnion(d) as u:
        return u.status_counts().get("done", 0) + u.status_counts().get("not_reached", 0)


def test_shards_killed_part_way_and_rerun_trains_only_the_missing(tmp_path, capsys):
    d = tmp_path / "expt"
    res = sweep(tmp_path, DETACH=True)  # returns at once: nothing is stored yet
    assert res.records == []
    # The two trials of a width are one fused group, and a group stays whole in one shard: shard 0 holds the
    # groups of widths 8 and 24, shard 1 that of 16. Job (24, 0) waits, and its group with it: four get stored.
    wait_for(lambda: done_count(d) == 4, "four stored jobs")
    shards = sorted(d.glob("shard-*.db"))
    assert len(shards) == 2
    with Store(shards[0], readonly=True) as st:
        claims = st.live_claims()
    assert len(claims) == 2 and len({c["pid"] for c in claims}) == 1  # the group's two jobs, by one task
    started = read_log(tmp_path / "log")  # (24, 1) is not in it yet: it is prepared after (24, 0)
    pids = {(e["WIDTH"], e["trial"]): e["pid"] for e in started}
    assert pids[(8, 0)] == pids[(8, 1)] and pids[(16, 0)] == pids[(16, 1)]  # a group is trained in one process
    assert cli.main(["ls", str(tmp_path)]) == 0  # progress: six jobs, four stored, two running in an array task
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[-2:] == ["running", "sweeps"] and out[1].split()[1] == "6" and out[1].split()[-2] == "2"
    os.kill(claims[0]["pid"], signal.SIGKILL)  # the array task dies (preempted, out of time) mid-job
    (tmp_path / "log.go").touch()
    wait_for(lambda: not live_claims(shards[0]), "the dead task's claim to lapse", 30)
    # The scheduler learns of the death a moment later (here submitit's local controller, polling its task; on a
    # cluster, sacct), and the re-run below asks it which tasks still run: until then it rightly leaves the
    # dead task's jobs to it. On a busy machine that moment is long enough to matter, so wait for it.
    with Store(d / "results.db", readonly=True) as st:
        tasks = {c["driver"].split(":", 1)[1] for c in st.claims() if c["host"] == slurm.SCHEDULER_HOST}
    assert tasks
    wait_for(lambda: not any(slurm._task_live(submitit, d / "slurm" / "%j", t, time.time()) for t in tasks),
             "the scheduler to see the array tasks end", 30)

    assert cli.main(["ls", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    # one experiment of six jobs: four stored in its three files, and the dead task's two not finished
    header, row = out[0].split(), out[1].split()
    assert row[:2] == ["expt", "6"]
    assert sum(int(row[header.index(s)]) for s in ("interrupted", "queued") if s in header) == 2
    assert cli.main(["show", str(d), "--status", "pending"]) == 0
    table = capsys.readouterr().out.split("\n\n")[0].splitlines()  # the footer follows a blank line
    # not finished: queued, or interrupted if the killed task had flushed its progress
    assert [ln.split()[:2] for ln in table[1:]] == [["24", "0"], ["24", "1"]]
    assert {ln.split()[2] for ln in table[1:]} <= {"queued", "interrupted"}

    res = sweep(tmp_path)  # the same command again: waits for the array this time
    # the killed task's worker, orphaned, may log (24, 1) before its watchdog ends it: the rerun's lines are
    # those of processes new since the kill
    old_pids = {e["pid"] for e in started}
    rerun = [e for e in read_log(tmp_path / "log")[len(started):] if e["pid"] not in old_pids]
    assert {(e["WIDTH"], e["trial"]) for e in rerun} == {(24, 0), (24, 1)}  # only the missing group
    assert len({e["pid"] for e in rerun}) == 1  # trained as one group, in one process
    assert "as 1 array tasks (a fused group is one unit of work" in capsys.readouterr().err  # not the 2 asked for
    assert len(res.records) == 6 and res.status_counts().get("failed", 0) == 0
    assert len(list(d.glob("shard-*.db"))) == 3  # one new shard, for the missing group
    assert load(d).to_xarray()["train_loss"].shape == (3, 2)


def test_sbatch_parameters_map_keys_to_options():
    cfg = config(SLURM_PARTITION="gpu", SLURM_TIME=90, SLURM_GPUS_PER_NODE=4, SLURM_CPUS_PER_TASK=16,
                 SLURM_MEM="64G", SLURM_ACCOUNT="lab", SLURM_QOS="high", SLURM_ARRAY_PARALLELISM=3,
                 SLURM_EXTRA=["--constraint=a100", "#SBATCH --exclusive"], EXPT_NAME="e")
    assert slurm.sbatch_parameters(cfg) == dict(
        timeout_min=90, gpus_per_node=4, cpus_per_task=16, slurm_array_parallelism=3, slurm_partition="gpu",
        slurm_mem="64G", slurm_account="lab", slurm_qos="high", name="modelscape-e",
        slurm_additional_parameters={"constraint": "a100", "exclusive": True})
    with pytest.raises(ConfigError, match="SLURM_EXTRA line 'constraint=a100'"):
        slurm.sbatch_parameters(cfg | {"SLURM_EXTRA": ["constraint=a100"]})
    # fused groups stay whole; shards get about as many jobs each, single jobs dealt round
    assert slurm.split([[0], [1], [2], [3], [4]], 2) == [[[0], [2], [4]], [[1], [3]]]
    assert slurm.split([[7]], 8) == [[[7]]]
    assert slurm.split([[0, 1, 2, 3], [4], [5, 6], [7]], 3) == [[[0, 1, 2, 3]], [[5, 6]], [[4], [7]]]


def test_rerun_while_the_array_is_live_submits_nothing_twice(tmp_path, capsys):
    d = tmp_path / "expt"
    sweep(tmp_path, DETACH=True)  # job (24, 0) waits for log.go, so the array is live while we re-run
    sweep(tmp_path, DETACH=True)  # the same command at once: its jobs are queued or running in that array
    assert "nothing to submit" in capsys.readouterr().err
    with Store(d / "results.db", readonly=True) as st:
        assert len(st.claims()) == 6 and st.live_claims() == []  # held by array tasks, judged by the scheduler
    (tmp_path / "log.go").touch()
    wait_for(lambda: done_count(d) == 6, "six stored jobs")
    pids = [int(p.name.split("_")[0]) for p in (d / "slurm").glob("*/*_submitted.pkl")]  # local job id = pid
    assert len(pids) == 2  # one array of two tasks
    wait_for(lambda: not any(map(slurm._pid_running, pids)), "the array tasks to exit", 60)
    res = sweep(tmp_path)  # after completion: nothing is submitted, every job comes from the store
    assert "nothing to submit" in capsys.readouterr().err
    assert len(res.records) == 6
    # The batch function is built more than once per run of a job, always in the process running it: a job
    # submitted twice would show up in two processes.
    runs = {(e["WIDTH"], e["trial"], e["pid"]) for e in read_log(tmp_path / "log")}
    assert sorted((w, t) for w, t, _ in runs) == sorted((w, t) for w in WIDTHS for t in TRIALS)
    assert len(list(d.glob("shard-*.db"))) == 2  # one array, two shards
    with Store(d / "results.db", readonly=True) as st:
        assert st.claims() == []  # the ended tasks' claims are released
