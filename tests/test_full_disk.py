"""A full disk loses nothing; a store whose file or write-ahead log is taken away stops the sweep and loses nothing;
a crafted or oversized row cannot take a reader's memory; paths built from config values stay where they belong.

Where this process may mount a small tmpfs (root, as in the project's containers), the full disk is real; elsewhere
SQLite's own "database or disk is full" is raised by a patched insert, and the same assertions hold
(MODELSCAPE_TEST_NO_MOUNT=1 tries that path as root).
"""
import io
import os
import sqlite3
import subprocess
import sys
import tracemalloc
import warnings
import zipfile

import numpy as np
import pytest
import torch

import modelscape
from modelscape.backend import beside, rows
from modelscape.backend.job import run_config
from modelscape.backend.job_iterator import main
from modelscape.backend.store import Store, StoreError, StoreLost, StoreUnion
from modelscape.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAINED = []
WIDTHS = [8, 10, 12, 14, 16, 18]
# FUSE=off: the jobs differ only in WIDTH and would fuse; these tests store (and lose) them one by one
TINY = dict(WIDTH=16, DEPTH=2, N_SAMPLES=32, N_TEST=64, MAX_ITER=12, LOSS_CHECKPOINTS=[0.01], LR=0.05, FUSE="off")
ON_TRAIN = {}  # WIDTH -> what to do when that job's training batches are made (fill the disk, delete the WAL ...)


def bfn(bsz, gen, X=None, y=None, WIDTH=None):
    if bsz == TINY["N_SAMPLES"] and X is None:  # once per job trained
        TRAINED.append(WIDTH)
        if WIDTH in ON_TRAIN:
            ON_TRAIN.pop(WIDTH)()
    w = torch.tensor([1.0, -0.5, 0.25, 0.5], device=gen.device)

    def batch(step):
        x = torch.randn(bsz, 4, generator=gen, device=gen.device)
        return x, x @ w
    return batch


def sweep(store, **cfg):
    TRAINED.clear()
    return main([WIDTHS], ["WIDTH"], dict(TINY, **cfg), dict(base_bfn=bfn), executor="inprocess", store=store,
                progress=False)


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch, tmp_path):
    monkeypatch.setattr(beside, "RETRY_DELAYS", (0.0, 0.0))
    monkeypatch.setenv("MODELSCAPE_SPILL_DIR", str(tmp_path / "cache"))
    ON_TRAIN.clear()
    yield
    ON_TRAIN.clear()


class Disk:
    """A folder whose disk can be filled and freed: a real 8 MB tmpfs where this process may mount one, else a
    folder whose store inserts fail as SQLite fails on a full disk."""

    def __init__(self, path, monkeypatch):
        self.path, self.real = path, False
        path.mkdir()
        if hasattr(os, "geteuid") and os.geteuid() == 0 and not os.environ.get("MODELSCAPE_TEST_NO_MOUNT"):
            self.real = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(path)],
                                       capture_output=True).returncode == 0
        self.full = False
        if not self.real:
            real_insert = Store._insert

            def insert(store, rows_):
                if self.full:
                    raise StoreError("writing failed") from sqlite3.OperationalError("database or disk is full")
                return real_insert(store, rows_)
            monkeypatch.setattr(Store, "_insert", insert)

    def fill(self):
        self.full = True
        if self.real:
            fd = os.open(self.path / "filler", os.O_WRONLY | os.O_CREAT)
            try:
                while True:
                    os.write(fd, b"\0" * 4096)
            except OSError:
                pass
            finally:
                os.close(fd)

    def free(self):
        self.full = False
        if self.real:
            os.remove(self.path / "filler")

    def close(self):
        if self.real:
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


@pytest.fixture
def disk(tmp_path, monkeypatch):
    d = Disk(tmp_path / "disk", monkeypatch)
    yield d
    d.close()


def test_a_full_disk_keeps_every_result_and_the_next_run_imports_them(disk, capsys):
    store = disk.path / "expt"
    ON_TRAIN[12] = disk.fill
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = sweep(store)
    said = " ".join(str(w.message) for w in caught)
    assert sorted(TRAINED) == WIDTHS
    assert [r["status"] for r in res.records] == ["not_reached"] * 6  # nothing became "failed"
    assert "database or disk is full" in said and "cannot rollback" not in said
    assert "next run on this store imports" in said
    assert len(modelscape.load(store).records) == 6  # readers see the spilled results before any import
    disk.free()
    res = sweep(store)
    assert TRAINED == [] and len(res.records) == 6  # every result came back from its spill file
    assert "imported" in capsys.readouterr().err
    with Store(store, readonly=True) as st:
        assert st.status_counts() == {"not_reached": 6}
    assert beside.spilled(store / "results.db") == []


def test_a_failed_commit_reports_the_disk_not_the_rollback(tmp_path):
    """SQLite rolls back by itself when a commit finds the disk full: the ROLLBACK that follows must not replace
    the error that says why."""
    st = Store(tmp_path / "s")
    real = st._conn

    class FullAtCommit:
        def __getattr__(self, name):
            return getattr(real, name)

        def execute(self, sql, *args):
            if sql == "COMMIT":
                real.execute("ROLLBACK")  # what SQLite does on SQLITE_FULL
                raise sqlite3.OperationalError("database or disk is full")
            return real.execute(sql, *args)

    st._conn = FullAtCommit()
    with pytest.raises(StoreError, match="database or disk is full") as err:
        st.write({"job_id": "j1", "status": "done", "axes": {}})
    assert "rollback" not in str(err.value)
    st._conn = real
    st.close()


def reader_process(db_path):
    """Another process holding a read-only connection (a `modelscape watch`, a notebook's `load`)."""
    code = (f"import sqlite3, sys, time; c = sqlite3.connect('file:{db_path}?mode=ro', uri=True); "
            "c.execute('select count(*) from jobs').fetchone(); print('ready', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_a_vanished_wal_stops_the_sweep_and_loses_no_result(tmp_path):
    store = tmp_path / "expt"
    Store(store).close()
    reader = reader_process(store / "results.db")
    try:
        ON_TRAIN[14] = lambda: os.remove(store / "results.db-wal")
        with pytest.raises(StoreLost, match="write-ahead log") as err:
            sweep(store)
        assert "copied back" in str(err.value) and "spilled" in str(err.value)
        assert TRAINED == [8, 10, 12, 14]
    finally:
        reader.kill()
        reader.wait()
    res = sweep(store)
    assert sorted(TRAINED) == [16, 18]  # 8 .. 14 were kept
    assert [r["status"] for r in res.records] == ["not_reached"] * 6


def test_a_replaced_store_file_stops_the_sweep_and_its_results_go_to_the_new_file(tmp_path):
    store = tmp_path / "expt"
    Store(tmp_path / "other.db").close()
    ON_TRAIN[12] = lambda: os.replace(tmp_path / "other.db", store / "results.db")
    with pytest.raises(StoreLost, match="replaced by another file"):
        sweep(store)
    res = sweep(store)
    assert sorted(TRAINED) == [14, 16, 18]
    assert len(res.records) == 6


def test_a_driver_that_cannot_claim_runs_its_jobs_unclaimed(tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise StoreError("claiming failed") from sqlite3.OperationalError("database is locked")
    monkeypatch.setattr(Store, "claim", refuse)
    res = sweep(tmp_path / "expt")
    assert sorted(TRAINED) == WIDTHS and len(res.records) == 6
    err = capsys.readouterr().err
    assert err.count("cannot claim jobs in the store (database is locked)") == 1


def test_reading_a_store_this_process_writes_keeps_its_locks(tmp_path):
    """POSIX locks belong to the process: reading the header of a store file this process holds open would drop
    them, and another process closing its connection would then delete the WAL under the writer."""
    st = Store(tmp_path / "s")
    st.write({"job_id": "a", "status": "done", "axes": {}})
    with StoreUnion(tmp_path / "s") as union:
        assert union.done_ids() == {"a"}
    code = (f"from modelscape.backend.db import Store; s = Store({str(tmp_path / 's')!r}); "
            "s.write({'job_id': 'b', 'status': 'done', 'axes': {}}); s.close()")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    st.check_file()  # the WAL this writer opened is still there
    st.write({"job_id": "c", "status": "done", "axes": {}})
    st.close()
    with Store(tmp_path / "s", readonly=True) as st:
        assert st.done_ids() == {"a", "b", "c"}


def test_spilled_rows_are_imported_newest_first_and_garbage_is_set_aside(tmp_path):
    path = tmp_path / "s"
    with Store(path) as st:
        st.write({"job_id": "kept", "status": "done", "axes": {}, "train_loss": 1.0})
        newer = rows.encode({"job_id": "new", "status": "done", "axes": {"x": 1}, "grabs": {"g": np.arange(3.0)}})
        older = rows.encode({"job_id": "kept", "status": "done", "axes": {}, "train_loss": 2.0})
    newer["created"], older["created"] = 2e9, 1.0
    for row in (newer, older):
        beside.write_spill(path / "results.db", row)
    (path / "results.db-spill" / "junk.row").write_bytes(b"not json")
    with pytest.warns(UserWarning, match="junk.row"):
        st = Store(path)
    recs = {r["job_id"]: r for r in st.records()}
    assert recs["kept"]["train_loss"] == 1.0  # the store's row is newer than the spilled one
    assert recs["new"]["grabs"]["g"].tolist() == [0.0, 1.0, 2.0]
    st.close()
    assert sorted(f.name for f in (path / "results.db-spill").iterdir()) == ["junk.row.bad"]


def test_a_crafted_blob_is_refused_before_it_is_inflated(tmp_path):
    """A 256 MiB array deflated into a blob of a few hundred kB, and an array declaring more bytes than it holds:
    both rows are named damaged, and reading them allocates next to nothing."""
    n = 2 ** 25  # float64: 256 MiB
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (n,)})
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("a0.npy", "w", force_zip64=True) as f:
            f.write(np.lib.format.magic(1, 0) + header.getvalue())
            zeros = bytes(1 << 20)
            for _ in range(n * 8 >> 20):
                f.write(zeros)
    assert len(bomb.getvalue()) < 2 ** 20  # 1 MB holding 256 MiB
    npy = io.BytesIO()
    np.save(npy, np.zeros(4))
    liar = io.BytesIO()
    with zipfile.ZipFile(liar, "w") as zf:  # stored, its checksum right: only the header lies
        zf.writestr("a0.npy", npy.getvalue().replace(b"(4,)", b"(9,)"))  # declares 9 float64, holds 4
    lie = liar.getvalue()
    path = tmp_path / "s"
    with Store(path) as st:
        for job_id, blob in (("bomb", bomb.getvalue()), ("liar", lie)):
            st.write({"job_id": job_id, "status": "done", "axes": {}, "timekeys": np.zeros(4)})
            st._conn.execute("UPDATE jobs SET arrays = ? WHERE job_id = ?", (blob, job_id))
    tracemalloc.start()
    with Store(path, readonly=True) as st, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert st.records() == []
        damaged = dict(st.damaged)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "compressed" in damaged["bomb"] and "declares shape (9,)" in damaged["liar"]
    assert peak < 16 * 2 ** 20


def grab_big(model, **kwargs):
    return np.arange(3000, dtype=np.float64) + float(next(model.parameters()).detach().sum())


def test_an_array_too_big_for_a_row_lives_beside_the_store_and_reads_back(tmp_path, monkeypatch):
    """SQLite refuses a blob past its length limit (1 GB by default; lowered here to 20 kB): such an array goes to
    a file of its own beside the store, read back transparently; a job written again replaces its file."""
    monkeypatch.setattr(rows, "EXTERNAL_BYTES", 10_000)
    path = tmp_path / "expt"
    st = Store(path)
    st._conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 20_000)
    cfg = dict(TINY, otherreturns={"big": grab_big}, ONLYTHRESHOLDS=False, EVAL_EVERY=3)
    res = main([[8, 10]], ["WIDTH"], cfg, dict(base_bfn=bfn), executor="inprocess", store=st, progress=False)
    assert [r["status"] for r in res.records] == ["not_reached"] * 2
    files = sorted((path / "results.db-arrays").rglob("*.npy"))
    assert len(files) == 2
    loaded = modelscape.load(path)
    for mine, back in zip(res.records, loaded.records):
        np.testing.assert_array_equal(back["grabs"]["big"], mine["grabs"]["big"])
    main([[8, 10]], ["WIDTH"], dict(cfg, RESUME=False), dict(base_bfn=bfn), executor="inprocess", store=st,
         progress=False)
    again = sorted((path / "results.db-arrays").rglob("*.npy"))
    assert len(again) == 2 and not set(again) & set(files)  # the old files went with the old rows
    st._conn.execute("UPDATE jobs SET layout = replace(layout, 'results.db-arrays', '../../x')")
    st.close()
    with Store(path, readonly=True) as ro, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ro.records() == [] and all("outside the store" in why or "not a plain path" in why
                                          for why in ro.damaged.values())


@pytest.mark.parametrize("name", ["../../x", "", ".", "..", "a/b", "a\nb", "/abs"])
def test_an_expt_name_that_is_not_one_plain_name_fails_before_anything(tmp_path, name):
    TRAINED.clear()
    cfg = dict(TINY, RESULTS_DIR=str(tmp_path / "results"), EXPT_NAME=name)
    with pytest.raises(ConfigError, match="EXPT_NAME"):
        main([[8]], ["WIDTH"], cfg, dict(base_bfn=bfn), executor="inprocess", progress=False)
    assert TRAINED == [] and not (tmp_path / "results").exists() and not (tmp_path / "x").exists()


def test_a_job_id_with_dots_never_deletes_outside_the_store(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    cfg = dict(TINY, RESULTS_DIR=str(tmp_path / "r"), EXPT_NAME="e", JOB_ID="../../../victim", CHECKPOINTS=["final"])
    with pytest.raises(ConfigError, match="JOB_ID"):
        run_config(cfg, dict(base_bfn=bfn))
    assert (victim / "keep.txt").read_text() == "precious"
