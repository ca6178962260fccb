"""What reports on a job or saves it (TensorBoard, live progress) never costs the job: should one fail (a full disk,
a broken pipe), the job warns once and trains on, and its result is kept. What changes the training (a step hook)
still fails its job."""
import errno
import warnings

import numpy as np
import pytest
import torch

from modelscape.backend import board
from modelscape.backend.job_iterator import SweepFailed, main
from modelscape.backend.store import Store

pytest.importorskip("tensorboard")
from tensorboard.summary.writer import record_writer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

TINY = dict(PARAMETERIZATION="sp", WIDTH=8, N_SAMPLES=16, N_TEST=16, MAX_ITER=30, LOSS_CHECKPOINTS=[1e-9], LR=0.05,
            ONLYTHRESHOLDS=False, EVAL_EVERY=5, SYNC_EVERY=1)


def bfn(bsz, gen, X=None, y=None, **kw):
    w = torch.tensor([1.0, -0.5, 0.25, 0.5], device=gen.device)

    def batch(step):
        x = torch.randn(bsz, 4, generator=gen, device=gen.device)
        return x, x @ w
    return batch


def sweep(store, lrs=(0.05, 0.1), trials=(0,), **cfg):
    return main([list(lrs), list(trials)], ["LR", "trial"], dict(TINY, **cfg), dict(base_bfn=bfn),
                executor="inprocess", store=store, progress=False)


def disk_full_after(monkeypatch, n_writes):
    """TensorBoard's event files fill the disk after ``n_writes`` records (in this process)."""
    real, count = record_writer.RecordWriter.write, [0]

    def write(self, data):
        count[0] += 1
        if count[0] > n_writes:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)
    monkeypatch.setattr(record_writer.RecordWriter, "write", write)


def observer_warnings(caught, what):
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning) and what in str(w.message)]


@pytest.mark.parametrize("fuse", ["off", "auto"])
def test_a_full_disk_under_tensorboard_costs_no_job(tmp_path, monkeypatch, fuse):
    clean = sweep(tmp_path / "clean", FUSE=fuse, TENSORBOARD=False)
    disk_full_after(monkeypatch, 40)
    store = tmp_path / "expt"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = sweep(store, FUSE=fuse, TENSORBOARD=True)
    said = observer_warnings(caught, "TensorBoard")
    assert len(said) == 2 and all("No space left on device" in m and "keeps its result" in m for m in said)
    for r, c in zip(res.records, clean.records):  # every job trained to its end, as without TensorBoard
        assert r["status"] == c["status"] == "not_reached" and r["steps"] == 30
        np.testing.assert_array_equal(r["train_raw"], c["train_raw"])
    with Store(store, readonly=True) as st:
        assert sorted(r["status"] for r in st.records()) == ["not_reached", "not_reached"]


def test_a_broken_live_progress_costs_no_job_and_warns_once_per_job(tmp_path, monkeypatch):
    def receive(self, msg):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")
    monkeypatch.setattr(board.LiveBoard, "receive", receive)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = sweep(tmp_path / "expt", lrs=(0.05, 0.1, 0.2), FUSE="off", LIVE_EVERY=0.001)
    assert [r["status"] for r in res.records] == ["not_reached"] * 3
    said = observer_warnings(caught, "live progress")
    assert len(said) == 3 and all("Broken pipe" in m for m in said)


def test_a_failing_step_hook_still_fails_its_job(tmp_path):
    def hook(model, opt, step, **kw):
        if step == 3:
            raise ValueError("the hook's own bug")

    with pytest.raises(SweepFailed) as failed:
        sweep(tmp_path / "expt", lrs=(0.05,), step_hooks={3: hook})
    (r,) = failed.value.result.records
    assert r["status"] == "failed" and "the hook's own bug" in r["error"]
