"""Faults around the store: edited code, bad and string grabs, a damaged row, a read-only store, concurrent
creation, out-of-range values and misspelt names, provenance."""
import importlib.util
import json
import multiprocessing as mp
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from deadlines import scaled  # noqa: E402  (deadlines stretched on a busy machine)

from modelscape import cli
from modelscape.backend.job_iterator import SweepFailed, main
from modelscape.backend.store import Store, load
from modelscape.config import SCHEMA, ConfigError

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
TINY = dict(PARAMETERIZATION="sp", N_TEST=16, N_SAMPLES=8, MAX_ITER=20, LOSS_CHECKPOINTS=[1e-9],
            DETERMINISTIC=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def run(cfg, bfn, store, iters=([8, 16],), names=("WIDTH",), **kw):
    return main(list(iters), list(names), dict(TINY, **cfg), bfn, executor="inprocess", store=store,
                progress=False, **kw)


# --- identity follows code ----------------------------------------------------------------------------------

BFN_V1 = '''
import os
from modelscape.data import powerlaw_bfn

def bfn(bsz, gen=None, X=None, y=None, N_TEST=None, WIDTH=None, **kw):
    """A batch function that notes each job it trains."""
    if bsz != N_TEST and X is None:
        with open(os.environ["FAULTS_LOG"], "a") as f:
            f.write(f"{WIDTH}\\n")
    return powerlaw_bfn(bsz, gen, X, y, dim=4)
'''
BFN_V2 = BFN_V1.replace("dim=4", "dim=4, noise=0.1")  # an edited body
BFN_V2_COMMENTED = BFN_V2.replace('    """A batch function that notes each job it trains."""',
                                  '    """Reworded docstring."""\n    # a new comment')


def trained(log):
    if not log.exists():
        return []
    out = sorted(int(x) for x in log.read_text().split())
    log.unlink()
    return out


def load_module(path):
    spec = importlib.util.spec_from_file_location("faults_user_bfn", path)  # the same module name every time
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("route", ["base_bfn", "bfn_file"])
def test_an_edited_batch_function_body_trains_anew(tmp_path, monkeypatch, route):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    log, path, store = tmp_path / "log", tmp_path / "user_bfn.py", tmp_path / "expt"
    monkeypatch.setenv("FAULTS_LOG", str(log))

    def bfn_config():
        if route == "bfn_file":
            for name in [m for m in sys.modules if m.startswith("_modelscape_user_")]:
                del sys.modules[name]  # a new Python session: the file is read again
            return dict(bfn_file=str(path), bfn_name="bfn")
        return dict(base_bfn=load_module(path).bfn)

    path.write_text(BFN_V1)
    first = run({}, bfn_config(), store)
    assert trained(log) == [8, 16]
    run({}, bfn_config(), store)
    assert trained(log) == []  # unchanged code: resumed
    path.write_text(BFN_V2)
    second = run({}, bfn_config(), store)
    assert trained(log) == [8, 16]  # the edited body trains anew
    assert {r["job_id"] for r in first.records}.isdisjoint(r["job_id"] for r in second.records)
    path.write_text(BFN_V2_COMMENTED)
    run({}, bfn_config(), store)
    assert trained(log) == []  # comments and docstrings are not code

    # each job's code version is stored with it and shown
    (v1,) = {json.dumps(r["code"]) for r in first.records}
    (v2,) = {json.dumps(r["code"]) for r in second.records}
    assert v1 != v2 and len(json.loads(v2)) == 1  # the batch function (powerlaw_bfn, which it calls, inside)
    out = subprocess.run([sys.executable, "-m", "modelscape.cli", "show", str(store)], capture_output=True,
                         text=True, cwd=ROOT, timeout=scaled(60), env=dict(os.environ, PYTHONPATH=ROOT)).stdout
    code_line = next(ln for ln in out.splitlines() if ln.startswith("code: "))
    for name, fp in json.loads(v2).items():
        assert f"{name} {fp}" in code_line


def test_a_function_without_readable_code_counts_by_name_with_a_warning():
    from pandas._libs.lib import is_scalar  # compiled (Cython): no Python code to read, not a library we pin

    from modelscape.backend import identity, store
    identity._unreadable_warned.discard("pandas.api.types.is_scalar")
    with pytest.warns(UserWarning, match=r"cannot read the code of pandas\.api\.types\.is_scalar"):
        a = store.job_identity({"otherreturns": {"g": is_scalar}}, {}, {})
    assert a == store.job_identity({"otherreturns": {"g": is_scalar}}, {}, {})
    assert a != store.job_identity({"otherreturns": {"g": grab_number}}, {}, {})


# --- grabs checked before the cost ------------------------------------------------------------------------

STEPS = []


def stepping_bfn(bsz, gen=None, X=None, y=None, N_TEST=None, **kw):
    """powerlaw_bfn whose training batches are counted in STEPS."""
    from modelscape.data import powerlaw_bfn
    inner = powerlaw_bfn(bsz, gen, X, y, dim=4)
    if bsz == N_TEST:
        return inner

    def batch(step):
        STEPS.append(step)
        return inner(step)
    return batch


def grab_none(model, **kw):
    return None


def grab_dict(model, **kw):
    return {"a": 1.0}


def grab_object(model, **kw):
    return object()


def grab_text(model, WIDTH, **kw):
    return f"w{WIDTH}"


def grab_number(model, **kw):
    return 1.5


@pytest.mark.parametrize("only", [True, False])
@pytest.mark.parametrize("grab, type_name", [(grab_none, "NoneType"), (grab_dict, "dict"), (grab_object, "object")])
def test_a_grab_that_cannot_be_stored_fails_its_job_before_training(tmp_path, grab, type_name, only):
    STEPS.clear()
    with pytest.raises(SweepFailed) as info:  # every job of this sweep fails
        run(dict(otherreturns={"good": grab_number, "bad": grab}, ONLYTHRESHOLDS=only, EVAL_EVERY=5),
            dict(base_bfn=stepping_bfn), tmp_path / "expt")
    res = info.value.result
    assert [r["status"] for r in res.records] == ["failed", "failed"]
    for r in res.records:
        assert f"grab 'bad' ({grab.__qualname__}) returned a {type_name}" in r["error"]
    assert STEPS == [0, 0]  # one batch drawn per job, no update made


def test_string_grabs_are_stored_and_keep_the_numeric_views_working(tmp_path):
    import xarray as xr
    for only in (True, False):
        store = tmp_path / f"expt{only}"
        res = run(dict(otherreturns={"name": grab_text, "n": grab_number}, ONLYTHRESHOLDS=only, EVAL_EVERY=10),
                  dict(base_bfn=stepping_bfn), store, iters=([8, 16], [0, 1]), names=("WIDTH", "trial"))
        assert {r["status"] for r in res.records} == {"not_reached"}
        for r in load(store).records:  # stored as strings, read back as strings
            assert r["grabs"]["name"].dtype.kind == "U" and set(np.ravel(r["grabs"]["name"])) == {
                f"w{r['axes']['WIDTH']}"}
        ds = load(store).to_xarray()
        assert ds.grab_name.dtype.kind == "U" and ds.grab_n.dtype == float
        assert set(np.ravel(ds.grab_name.sel(WIDTH=16).values)) == {"w16"}
        extras = load(store)["extras"]
        assert set(np.ravel(extras["name"].get(WIDTH=8))) == {"w8"}
        assert float(np.mean(extras["n"].get(WIDTH=8))) == 1.5
        nc = tmp_path / f"x{only}.nc"
        assert cli.main(["export", str(store), "--netcdf", str(nc)]) == 0
        with xr.open_dataset(nc) as back:
            assert set(np.ravel(back.grab_name.sel(WIDTH=8).values.astype(str))) == {"w8"}


# --- readers survive damage ---------------------------------------------------------------------------------

def test_a_damaged_row_is_reported_skipped_by_readers_and_rerun_by_resume(tmp_path, monkeypatch, capsys):
    log, store = tmp_path / "log", tmp_path / "expt"
    monkeypatch.setenv("FAULTS_LOG", str(log))
    mod_path = tmp_path / "user_bfn.py"
    mod_path.write_text(BFN_V1)
    bfn = dict(base_bfn=load_module(mod_path).bfn)
    cfg = dict(ONLYTHRESHOLDS=False, EVAL_EVERY=5, otherreturns={"n": grab_number})
    first = run(cfg, bfn, store, iters=([8, 16, 24],))
    assert trained(log) == [8, 16, 24]
    victim = next(r["job_id"] for r in first.records if r["axes"]["WIDTH"] == 16)
    with sqlite3.connect(store / "results.db") as c:  # scribble over that job's arrays
        (blob,) = c.execute("SELECT arrays FROM jobs WHERE job_id = ?", (victim,)).fetchone()
        c.execute("UPDATE jobs SET arrays = ? WHERE job_id = ?", (blob[:200] + bytes(64) + blob[264:], victim))

    with pytest.warns(UserWarning, match=f"job {victim} .* is damaged and is skipped"):
        res = load(store)
    assert sorted(r["axes"]["WIDTH"] for r in res.records) == [8, 24]
    assert res.to_xarray().status.sel(WIDTH=16).item() == "missing"
    with pytest.warns(UserWarning, match=victim):
        assert cli.main(["show", str(store)]) == 0
    out = capsys.readouterr().out
    assert [ln.split()[:2] for ln in out.splitlines()[1:4]] == [["8", "not_reached"], ["16", "damaged"],
                                                                 ["24", "not_reached"]]
    with pytest.warns(UserWarning, match=victim):
        assert cli.main(["export", str(store), "--csv", str(tmp_path / "x.csv")]) == 0
        assert cli.main(["export", str(store), "--netcdf", str(tmp_path / "x.nc")]) == 0
    rows = (tmp_path / "x.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[2].startswith(f"{victim},16,damaged,")

    with pytest.warns(UserWarning, match=victim):
        again = run(cfg, bfn, store, iters=([8, 16, 24],))
    assert trained(log) == [16]  # only the damaged job trains again, and its row is whole again
    assert len(again.records) == 3
    assert len(load(store).records) == 3


def _drop_privileges():
    """A command prefix under which the file permissions hold: as root (tests often run as root, and root
    ignores them) the capabilities that override them are dropped; None if that is impossible here."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        return None
    probe = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", "true"],
                           capture_output=True)
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if probe.returncode == 0 else None


def test_a_store_in_a_read_only_directory_is_readable(tmp_path):
    prefix = _drop_privileges()
    if prefix is None:
        pytest.skip("running as root without setpriv: file permissions cannot be made to hold here")
    expt = tmp_path / "expt"
    res = run(dict(otherreturns={"n": grab_number}), dict(base_bfn=stepping_bfn), expt)
    assert sorted(os.listdir(expt)) == ["results.db"]  # the writer closed: no -wal, no -shm left
    os.chmod(expt, 0o555)
    try:
        code = ("import sys; from modelscape.backend.store import Store\n"
                "st = Store(sys.argv[1], readonly=True)\n"
                "try:\n    open(sys.argv[1] + '/probe', 'w')\nexcept PermissionError:\n    print('blocked')\n"
                "print('immutable', st.immutable, 'jobs', len(st.results().records))\n")
        env = dict(os.environ, PYTHONPATH=ROOT)
        p = subprocess.run(prefix + [sys.executable, "-c", code, str(expt)], capture_output=True, text=True,
                           env=env, timeout=scaled(60))
        assert p.returncode == 0, p.stderr
        assert p.stdout.split() == ["blocked", "immutable", "True", "jobs", "2"]  # the fallback, honestly taken
        p = subprocess.run(prefix + [sys.executable, "-m", "modelscape.cli", "show", str(expt)], capture_output=True,
                           text=True, env=env, timeout=scaled(60), cwd=ROOT)
        assert p.returncode == 0, p.stderr
        assert [ln.split()[:2] for ln in p.stdout.splitlines()[1:3]] == [["8", res.records[0]["status"]],
                                                                         ["16", res.records[1]["status"]]]
    finally:
        os.chmod(expt, 0o755)


def _open_many(root, rounds, barrier, errors):
    bad = []
    for k in range(rounds):
        barrier.wait()
        try:
            Store(os.path.join(root, f"s{k}")).close()
        except Exception as e:
            bad.append(f"{type(e).__name__}: {e}")
    errors.put(bad)


def test_several_processes_creating_one_store_at_once(tmp_path):
    ctx = mp.get_context("fork")  # only sqlite in the children; forking keeps the test fast
    n, rounds = 6, 40
    barrier, errors = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_open_many, args=(str(tmp_path), rounds, barrier, errors)) for _ in range(n)]
    for p in procs:
        p.start()
    bad = [e for _ in procs for e in errors.get(timeout=scaled(120))]
    for p in procs:
        p.join()
    assert bad == []
    with Store(tmp_path / "s0", readonly=True) as st:
        assert st.status_counts() == {}


@pytest.mark.serial  # times an open against a 30 s timeout: run when no other test competes for the cores
def test_opening_waits_for_the_wal_switch_while_another_process_holds_a_new_store(tmp_path):
    db = tmp_path / "s.db"
    Store(db).close()
    with sqlite3.connect(db) as c:
        c.execute("PRAGMA journal_mode = DELETE")  # as a store is in the instant after its creation
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN")
    other.execute("SELECT count(*) FROM jobs").fetchone()  # holds a shared lock: no switch possible meanwhile
    threading.Timer(0.3, lambda: other.execute("COMMIT")).start()
    t0 = time.perf_counter()
    with Store(db) as st:  # used to fail at once with "database is locked"
        assert st._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert time.perf_counter() - t0 < 20  # opened once the other let go, not at the 30 s busy timeout
    other.close()


# --- validation before anything runs ------------------------------------------------------------------------

OUT_OF_RANGE = [("WIDTH", 0), ("WIDTH", -1), ("N_SAMPLES", 0), ("N_TRAIN", 0), ("N_TEST", 0), ("NUM_TRIALS", 0),
                ("MAX_ITER", 0), ("LR", -0.1), ("LR", float("nan")), ("DEPTH", 0), ("GAMMA", 0.0),
                ("DEVICES", [-1]), ("SEED", -1), ("LOSS_CHECKPOINTS", [float("inf")]), ("EMA_SMOOTHER", 1.0),
                ("MOMENTUM", -0.5), ("WEIGHT_DECAY", -1e-4), ("EVAL_EVERY", -1), ("SYNC_EVERY", -1),
                ("WORKERS_PER_DEVICE", -1), ("CLAIM_TIMEOUT", 0.0), ("THREADS", -1), ("JOB_TIMEOUT", 0.0),
                ("SLURM_TIME", 0), ("SLURM_GPUS_PER_NODE", -1), ("SLURM_CPUS_PER_TASK", 0), ("SLURM_SHARDS", 0),
                ("SLURM_ARRAY_PARALLELISM", 0), ("FUSE_MAX", 0), ("LIVE_EVERY", -1.0), ("BASE_WIDTH", 0),
                ("DEPTH_ALPHA", -0.5), ("BASE_DEPTH", 0),
                ("OUTPUT_MULT", 0.0), ("ATTN_MULT", -1.0), ("EMB_MULT", 0.0), ("EMB_LR_MULT", -1.0),
                ("HIDDEN_LR_MULT", -1.0), ("READOUT_LR_MULT", -1.0), ("VECTOR_LR_MULT", -1.0)]


def test_every_numeric_key_has_a_range_and_the_bad_values_above_cover_them_all():
    numeric = {hp.name for hp in SCHEMA if hp.type in (int, float)}
    assert {hp.name for hp in SCHEMA if hp.range} == numeric
    assert {k for k, _ in OUT_OF_RANGE} == numeric


@pytest.mark.parametrize("key, value", OUT_OF_RANGE, ids=[f"{k}={v}" for k, v in OUT_OF_RANGE])
def test_an_out_of_range_value_fails_before_any_job(tmp_path, key, value):
    STEPS.clear()
    with pytest.raises(ConfigError) as e:
        run({key: value}, dict(base_bfn=stepping_bfn), tmp_path / "expt")
    assert key in str(e.value) and repr(value if not isinstance(value, list) else value[0]) in str(e.value)
    assert not (tmp_path / "expt").exists() and STEPS == []
    if key in ("WIDTH", "LR", "N_SAMPLES", "GAMMA", "DEPTH"):  # as an axis value too
        with pytest.raises(ConfigError, match=key):
            run({}, dict(base_bfn=stepping_bfn), tmp_path / "expt", iters=([8, value],), names=(key,))
        assert not (tmp_path / "expt").exists() and STEPS == []


@pytest.mark.parametrize("key, value, choice", [("OPTIMIZER", "Adma", "Adam"), ("LOSS", "msee", "mse"),
                                                ("MODEL", "MPL", "MLP")])
def test_a_misspelt_name_fails_before_any_job(tmp_path, key, value, choice):
    STEPS.clear()
    with pytest.raises(ConfigError) as e:
        run({key: value}, dict(base_bfn=stepping_bfn), tmp_path / "expt")
    assert key in str(e.value) and repr(value) in str(e.value) and choice in str(e.value)
    assert not (tmp_path / "expt").exists() and STEPS == []


# --- provenance -----------------------------------------------------------------------------------------------

def test_provenance_is_recorded_shown_and_exported(tmp_path, monkeypatch, capsys):
    import torch
    import xarray as xr
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run(git + ["init", "-q"], check=True)
    (repo / "a.txt").write_text("1")
    subprocess.run(git + ["add", "a.txt"], check=True)
    subprocess.run(git + ["commit", "-qm", "x"], check=True)
    commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    (repo / "a.txt").write_text("2")  # uncommitted change: dirty
    monkeypatch.chdir(repo)
    store = tmp_path / "expt"
    run(dict(LR=0.05), dict(base_bfn=stepping_bfn), store)
    with Store(store, readonly=True) as st:
        prov = st.sweeps()[-1]["meta"]["provenance"]
        fixed = st.sweeps()[-1]["meta"]["fixed"]
    assert prov["git_commit"] == commit and prov["git_dirty"] is True
    assert prov["torch"] == torch.__version__ and prov["numpy"] == np.__version__
    assert fixed["LR"] == 0.05 and "WIDTH" not in fixed  # WIDTH is the axis
    assert cli.main(["show", str(store)]) == 0
    out = capsys.readouterr().out
    assert f"git {commit[:12]} (dirty)" in out and f"torch {torch.__version__}" in out
    nc = tmp_path / "x.nc"
    assert cli.main(["export", str(store), "--netcdf", str(nc)]) == 0
    with xr.open_dataset(nc) as ds:
        assert ds.attrs["git_commit"] == commit and ds.attrs["hp_LR"] == 0.05
        assert ds.attrs["torch"] == torch.__version__ and list(np.atleast_1d(ds.attrs["hp_LOSS_CHECKPOINTS"])) == [1e-9]


def test_show_has_a_code_column_when_jobs_ran_different_code(tmp_path, capsys):
    with Store(tmp_path / "expt") as st:
        st.begin_sweep(["WIDTH"], [[8, 16]], ["a", "b"])
        st.write({"job_id": "a", "status": "done", "axes": {"WIDTH": 8}, "code": {"m.bfn": "111111111111"}})
        st.write({"job_id": "b", "status": "done", "axes": {"WIDTH": 16}, "code": {"m.bfn": "222222222222"}})
    assert cli.main(["show", str(tmp_path / "expt")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-1] == "code"
    assert lines[1].split()[-1] == "bfn=11111111" and lines[2].split()[-1] == "bfn=22222222"
    assert not any(ln.startswith("code: ") for ln in lines)
