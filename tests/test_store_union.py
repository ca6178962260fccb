"""A store directory read as one store: results.db plus the shard files other writers leave beside it."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_store import synth_record  # noqa: E402

from modelscape import cli  # noqa: E402
from modelscape.backend.store import Store, StoreUnion, load, shard_path  # noqa: E402

WIDTHS = [8, 16, 32, 64]


@pytest.fixture
def expt(tmp_path):
    """results.db records a 4-job sweep and holds job 0 (done) and job 1 (failed); shard a holds job 1 done
    (a re-run) and job 2 failed; shard b holds job 2 failed, newer. Job 3 is nowhere."""
    recs = [synth_record(k, axes={"WIDTH": w}) for k, w in enumerate(WIDTHS)]
    ids = [r["job_id"] for r in recs]
    d = tmp_path / "expt"
    with Store(d) as st:
        st.begin_sweep(["WIDTH"], [WIDTHS], ids)
        st.write(recs[0])
        st.write(recs[1] | {"status": "failed", "error": "boom"})
    with Store(shard_path(d, "a")) as st:
        st.write(recs[1])
        st.write(recs[2] | {"status": "failed", "error": "first"})
    with Store(shard_path(d, "b")) as st:
        st.write(recs[2] | {"status": "failed", "error": "second"})
    return d, ids


def test_union_prefers_done_then_newest_and_shows_each_job_once(expt):
    d, ids = expt
    with StoreUnion(d) as u:
        assert len(u.stores) == 3
        assert u.done_ids() == {ids[0], ids[1]}
        assert u.status_counts() == {"done": 2, "failed": 1}
        assert u.status_counts(u.latest_sweep()) == {"done": 2, "failed": 1, "missing": 1}
        recs = u.records()
        assert sorted(r["job_id"] for r in recs) == sorted(ids[:3])
        by_id = {r["job_id"]: r for r in recs}
        assert by_id[ids[1]]["status"] == "done"  # the shard's done record beats results.db's failed one
        assert by_id[ids[2]]["error"] == "second"  # of two failed records, the newer
    res = load(d)
    assert [r["axes"]["WIDTH"] for r in res.records] == WIDTHS[:3]
    with Store(d / "results.db", readonly=True) as alone:  # the file by itself knows only its own rows
        assert alone.done_ids() == {ids[0]}


def test_cli_reads_the_directory_as_one(expt, capsys):
    d, _ = expt
    assert cli.main(["ls", str(d)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["experiment", "jobs", "done", "failed", "queued", "sweeps"]
    assert out[1].split() == ["expt", "4", "2", "1", "1", "1"]  # the sweep's fourth job is not stored yet
    assert cli.main(["show", str(d)]) == 0
    rows = capsys.readouterr().out.splitlines()
    status = {int(ln.split()[0]): ln.split()[1] for ln in rows[1:5]}
    assert status == {8: "done", 16: "done", 32: "failed", 64: "queued"}


def test_a_shard_file_being_created_is_skipped_with_a_warning(expt):
    d, ids = expt
    (d / "shard-new.db").write_bytes(b"")  # an array task has just created its file
    with pytest.warns(UserWarning, match="shard file shard-new.db is skipped"):
        with StoreUnion(d) as u:
            assert len(u.stores) == 3 and u.done_ids() == {ids[0], ids[1]}
