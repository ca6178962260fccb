"""The results store: round trips, job identity, resume bookkeeping, concurrent readers, crashes, bad files."""
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from deadlines import scaled  # noqa: E402  (deadlines stretched on a busy machine)

import modelscape
from modelscape.backend.store import (NON_RESULT_KEYS, SCHEMA_VERSION, Store, StoreError, identity_cache,
                                      job_identity, jsonable, load)
from modelscape.config import canonicalize
from modelscape.results import SweepResults, axis_label

# torch, modelscape.data and modelscape.backend.job are imported inside the tests that need them: the reader
# and writer subprocesses import this module for its helpers and should start fast.
TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)


# --- helpers (test_store_cli.py and the subprocesses below import them) -----------------------------------

def synth_record(i, status="done", n_steps=300, eval_every=50, axes=None, grab_shape=(3, 2)):
    """A record shaped like run_config's, its contents derived from ``i`` so that a reader can check them."""
    rng = np.random.default_rng(i)
    axes = dict(axes if axes is not None else {"WIDTH": 16 * (i + 1), "trial": 0})
    cfg = {"LR": 0.1, "WIDTH": axes.get("WIDTH", 16), "LOSS_CHECKPOINTS": [0.5, 0.1], "VERBOSE": False}
    rec = dict(job_id=f"job{i:04d}", axes=axes, config=cfg, status=status, error=None)
    if status == "failed":
        rec.update(error=f'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: boom {i}\n',
                   device="cpu", wall_time=0.25, steps=0, timekeys=None, thresholds=None,
                   train_loss=float("nan"), test_loss=float("nan"), grabs={}, oom=False)
        return rec
    eval_steps = np.arange(0, n_steps + 1, eval_every, dtype=np.int64)
    second = np.nan if status == "not_reached" else 20.0 * (i + 1)
    rec.update(steps=n_steps, thresholds=np.array([0.5, 0.1]), timekeys=np.array([10.0 * (i + 1), second]),
               train_loss=float(1.0 / (i + 2)), test_loss=float(1.5 / (i + 2)),
               train_curve=np.exp(-np.arange(n_steps) / (50.0 + i)) + rng.random(n_steps) * 1e-3,
               train_raw=rng.random(n_steps), eval_steps=eval_steps,
               test_curve=np.linspace(1.0, 0.1, len(eval_steps)) * (i + 1),
               grabs={"norms": rng.standard_normal((len(eval_steps),) + tuple(grab_shape))},
               device="cpu", seed=42, trial=int(axes.get("trial", 0)), wall_time=0.5 + i)
    return rec


def as_stored(rec):
    """What the store gives back for ``rec``: config through ``jsonable``, axis values as labels."""
    out = dict(rec)
    if "config" in out:
        out["config"] = jsonable(out["config"])
    out["axes"] = {k: axis_label(v) for k, v in rec["axes"].items()}
    return out


def assert_same(a, b, where="record"):
    """Equal as the store promises: same keys in order, arrays bitwise with dtype, NaN == NaN, same types."""
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray), f"{where}: {type(b)} is not an array"
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{where}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        assert a.tobytes() == b.tobytes(), f"{where}: array contents differ"
        return
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__} ({a!r} vs {b!r})"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for n, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{n}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), f"{where}: {b} is not NaN"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def run_python(code, *args, timeout=60, **kw):
    timeout = scaled(timeout)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, TESTS]))
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT, **kw)


# --- round trips ------------------------------------------------------------------------------------------

def _grab_matrix(model, X_te, **kwargs):
    means = np.stack([p.detach().abs().mean().cpu().numpy() for p in model.parameters()])
    return means[:2].reshape(1, 2) * np.ones((3, 1))


def _grab_raises(model, **kwargs):
    raise RuntimeError("grab exploded")


@pytest.fixture(scope="module")
def real_records():
    """Records from run_config itself: curves with a 2-D grab along them, final values only, and a failure."""
    import modelscape.data as data
    from modelscape.backend.job import run_config_safe
    bfn = dict(base_bfn=data.powerlaw_bfn, dim=8)
    base = dict(PARAMETERIZATION="sp", WIDTH=16, MAX_ITER=40, N_TEST=64, N_SAMPLES=32, EVAL_EVERY=10,
                LOSS_CHECKPOINTS=[0.5, 1e-9], DETERMINISTIC=False)
    jobs = [dict(base, ONLYTHRESHOLDS=False, otherreturns={"mat": _grab_matrix}),
            dict(base, ONLYTHRESHOLDS=True, LR=0.2),
            dict(base, ONLYTHRESHOLDS=False, otherreturns={"bad": _grab_raises})]
    out = []
    for k, cfg in enumerate(jobs):
        axes = {"WIDTH": 16, "LR": cfg.get("LR", 0.01), "trial": k}
        rec = run_config_safe(cfg, bfn, axes=axes)
        canon = canonicalize(cfg, [data.powerlaw_bfn] + list(cfg.get("otherreturns", {}).values()))
        rec.update(job_id=job_identity(canon, bfn, axes), config=canon)
        out.append(rec)
    assert [r["status"] for r in out] == ["not_reached", "not_reached", "failed"], [r.get("error") for r in out]
    assert out[0]["grabs"]["mat"].shape == (5, 3, 2)
    return out


def test_run_job_records_round_trip(tmp_path, real_records):
    with Store(tmp_path / "expt") as st:
        for r in real_records:
            st.write(r)
        back = st.records([r["job_id"] for r in real_records])
    assert len(back) == 3
    for r, b in zip(real_records, back):
        assert_same(as_stored(r), b)
    assert np.isnan(back[0]["timekeys"][1]) and back[0]["eval_steps"].dtype == np.int64
    assert "RuntimeError: grab exploded" in back[2]["error"] and back[2]["timekeys"] is None
    assert back[0]["config"]["otherreturns"] == {"mat": f"{__name__}._grab_matrix"}


def test_synthetic_edge_cases_round_trip(tmp_path):
    import torch

    import modelscape.data as data

    class Act:
        def __str__(self):
            return "relu"

    rec = synth_record(0, status="not_reached")
    rec["axes"] = {"act": Act(), "LR": np.float64(0.5), "trial": np.int64(3)}
    rec["grabs"] = {"matrix": np.arange(12, dtype=np.float32).reshape(3, 4), "scalar32": np.float32(2.5),
                    "final": 0.25, "count": 7, "missing": None, "naninf": np.array([np.nan, np.inf, -np.inf]),
                    "κ/odd name.npy": np.ones((2, 2, 2), dtype=np.int8)}
    rec.update(test_loss=float("nan"), train_loss=float("inf"), seed=2 ** 62 + 1, extra_flag=True,
               note={"a": [1, 2.5, "x"]}, big=2 ** 70)
    rec["config"] = {"base_bfn": data.powerlaw_bfn, "X": np.zeros((4, 2), dtype=np.float32),
                     "n": np.int32(5), "t": (1, 2), "MODEL": torch.nn.Linear}
    failed = synth_record(1, status="failed")
    bare = {"job_id": "bare", "status": "failed", "axes": {}}  # the least a record can be
    with Store(tmp_path / "s.db") as st:
        for r in (rec, failed, bare):
            st.write(r)
        back = {r["job_id"]: r for r in st.records()}
    assert set(back) == {rec["job_id"], failed["job_id"], "bare"}
    assert_same(as_stored(rec), back[rec["job_id"]])
    assert_same(as_stored(failed), back[failed["job_id"]])
    assert_same(bare, back["bare"])
    b = back[rec["job_id"]]
    assert b["axes"] == {"act": "relu", "LR": 0.5, "trial": 3}
    assert b["config"]["base_bfn"] == "modelscape.data.synthetic.powerlaw_bfn"
    assert b["config"]["X"]["array"] == [4, 2] and b["config"]["X"]["dtype"] == "float32"
    assert b["config"]["MODEL"] == "torch.nn.modules.linear.Linear"


def test_object_arrays_are_refused_clearly(tmp_path):
    rec = synth_record(0)
    rec["grabs"] = {"objs": np.array([object(), 1], dtype=object)}
    with Store(tmp_path) as st, pytest.raises(StoreError, match="objs"):
        st.write(rec)


def test_a_group_of_records_is_stored_whole_or_not_at_all(tmp_path):
    """A fused group's records land in one transaction; should the store refuse one of them, the engine
    stores the others and a failed record for that one."""
    from modelscape.backend.sweep import _store_records
    bad = synth_record(1)
    bad["grabs"] = {"objs": np.array([object(), 1], dtype=object)}
    with Store(tmp_path) as st:
        with pytest.raises(StoreError, match="objs"):
            st.write_many([synth_record(0), bad, synth_record(2)])
        assert st.records() == []  # not the first record alone
        st.write_many([synth_record(0), synth_record(2)])
        assert sorted(r["job_id"] for r in st.records()) == ["job0000", "job0002"]
        records = [synth_record(3), bad, synth_record(4)]
        with pytest.warns(UserWarning, match="could not be stored"):
            out = _store_records(st, records, [r["config"] for r in records])
        assert [r["status"] for r in out] == ["done", "failed", "done"] and "objs" in out[1]["error"]
        assert {j: status for j, (status, _) in st.statuses().items()} == {"job0000": "done", "job0001": "failed", "job0002": "done", "job0003": "done",
                                 "job0004": "done"}


# --- identity -----------------------------------------------------------------------------------------

# Built from light callables (stand-ins for a batch function and a grab) so that the subprocess computing the
# same id need not import torch; the same text runs here and there.
IDENTITY_INPUTS = """
import numpy as np
from modelscape.backend.store import job_identity
from modelscape.config import canonicalize, parse_bool, parse_int

def identity_inputs(lr=0.1, verbose=False, devices=(0,), grab_name="mat", arr=None, order=1, bfn=parse_int):
    cfg = {"LR": lr, "WIDTH": 64, "VERBOSE": verbose, "DEVICES": list(devices), "DIM": 8,
           "otherreturns": {grab_name: parse_bool}, "X_te": np.arange(6.0).reshape(3, 2)}
    cfg = canonicalize(cfg, extra_known=["DIM"])
    bfn = {"base_bfn": bfn, "dim": 8, "data": np.arange(10.0) if arr is None else arr}
    if order < 0:
        cfg, bfn = dict(reversed(list(cfg.items()))), dict(reversed(list(bfn.items())))
    return cfg, bfn, {"WIDTH": 64, "LR": lr, "trial": 1}
"""
_ns = {}
exec(IDENTITY_INPUTS, _ns)
_identity_inputs = _ns["identity_inputs"]


def test_job_identity_stable_across_processes():
    here = job_identity(*_identity_inputs())
    assert len(here) == 64 and int(here, 16) >= 0
    p = run_python(IDENTITY_INPUTS + "\nprint(job_identity(*identity_inputs()))")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == here


def test_job_identity_sensitive_and_insensitive():
    import torch

    base = job_identity(*_identity_inputs())
    assert job_identity(*_identity_inputs(lr=0.2)) != base
    nudged = np.arange(10.0)
    nudged[-1] += 1e-9
    assert job_identity(*_identity_inputs(arr=nudged)) != base
    assert job_identity(*_identity_inputs(arr=np.arange(10.0).astype(np.float32))) != base  # dtype counts
    assert job_identity(*_identity_inputs(arr=np.arange(10.0).reshape(2, 5))) != base  # shape counts
    assert job_identity(*_identity_inputs(grab_name="other")) != base
    assert job_identity(*_identity_inputs(verbose=True, devices=(0, 1, 2))) == base
    assert job_identity(*_identity_inputs(order=-1)) == base
    assert job_identity(*_identity_inputs(arr=torch.arange(10.0, dtype=torch.float64))) == base
    cfg, bfn, axes = _identity_inputs()
    assert job_identity(cfg, bfn, {**axes, "trial": 2}) != base
    assert job_identity({**cfg, "SEED": 43}, bfn, axes) != base
    assert job_identity({**cfg, "DIM": 9}, bfn, axes) != base  # a user key
    assert job_identity(*_identity_inputs(bfn=canonicalize)) != base  # another batch function
    for key in NON_RESULT_KEYS:
        assert job_identity({**cfg, key: "something else"}, bfn, axes) == base, key
    with identity_cache():  # hashing a big array once per sweep must not change the ids
        assert job_identity(cfg, bfn, axes) == job_identity(cfg, bfn, axes) == base


def test_job_identity_int_and_float_learning_rate_agree():
    bfn = {"base_bfn": canonicalize}
    one_int = job_identity(canonicalize({"LR": 1, "WIDTH": 8}), bfn, {"LR": 1, "WIDTH": np.int64(8)})
    one_float = job_identity(canonicalize({"LR": 1.0, "WIDTH": 8}), bfn, {"LR": 1.0, "WIDTH": 8})
    assert one_int == one_float


def test_jsonable():
    import torch

    import modelscape.data as data

    cfg = {"f": data.powerlaw_bfn, "a": np.ones((2, 3), dtype=np.float32), "t": torch.ones(2, 3),
           "n": np.float64(0.5), "i": np.int64(3), "tup": (1, 2), 3: "int key", "nan": float("nan")}
    out = jsonable(cfg)
    assert out["f"] == "modelscape.data.synthetic.powerlaw_bfn"
    assert out["a"] == {"array": [2, 3], "dtype": "float32", "sha": out["a"]["sha"]}
    assert out["t"] == out["a"]  # same contents, dtype and shape
    assert type(out["n"]) is float and type(out["i"]) is int and out["tup"] == [1, 2] and out["3"] == "int key"
    assert json.loads(json.dumps(out))["a"] == out["a"]
    assert jsonable(out).keys() == out.keys() and jsonable(out)["a"] == out["a"]


# --- resume bookkeeping -----------------------------------------------------------------------------------

def test_done_ids_and_rewriting_a_failed_job(tmp_path):
    with Store(tmp_path) as st:
        st.write(synth_record(0))
        st.write(synth_record(1, status="not_reached"))
        st.write(synth_record(2, status="failed"))
        assert st.done_ids() == {"job0000", "job0001"}
        assert st.status_counts() == {"done": 1, "not_reached": 1, "failed": 1}
        st.write(synth_record(2, status="diverged"))  # the re-run of the failed job
        assert st.done_ids() == {"job0000", "job0001", "job0002"}
        rows = st.records()
        assert len(rows) == 3 and [r for r in rows if r["job_id"] == "job0002"][0]["status"] == "diverged"
        assert st.status_counts() == {"done": 1, "not_reached": 1, "diverged": 1}
    assert (tmp_path / "results.db").is_file()
    with sqlite3.connect(tmp_path / "results.db") as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_writes_from_another_thread(tmp_path):
    # an engine may store results from a future's callback thread
    with Store(tmp_path) as st, ThreadPoolExecutor(2) as pool:
        list(pool.map(st.write, [synth_record(i) for i in range(6)]))
        assert len(st.records()) == 6


# --- concurrency and crashes ------------------------------------------------------------------------------

READER_SCRIPT = """
import json, sys, time
from modelscape.backend.store import Store
from test_store import synth_record, as_stored, assert_same
path, n = sys.argv[1], int(sys.argv[2])
print("ready", flush=True)
counts, torn, deadline = [], [], time.time() + 60
while time.time() < deadline:
    with Store(path, readonly=True) as st:
        recs = st.records()
    for r in recs:
        try:
            assert_same(as_stored(synth_record(int(r["job_id"][3:]), n_steps=2000)), r)
        except AssertionError as e:
            torn.append(str(e))
    counts.append(len(recs))
    if len(recs) >= n:
        break
print(json.dumps({"counts": counts, "torn": torn[:5]}), flush=True)
"""


def test_readers_see_complete_records_while_a_writer_commits(tmp_path):
    n = 50
    st = Store(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, TESTS]))
    readers = [subprocess.Popen([sys.executable, "-c", READER_SCRIPT, str(tmp_path), str(n)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    seen_in_thread = []

    def thread_reader():
        with Store(tmp_path, readonly=True) as ro:
            while True:
                recs = ro.records()
                for r in recs:
                    assert_same(as_stored(synth_record(int(r["job_id"][3:]), n_steps=2000)), r)
                seen_in_thread.append(len(recs))
                if len(recs) >= n:
                    return

    try:
        for p in readers:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        t = threading.Thread(target=thread_reader)
        t.start()
        for i in range(n):
            st.write(synth_record(i, n_steps=2000))
            time.sleep(0.01)
        t.join(60)
        results = [json.loads(p.communicate(timeout=scaled(60))[0].strip().splitlines()[-1]) for p in readers]
    finally:
        for p in readers:
            if p.poll() is None:
                p.kill()
        st.close()
    assert not t.is_alive() and seen_in_thread[-1] == n
    for res in results:
        assert res["torn"] == []
        assert res["counts"][-1] == n and res["counts"] == sorted(res["counts"])
    partial = [c for res in results for c in res["counts"]] + seen_in_thread
    assert any(0 < c < n for c in partial), "no reader ever read while the writer was writing"


WRITER_SCRIPT = """
import sys
from modelscape.backend.store import Store
from test_store import synth_record
st = Store(sys.argv[1])
i = 0
while True:
    st.write(synth_record(i, n_steps=5000))
    print(i, flush=True)
    i += 1
"""


def test_writer_killed_mid_sweep_leaves_a_readable_store(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, TESTS]))
    p = subprocess.Popen([sys.executable, "-c", WRITER_SCRIPT, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stdout:
            if int(line) >= 9:
                break
        p.send_signal(signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
    with Store(tmp_path, readonly=True) as ro:
        recs = ro.records()
    assert len(recs) >= 10
    for r in recs:
        assert_same(as_stored(synth_record(int(r["job_id"][3:]), n_steps=5000)), r)
    with Store(tmp_path) as st:  # the next run goes on writing
        st.write(synth_record(999))
        assert len(st.records()) == len(recs) + 1


# --- bad files --------------------------------------------------------------------------------------------

def test_text_and_png_files_are_not_stores(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("these are my notes, not a database\n" * 20)
    with pytest.raises(StoreError, match="not a modelscape results store") as e:
        Store(text)
    assert str(text) in str(e.value)
    png_dir = tmp_path / "expt"
    png_dir.mkdir()
    (png_dir / "results.db").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    with pytest.raises(StoreError) as e:
        load(png_dir)
    assert str(png_dir / "results.db") in str(e.value) and "PNG" in str(e.value)


def test_foreign_sqlite_database(tmp_path):
    db = tmp_path / "other.db"
    with sqlite3.connect(db) as c:
        c.execute("CREATE TABLE users (name TEXT)")
    for open_it in (lambda: Store(db), lambda: Store(db, readonly=True), lambda: load(db)):
        with pytest.raises(StoreError, match="not a modelscape results store") as e:
            open_it()
        assert str(db) in str(e.value) and "users" in str(e.value)


def test_damaged_store_and_newer_schema(tmp_path):
    db = tmp_path / "s.db"
    with Store(db) as st:
        for i in range(6):
            st.write(synth_record(i, n_steps=3000))
        st.begin_sweep(["WIDTH"], [[16 * (i + 1) for i in range(6)]], [f"job{i:04d}" for i in range(6)])
    raw = bytes(db.read_bytes())
    rng = np.random.default_rng(0)
    # pages after the first (the schema) overwritten: SQLite notices while reading
    pages = bytearray(raw)
    pages[len(raw) // 2:] = rng.integers(0, 256, len(raw) - len(raw) // 2, dtype=np.uint8).tobytes()
    # bytes inside one array's data: SQLite keeps no checksums, the npz's CRC notices
    blob = bytearray(raw)
    at = blob.find(b"PK\x03\x04", len(raw) // 4) + 300
    blob[at:at + 2000] = bytes(2000)
    damaged = tmp_path / "pages.db"
    damaged.write_bytes(bytes(pages))
    with pytest.raises(StoreError) as e:  # SQLite's own structure is broken: nothing can be trusted
        load(damaged).to_xarray()
    assert str(damaged) in str(e.value)
    # one row's blob is broken: that job is named and skipped, the other five load
    damaged = tmp_path / "blob.db"
    damaged.write_bytes(bytes(blob))
    with pytest.warns(UserWarning, match=r"job job0000 .* is damaged and is skipped") as w:
        res = load(damaged)
    assert str(damaged) in str(w[0].message)
    assert sorted(r["job_id"] for r in res.records) == [f"job{i:04d}" for i in range(1, 6)]
    assert res.to_xarray().status.values.tolist().count("missing") == 1

    with sqlite3.connect(db) as c:
        c.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="newer modelscape"):
        Store(db, readonly=True)


def test_missing_paths(tmp_path):
    with pytest.raises(StoreError, match="no such file"):
        load(tmp_path / "nope")
    with pytest.raises(StoreError, match="holds no results.db"):
        load(tmp_path)
    assert not (tmp_path / "nope").exists()  # reading never creates a store


# --- sweeps and load ------------------------------------------------------------------------------------

def _write_sweep(path):
    """A WIDTH x LR sweep: one job failed, one not stored yet (still running)."""
    widths, lrs = [16, 32, 64], [0.1, 0.01]
    recs, ids = [], []
    for k, (w, lr) in enumerate((w, lr) for w in widths for lr in lrs):
        status = "failed" if (w, lr) == (32, 0.01) else "not_reached" if w == 64 else "done"
        r = synth_record(k, status=status, axes={"WIDTH": w, "LR": lr})
        recs.append(r)
        ids.append(r["job_id"])
    with Store(path) as st:
        sid = st.begin_sweep(["WIDTH", "LR"], [widths, lrs], ids, meta={"script": "sweep.py"})
        for r in recs[:-1]:
            st.write(r)
    return sid, recs


def test_load_returns_the_stored_numbers_at_the_right_coordinates(tmp_path):
    sid, recs = _write_sweep(tmp_path / "expt")
    res = modelscape.load(tmp_path / "expt")
    assert isinstance(res, SweepResults) and len(res.records) == 5
    assert res.axis_names == ["WIDTH", "LR"] and res.axis_values == [[16, 32, 64], [0.1, 0.01]]
    ds = res.to_xarray()
    by_axes = {(r["axes"]["WIDTH"], r["axes"]["LR"]): r for r in recs}
    r = by_axes[(32, 0.1)]
    assert ds.train_loss.sel(WIDTH=32, LR=0.1).item() == r["train_loss"]
    np.testing.assert_array_equal(ds.timekeys.sel(WIDTH=32, LR=0.1).values, r["timekeys"])
    np.testing.assert_array_equal(ds.train_curve.sel(WIDTH=32, LR=0.1).values, r["train_curve"])
    np.testing.assert_array_equal(ds.test_curve.sel(WIDTH=32, LR=0.1, eval_step=r["eval_steps"]).values,
                                  r["test_curve"])
    np.testing.assert_array_equal(ds.grab_norms.sel(WIDTH=32, LR=0.1).values, r["grabs"]["norms"])
    assert np.isnan(ds.timekeys.sel(WIDTH=64, LR=0.1).values[1])  # threshold never crossed
    assert str(ds.status.sel(WIDTH=32, LR=0.01).item()) == "failed"
    assert np.isnan(ds.train_loss.sel(WIDTH=32, LR=0.01).item())
    assert str(ds.status.sel(WIDTH=64, LR=0.01).item()) == "missing"
    assert res["timekeys"].get(WIDTH=16, LR=0.01)[0] == by_axes[(16, 0.01)]["timekeys"][0]
    # the iterator's in-memory results and the store agree
    memory = SweepResults(["WIDTH", "LR"], [[16, 32, 64], [0.1, 0.01]], [as_stored(r) for r in recs[:-1]])
    assert memory.to_xarray().identical(ds)
    # any path to the same store
    assert load(tmp_path / "expt" / "results.db", sweep=sid).to_xarray().identical(ds)


def test_sweeps_are_recorded_and_the_latest_is_loaded(tmp_path):
    with Store(tmp_path) as st:
        a = st.begin_sweep(["WIDTH"], [[16, 32]], ["x", "y"])
        b = st.begin_sweep(["LR"], [[0.1]], ["z"])
        assert load(tmp_path).axis_names == ["LR"]
        assert st.begin_sweep(["WIDTH"], [[16, 32]], ["x", "y"], meta={"run": 2}) == a  # a resumed sweep
        assert load(tmp_path).axis_names == ["WIDTH"] and load(tmp_path, sweep=b).axis_names == ["LR"]
        sweeps = st.sweeps()
        assert [s["id"] for s in sweeps] == [a, b] and sweeps[0]["runs"] == 2 and sweeps[0]["meta"] == {"run": 2}
        assert sweeps[0]["n_jobs"] == 2 and st.sweep_job_ids(a) == ["x", "y"]
        st.write(synth_record(0) | {"job_id": "y", "axes": {"WIDTH": 32}})
        assert st.status_counts(a) == {"done": 1, "missing": 1}
        assert [r["job_id"] for r in load(tmp_path).records] == ["y"]
        with pytest.raises(ValueError, match="3 job ids"):
            st.begin_sweep(["WIDTH"], [[16, 32]], ["x", "y", "z"])
        with pytest.raises(StoreError, match="no sweep 7"):
            st.results(7)


# --- with the sweep engine --------------------------------------------------------------------------------

TRAINED = []


def counting_bfn(bsz, gen=None, X=None, y=None, dim=8, **kwargs):
    """powerlaw_bfn that counts the jobs trained (one training batch function per job)."""
    from modelscape.data import powerlaw_bfn
    if bsz == 32:
        TRAINED.append(bsz)
    return powerlaw_bfn(bsz, gen, X, y, dim=dim, **kwargs)


def test_sweep_engine_stores_what_it_returns_and_resumes(tmp_path):
    from modelscape.backend.job_iterator import main as run_sweep
    cfg = dict(PARAMETERIZATION="sp", MAX_ITER=20, N_TEST=64, N_SAMPLES=32, ONLYTHRESHOLDS=False, EVAL_EVERY=10,
               DETERMINISTIC=False, RESULTS_DIR=str(tmp_path), EXPT_NAME="expt")
    bfn = dict(base_bfn=counting_bfn, dim=8)
    TRAINED.clear()
    res = run_sweep([[16, 32], [0.05, 0.1]], ["WIDTH", "LR"], cfg, bfn, executor="inprocess", progress=False)
    assert len(TRAINED) == 4
    back = modelscape.load(tmp_path / "expt")
    assert back.to_xarray().identical(res.to_xarray())
    for a, b in zip(res.records, back.records):
        assert_same(as_stored(a), b)
    TRAINED.clear()
    res = run_sweep([[16, 32, 64], [0.05, 0.1]], ["WIDTH", "LR"], cfg, bfn, executor="inprocess", progress=False)
    assert len(TRAINED) == 2 and len(res.records) == 6  # only the new width ran
    assert modelscape.load(tmp_path / "expt").to_xarray().identical(res.to_xarray())
