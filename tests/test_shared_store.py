"""A store from someone else runs no code: checkpoints are built from data (no pickle), only from classes this
process chose to import, from files inside the store; store files in one folder keep their own checkpoints; a
driver asking for checkpoints does not take another driver's record that lacks them."""
import json
import os
import pickle
import shutil

import pytest
import torch

from modelscape.backend import checkpoints
from modelscape.backend.checkpoints import CheckpointError
from modelscape.backend.executors import InProcessExecutor
from modelscape.backend.job import prepare_job
from modelscape.backend.job_iterator import SweepFailed, _identities, expand_jobs, main
from modelscape.backend.store import Store
from modelscape.backend.sweep import run_jobs
from modelscape.config import canonicalize

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAINED = []
TINY = dict(WIDTH=8, DEPTH=2, N_SAMPLES=16, N_TEST=32, MAX_ITER=6, LOSS_CHECKPOINTS=[0.01], LR=0.05)
PROBE = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))


def bfn(bsz, gen, X=None, y=None, WIDTH=None):
    if bsz == TINY["N_SAMPLES"] and X is None:
        TRAINED.append(WIDTH)
    w = torch.tensor([1.0, -0.5, 0.25, 0.5], device=gen.device)

    def batch(step):
        x = torch.randn(bsz, 4, generator=gen, device=gen.device)
        return x, x @ w
    return batch


def sweep(store, widths=(8,), **cfg):
    TRAINED.clear()
    return main([list(widths)], ["WIDTH"], dict(TINY, **cfg), dict(base_bfn=bfn), executor="inprocess", store=store,
                progress=False)


class Planted:
    """What a stranger plants in a store: unpickling it touches a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_planted_pickle_never_runs(tmp_path):
    res = sweep(tmp_path / "expt", CHECKPOINTS=["final"])
    folder = tmp_path / "expt" / "checkpoints" / res.records[0]["job_id"]
    marker = tmp_path / "pwned"
    (folder / "model.pkl").write_bytes(pickle.dumps(Planted(str(marker))))
    res.checkpoint(step="final")  # beside a description, a pickle is ignored
    os.remove(folder / "model.json")  # a store as modelscape 0.3 wrote it: only a pickle describes the model
    with pytest.raises(CheckpointError, match="modelscape 0.3.*re-run the sweep with the same CHECKPOINTS"):
        res.checkpoint(step="final")
    assert not marker.exists()
    # and such a job is not taken as having its checkpoints: the next run writes them again
    assert not checkpoints.satisfied(res.records[0], dict(TINY, CHECKPOINTS=["final"]), tmp_path / "expt")


def test_paths_in_a_record_stay_inside_the_store(tmp_path):
    res = sweep(tmp_path / "expt", CHECKPOINTS=["final"])
    record = res.records[0]
    outside = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "expt" / "checkpoints" / record["job_id"], outside)
    entry = record["checkpoints"][0]
    for bad in ("../../../elsewhere/step-6.safetensors", str(outside / "step-6.safetensors")):
        entry["file"] = bad
        with pytest.raises(CheckpointError, match="not inside the store"):
            res.checkpoint(step="final")
    (tmp_path / "expt" / "link").symlink_to(outside)  # a link inside the store leading out of it
    entry["file"] = "link/step-6.safetensors"
    with pytest.raises(CheckpointError, match="not inside the store"):
        res.checkpoint(step="final")


def _describe(tmp_path, res, edit):
    folder = tmp_path / "expt" / "checkpoints" / res.records[0]["job_id"]
    desc = json.loads((folder / "model.json").read_text())
    edit(desc)
    (folder / "model.json").write_text(json.dumps(desc))


@pytest.mark.parametrize("path, message", [
    ("os:system", "not a Module subclass"),  # callable, importable, and no model
    ("not_imported_pkg_xyz.models:Net", "has not imported"),  # never imported on a record's word
    ("_modelscape_user_0123456789ab:Net", "came from a file"),
    ("__main__:Nowhere", "not found here"),
])
def test_a_model_class_is_only_what_this_process_chose(tmp_path, path, message):
    res = sweep(tmp_path / "expt", CHECKPOINTS=["final"])
    _describe(tmp_path, res, lambda d: d["model"].__setitem__("class", path))
    with pytest.raises(CheckpointError, match=message):
        res.checkpoint(step="final")
    from modelscape.model import MLP
    assert isinstance(res.checkpoint(step="final", model_class=MLP).model, MLP)  # the caller's word is enough


def test_a_constructor_argument_from_your_own_code_must_be_passed(tmp_path):
    res = sweep(tmp_path / "expt", CHECKPOINTS=["final"])
    _describe(tmp_path, res, lambda d: d["model"]["kwargs"]["dict"].append(["act", {"callable": "shutil:rmtree"}]))
    with pytest.raises(CheckpointError, match="model_kwargs"):
        res.checkpoint(step="final")


def test_a_checkpoint_loads_with_the_weights_it_saved_and_its_multipliers(tmp_path):
    res = sweep(tmp_path / "expt", CHECKPOINTS=[3, "final"], GAMMA=2.0, PARAMETERIZATION="mup")
    job = prepare_job(dict(TINY, GAMMA=2.0, PARAMETERIZATION="mup", WIDTH=8),
                      dict(base_bfn=bfn), axes={"WIDTH": 8})
    net = res.checkpoint(step=3)
    mults = [(getattr(m, "_mup_mult", None), getattr(m, "_mup_gamma", None)) for m in net.model.modules()]
    assert mults == [(getattr(m, "_mup_mult", None), getattr(m, "_mup_gamma", None)) for m in job.model.modules()]
    assert any(g == 2.0 for _, g in mults)
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    res.checkpoint(step="final")
    assert torch.equal(torch.random.get_rng_state(), state)  # loading draws nothing from the caller's RNG


def test_two_store_files_in_one_folder_keep_their_own_checkpoints(tmp_path):
    a = sweep(tmp_path / "d" / "expA.db", CHECKPOINTS=["final"])
    b = sweep(tmp_path / "d" / "expB.db", CHECKPOINTS=["final"], LR=0.1)
    job_a = a.records[0]["job_id"]
    assert (tmp_path / "d" / "expA.db-checkpoints" / job_a / "model.json").exists()
    assert (tmp_path / "d" / "expB.db-checkpoints" / b.records[0]["job_id"]).is_dir()
    before = sorted(p.stat().st_mtime_ns for p in (tmp_path / "d" / "expA.db-checkpoints").rglob("*"))
    sweep(tmp_path / "d" / "expB.db", CHECKPOINTS=["final"], LR=0.1, RESUME=False)  # B trains again
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "d" / "expA.db-checkpoints").rglob("*")) == before
    with torch.no_grad():
        assert torch.isfinite(a.checkpoint(step="final")(PROBE)).all()
    assert checkpoints.disk_use(tmp_path / "d", "expA.db")[0] == 3 and checkpoints.disk_use(tmp_path / "d")[0] == 0


def test_a_record_stored_meanwhile_without_the_checkpoints_asked_here_trains_again(tmp_path):
    """Two drivers on one store, one with CHECKPOINTS and one without: a job the other stored while this one ran
    lacks this one's checkpoints, so this one trains it (and keeps them) instead of taking that record."""
    store = tmp_path / "expt"
    sweep(store, widths=(8, 12))  # the other driver: no checkpoints
    assert sorted(TRAINED) == [8, 12]
    cfg = canonicalize(dict(TINY, CHECKPOINTS=["final"]))
    jobs = expand_jobs(["WIDTH"], [[8, 12]], cfg, {"WIDTH": "WIDTH"})
    bfn_config = dict(base_bfn=bfn)
    TRAINED.clear()
    with Store(store) as st:
        ids, codes = _identities(st, jobs, bfn_config)
        # since=0: both records count as written by another driver while this one runs
        out = dict(run_jobs(InProcessExecutor("cpu"), jobs, ids, codes, [0, 1], st, (cfg, bfn_config), 0.0, 30.0))
    assert sorted(TRAINED) == [8, 12]
    assert all(r.get("checkpoints") for r in out.values())


class Scaled(torch.nn.Module):
    def __init__(self, d_in, d_out, WIDTH, offset=None, act=torch.tanh, note=None):
        super().__init__()
        self.note = note
        self.body = torch.nn.Sequential(torch.nn.Linear(d_in, WIDTH), torch.nn.Linear(WIDTH, d_out))
        self.act, self.offset = act, offset

    def forward(self, x):
        out = self.body[1](self.act(self.body[0](x)))
        return out if self.offset is None else out + self.offset


def test_constructor_arguments_travel_as_data_tensors_included(tmp_path, job_device):
    offset = torch.tensor([0.25], device=job_device)  # beside the job's model: Scaled adds it to its output
    res = sweep(tmp_path / "expt", CHECKPOINTS=["final"], MODEL=Scaled, offset=offset, act=torch.sigmoid,
                CENTER=False)
    model = res.checkpoint(step="final")  # Scaled lives in this test module, which this process imported
    assert isinstance(model, Scaled) and model.act is torch.sigmoid and torch.equal(model.offset.cpu(), offset.cpu())


def test_an_argument_that_is_not_data_fails_before_training(tmp_path):
    with pytest.raises(SweepFailed) as err:
        sweep(tmp_path / "expt", CHECKPOINTS=["final"], MODEL=Scaled, note=object(), CENTER=False)
    record = err.value.result.records[0]
    assert record["steps"] == 0 and "'note'" in record["error"] and "cannot describe" in record["error"]


def test_a_full_disk_under_checkpoints_costs_the_checkpoints_not_the_result(tmp_path, monkeypatch):
    from modelscape.backend import checkpointer
    real, calls = checkpointer.write_tensors, []

    def write_tensors(path, *args):
        calls.append(path)
        if len(calls) > 1:  # step 0 is written, then the disk is full
            raise OSError(28, "No space left on device")
        return real(path, *args)

    monkeypatch.setattr(checkpointer, "write_tensors", write_tensors)
    with pytest.warns(RuntimeWarning, match=r"checkpoints \(writing .*No space left on device.*keeps its result"):
        res = sweep(tmp_path / "expt", CHECKPOINTS=[0, 3, "final"])
    record = res.records[0]
    assert record["status"] == "not_reached" and record["steps"] == TINY["MAX_ITER"]
    monkeypatch.setattr(checkpointer, "write_tensors", real)
    res = sweep(tmp_path / "expt", CHECKPOINTS=[0, 3, "final"])  # its checkpoints are missing: it trains again
    assert TRAINED == [8] and [e["label"] for e in res.records[0]["checkpoints"]] == ["step 0", "step 3", "final"]
