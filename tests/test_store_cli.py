"""The ``modelscape`` command: ls, show and export print and write the stored rows."""
import csv
import os
import subprocess
import sys

import numpy as np
import pytest
from deadlines import scaled  # noqa: E402  (deadlines stretched on a busy machine)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_store import ROOT, synth_record  # noqa: E402

from modelscape import cli  # noqa: E402
from modelscape.backend.store import Store  # noqa: E402

WIDTHS, LRS = [16, 32, 64], [0.1, 0.01]


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    """RESULTS_DIR with two experiments: ``alpha`` (a WIDTH x LR sweep, one job failed, one not stored yet,
    and an older sweep) and ``beta`` (two jobs, one sweep)."""
    root = tmp_path_factory.mktemp("results")
    recs, ids = [], []
    for k, (w, lr) in enumerate((w, lr) for w in WIDTHS for lr in LRS):
        status = "failed" if (w, lr) == (32, 0.01) else "not_reached" if w == 64 else "done"
        r = synth_record(k, status=status, axes={"WIDTH": w, "LR": lr})
        recs.append(r)
        ids.append(r["job_id"])
    with Store(root / "alpha") as st:
        st.begin_sweep(["WIDTH"], [[8]], ["old"])
        st.write(synth_record(50) | {"job_id": "old", "axes": {"WIDTH": 8}})
        st.begin_sweep(["WIDTH", "LR"], [WIDTHS, LRS], ids)
        for r in recs[:-1]:  # (64, 0.01) is still running
            st.write(r)
    with Store(root / "beta") as st:
        b = [synth_record(60 + i, axes={"trial": i}) for i in range(2)]
        st.begin_sweep(["trial"], [[0, 1]], [r["job_id"] for r in b])
        for r in b:
            st.write(r)
    (root / "notes.txt").write_text("not an experiment")
    return root, {(r["axes"]["WIDTH"], r["axes"]["LR"]): r for r in recs}


def run_cli(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_ls_lists_experiments_with_counts(capsys, results_dir):
    root, _ = results_dir
    code, out, err = run_cli(capsys, "ls", root)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["experiment", "jobs", "done", "not_reached", "failed", "queued", "sweeps"]
    # the old sweep's job counts too, and so does the job not stored yet, as show lists it
    assert lines[1].split() == ["alpha", "7", "4", "1", "1", "1", "2"]
    assert lines[2].split() == ["beta", "2", "2", "0", "0", "0", "1"]
    assert len(lines) == 3
    assert len({len(ln) for ln in lines}) == 1  # numbers right-aligned under their headers
    for one_store in (root / "beta", root / "beta" / "results.db"):
        code, out, _ = run_cli(capsys, "ls", one_store)
        assert code == 0 and [ln.split()[:2] for ln in out.splitlines()[1:]] == [["beta", "2"]]
    (root / "gamma").mkdir(exist_ok=True)
    (root / "gamma" / "results.db").write_text("scribbles")
    try:
        code, out, err = run_cli(capsys, "ls", root)  # a bad store is named, the others still listed
    finally:
        (root / "gamma" / "results.db").unlink()
    assert code == 1 and str(root / "gamma" / "results.db") in err
    assert [ln.split()[0] for ln in out.splitlines()] == ["experiment", "alpha", "beta"]


def test_show_prints_one_aligned_row_per_job(capsys, results_dir):
    root, recs = results_dir
    code, out, err = run_cli(capsys, "show", root / "alpha")
    assert code == 0, err
    lines = out.splitlines()
    header = lines[0].split()
    assert header == ["WIDTH", "LR", "status", "timekeys", "train_loss", "test_loss", "steps", "wall_time", "error"]
    rows = [ln.split(None, 8) for ln in lines[1:]]
    assert [(int(r[0]), float(r[1]), r[2]) for r in rows] == [
        (16, 0.1, "done"), (16, 0.01, "done"), (32, 0.1, "done"), (32, 0.01, "failed"),
        (64, 0.1, "not_reached"), (64, 0.01, "queued")]
    r = recs[(32, 0.1)]
    assert rows[2][3] == f"{int(r['timekeys'][0])},{int(r['timekeys'][1])}"
    assert float(rows[2][4]) == pytest.approx(r["train_loss"], rel=1e-3)
    assert float(rows[2][5]) == pytest.approx(r["test_loss"], rel=1e-3)
    assert int(rows[2][6]) == r["steps"] and rows[2][7] == f"{r['wall_time']:.2f}s"
    assert rows[4][3] == f"{int(recs[(64, 0.1)]['timekeys'][0])},-"  # second threshold never crossed
    assert rows[3][2:] == ["failed", "-", "nan", "nan", "0", "0.25s", "ValueError: boom 3"]
    # columns line up: each header starts where its column starts
    col = lines[0].index("status")
    assert all(ln[col:].split()[0] in ("done", "failed", "not_reached", "queued") for ln in lines[1:])


def test_show_filters(capsys, results_dir):
    root, _ = results_dir
    code, out, _ = run_cli(capsys, "show", root / "alpha", "--status", "failed")
    assert code == 0
    assert [ln.split()[:3] for ln in out.splitlines()[1:]] == [["32", "0.01", "failed"]]
    code, out, _ = run_cli(capsys, "show", root / "alpha", "--where", "LR=0.1", "--where", "WIDTH=64")
    rows = out.splitlines()[1:]
    assert [ln.split()[:3] for ln in rows] == [["64", "0.1", "not_reached"]]
    assert "error" not in out.splitlines()[0]  # no failed job shown, no error column
    code, out, _ = run_cli(capsys, "show", root / "alpha", "--sweep", "1")
    assert [ln.split()[:2] for ln in out.splitlines()] == [["WIDTH", "status"], ["8", "done"]]


def test_cli_errors(capsys, results_dir, tmp_path):
    root, _ = results_dir
    code, _, err = run_cli(capsys, "show", root / "alpha", "--where", "DEPTH=2")
    assert code == 2 and "no axis 'DEPTH'" in err
    code, _, err = run_cli(capsys, "show", tmp_path / "missing")
    assert code == 1 and "no such file" in err and str(tmp_path / "missing") in err
    code, _, err = run_cli(capsys, "show", root / "notes.txt")
    assert code == 1 and "not a modelscape results store" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "ls", tmp_path)
    assert code == 1 and "no results stores" in err
    code, _, err = run_cli(capsys, "show", root / "alpha", "--sweep", "9")
    assert code == 1 and "no sweep 9" in err
    with pytest.raises(SystemExit) as e:
        cli.main(["export", str(root / "alpha")])  # neither --csv nor --netcdf
    assert e.value.code == 2


def test_export_csv(capsys, results_dir, tmp_path):
    root, recs = results_dir
    out_file = tmp_path / "alpha.csv"
    code, _, err = run_cli(capsys, "export", root / "alpha", "--csv", out_file)
    assert code == 0, err
    with open(out_file, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 5
    assert list(rows[0])[:4] == ["job_id", "WIDTH", "LR", "status"]
    # the timekey columns are named by their thresholds (the records' LOSS_CHECKPOINTS are 0.5 and 0.1)
    assert [k for k in rows[0] if k.startswith("timekey")] == ["timekey_0.5", "timekey_0.1"]
    assert {"train_loss", "test_loss", "steps", "wall_time"} <= set(rows[0])
    for row in rows:
        r = recs[(int(row["WIDTH"]), float(row["LR"]))]
        assert row["job_id"] == r["job_id"] and row["status"] == r["status"]
        if r["status"] == "failed":
            assert row["error"] == "ValueError: boom 3" and row["timekey_0.5"] == "nan"
            continue
        assert float(row["train_loss"]) == r["train_loss"] and float(row["test_loss"]) == r["test_loss"]
        np.testing.assert_array_equal([float(row["timekey_0.5"]), float(row["timekey_0.1"])], r["timekeys"])


def test_export_netcdf(capsys, results_dir, tmp_path, monkeypatch):
    import xarray as xr
    root, recs = results_dir
    assert cli.netcdf_engine() is not None, "the test environment should have scipy (a netCDF engine)"
    out_file = tmp_path / "alpha.nc"
    code, _, err = run_cli(capsys, "export", root / "alpha", "--netcdf", out_file)
    assert code == 0, err
    with xr.open_dataset(out_file) as ds:
        ds = ds.load()
    r = recs[(16, 0.01)]
    assert ds.test_loss.sel(WIDTH=16, LR=0.01).item() == r["test_loss"]
    np.testing.assert_array_equal(ds.train_curve.sel(WIDTH=16, LR=0.01).values, r["train_curve"])
    np.testing.assert_array_equal(ds.grab_norms.sel(WIDTH=16, LR=0.01).values, r["grabs"]["norms"])
    assert str(ds.status.sel(WIDTH=32, LR=0.01).item()) == "failed"

    monkeypatch.setattr(cli, "netcdf_engine", lambda: None)
    code, _, err = run_cli(capsys, "export", root / "alpha", "--netcdf", tmp_path / "x.nc")
    assert code == 1 and "pip install scipy" in err and not (tmp_path / "x.nc").exists()


def test_python_dash_m(results_dir):
    root, _ = results_dir
    p = subprocess.run([sys.executable, "-m", "modelscape.cli", "show", str(root / "beta")], capture_output=True,
                       text=True, timeout=scaled(60), cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert [ln.split()[:2] for ln in p.stdout.splitlines()] == [["trial", "status"], ["0", "done"], ["1", "done"]]


def test_export_csv_puts_each_timekey_under_its_threshold(capsys, tmp_path):
    """Jobs given different thresholds: one column per threshold (the union, largest first, as
    ``to_xarray``'s coordinate), each job's timekeys under theirs and NaN elsewhere."""
    a = synth_record(0, axes={"LR": 0.1})
    b = synth_record(1, axes={"LR": 0.2}) | {"thresholds": np.array([0.2]), "timekeys": np.array([7.0])}
    with Store(tmp_path / "mixed") as st:
        st.begin_sweep(["LR"], [[0.1, 0.2]], [a["job_id"], b["job_id"]])
        st.write(a)
        st.write(b)
    code, _, err = run_cli(capsys, "export", tmp_path / "mixed", "--csv", tmp_path / "mixed.csv")
    assert code == 0, err
    with open(tmp_path / "mixed.csv", newline="") as f:
        rows = {row["LR"]: row for row in csv.DictReader(f)}
    assert [k for k in rows["0.1"] if k.startswith("timekey")] == ["timekey_0.5", "timekey_0.2", "timekey_0.1"]
    assert [rows["0.2"][k] for k in ("timekey_0.5", "timekey_0.2", "timekey_0.1")] == ["nan", "7.0", "nan"]
    assert float(rows["0.1"]["timekey_0.5"]) == a["timekeys"][0] and rows["0.1"]["timekey_0.2"] == "nan"
