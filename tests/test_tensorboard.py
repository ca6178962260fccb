"""TENSORBOARD=True: each job's run, read back with tensorboard's own reader, holds the record's numbers (that importing
modelscape does not import tensorboard is checked in test_optional_backends.py)."""
import glob
import os
import sys

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

from modelscape.backend import fused, tensorboard as tb
from modelscape.backend.job import prepare_job, run_config, train_prepared
from modelscape.backend.job_iterator import main
from modelscape.backend.trainloop import LoopObserver
from modelscape.config import ConfigError
from modelscape.data import powerlaw_bfn

BFN = dict(base_bfn=powerlaw_bfn, dim=8)


def out_scale(model, **kwargs):
    """A number grab."""
    return float(model.output_layer.weight.detach().norm())


def first_biases(model, **kwargs):
    """A vector grab (written as a histogram)."""
    return model.input_layer.bias[:4].detach()


def config(tmp_path, **kw):
    c = dict(PARAMETERIZATION="mup", WIDTH=16, DEPTH=2, MAX_ITER=40, N_SAMPLES=32, N_TEST=64, LR=0.2,
             LOSS_CHECKPOINTS=[0.9, 1e-6], EVAL_EVERY=10, ONLYTHRESHOLDS=False, TENSORBOARD=True,
             RESULTS_DIR=str(tmp_path), EXPT_NAME="tb", otherreturns={"scale": out_scale, "biases": first_biases})
    c.update(kw)
    return c


def read_run(directory):
    """``(scalars {tag: {step: value}}, histogram tags {tag: steps}, hparams plugin data {tag: HParamsPluginData})``
    of one run folder, through TensorBoard's EventAccumulator."""
    acc = EventAccumulator(directory, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: {e.step: e.value for e in acc.Scalars(t)} for t in tags["scalars"]}
    histograms = {t: [e.step for e in acc.Histograms(t)] for t in tags["histograms"]}
    hparams = {}
    for tag, content in acc.PluginTagToContent(metadata.PLUGIN_NAME).items():
        data = plugin_data_pb2.HParamsPluginData()
        data.ParseFromString(content)
        hparams[tag] = data
    return scalars, histograms, hparams


def f32(values):
    return np.asarray(values, dtype=np.float32)


def check_run(record, directory, cfg):
    """The run in ``directory`` holds ``record``'s curves, grabs, hparams and final metrics."""
    scalars, histograms, hp = read_run(directory)
    steps = record["steps"]
    assert sorted(scalars["train/loss_ema"]) == list(range(steps))
    np.testing.assert_array_equal(f32(list(scalars["train/loss_ema"].values())), f32(record["train_curve"]))
    np.testing.assert_array_equal(f32([scalars["train/loss"][s] for s in range(steps)]), f32(record["train_raw"]))
    eval_steps = [int(s) for s in record["eval_steps"]]
    assert sorted(scalars["test/loss"]) == eval_steps
    np.testing.assert_array_equal(f32([scalars["test/loss"][s] for s in eval_steps]), f32(record["test_curve"]))
    np.testing.assert_array_equal(f32([scalars["grab/scale"][s] for s in eval_steps]), f32(record["grabs"]["scale"]))
    assert histograms["grab/biases"] == eval_steps

    start = hp[metadata.SESSION_START_INFO_TAG].session_start_info.hparams
    for name, value in record["axes"].items():
        assert start[name].number_value == value
    assert start["PARAMETERIZATION"].string_value == "mup" and start["DEPTH"].number_value == 2
    assert "WIDTH" in start and "LR" in start
    end = hp[metadata.SESSION_END_INFO_TAG].session_end_info
    assert end.status == api_pb2.STATUS_SUCCESS
    assert scalars["final/steps"] == {steps: steps}
    assert scalars["final/train_loss"][steps] == pytest.approx(record["train_loss"], rel=1e-6)
    assert scalars["final/test_loss"][steps] == pytest.approx(record["test_loss"], rel=1e-6)
    assert scalars["status/done"][steps] == float(record["status"] == "done")
    reached, never = record["timekeys"]
    assert scalars[f"timekey/{cfg['LOSS_CHECKPOINTS'][0]!r}"][steps] == reached  # 0.9: reached early
    assert np.isnan(never) and f"timekey/{cfg['LOSS_CHECKPOINTS'][1]!r}" not in scalars  # never: a blank cell


def check_sweep(tmp_path, res, cfg, axes):
    root = os.path.join(str(tmp_path), "tb", "tensorboard")
    runs = sorted(os.listdir(root))
    assert len([r for r in runs if os.path.isdir(os.path.join(root, r))]) == len(res.records) == 4
    for record in res.records:
        name = tb.run_name(record["axes"], record["job_id"])
        assert name.startswith(",".join(f"{k}={v}" for k, v in record["axes"].items()) + ",id=")
        check_run(record, os.path.join(root, name), cfg)
    experiment = tb.read_experiment(root)
    infos = {i.name: i for i in experiment.hparam_infos}
    for name, values in axes.items():
        assert [v.number_value for v in infos[name].domain_discrete.values] == sorted(values)
        assert infos[name].differs
    assert not infos["DEPTH"].differs
    assert [m.name.tag for m in experiment.metric_infos] == tb.metric_tags(cfg["LOSS_CHECKPOINTS"])


def test_sweep_writes_one_run_per_job_with_the_records_numbers(tmp_path, one_torch_thread):
    cfg = config(tmp_path, FUSE="off")
    axes = {"WIDTH": [16, 24], "LR": [0.05, 0.2]}
    res = main(list(axes.values()), list(axes), cfg, BFN, executor="inprocess", progress=False)
    check_sweep(tmp_path, res, cfg, axes)


def test_fused_members_write_the_same_runs(tmp_path, one_torch_thread, monkeypatch):
    groups = []
    train_fused = fused.train_fused
    monkeypatch.setattr(fused, "train_fused", lambda jobs: groups.append(len(jobs)) or train_fused(jobs))
    cfg = config(tmp_path, FUSE="auto")
    axes = {"LR": [0.05, 0.2], "trial": [0, 1]}
    res = main(list(axes.values()), list(axes), cfg, BFN, executor="inprocess", progress=False)
    assert groups == [4]
    check_sweep(tmp_path, res, cfg, axes)


def test_without_curves_the_ema_is_written_at_each_read_back(tmp_path, one_torch_thread):
    """run_config alone (no store, no JOB_ID): a run of its own; the EMA per read-back (every step on a CPU)
    equals the curve the same job records with ONLYTHRESHOLDS=False."""
    cfg = config(tmp_path, ONLYTHRESHOLDS=True, otherreturns={"scale": out_scale})
    record = run_config(cfg, BFN, axes={"trial": 0})
    curve = run_config(dict(cfg, ONLYTHRESHOLDS=False, TENSORBOARD=False), BFN, axes={"trial": 0})["train_curve"]
    (directory,) = glob.glob(os.path.join(str(tmp_path), "tb", "tensorboard", "trial=0,id=*"))
    scalars, _, hp = read_run(directory)
    steps = record["steps"]
    assert sorted(scalars["train/loss_ema"]) == list(range(steps)) and "train/loss" not in scalars
    np.testing.assert_allclose(f32(list(scalars["train/loss_ema"].values())), f32(curve), rtol=1e-6)
    assert scalars["test/loss"] == {steps: pytest.approx(record["test_loss"], rel=1e-6)}
    assert scalars["grab/scale"] == {steps: pytest.approx(record["grabs"]["scale"], rel=1e-6)}
    assert hp[metadata.SESSION_START_INFO_TAG].session_start_info.hparams["trial"].number_value == 0
    run_config(cfg, BFN, axes={"trial": 0})  # again: a run of its own, beside the first
    assert len(glob.glob(os.path.join(str(tmp_path), "tb", "tensorboard", "trial=0,id=*"))) == 2


def test_a_running_job_is_flushed_before_it_ends(tmp_path, one_torch_thread, monkeypatch):
    monkeypatch.setattr(tb, "FLUSH_SECS", 0.0)  # flush at every read-back

    class Peek(LoopObserver):
        def __init__(self, directory):
            self.directory, self.seen = directory, {}

        def after_sync(self, step, tracker, evals):
            if step in (5, 25):
                self.seen[step] = sorted(read_run(self.directory)[0]["train/loss_ema"])

    job = prepare_job(config(tmp_path, JOB_ID="0123456789abcdef"), BFN, axes={"LR": 0.2})
    (observer,) = job.observers
    assert observer.directory.endswith(os.path.join("tensorboard", "LR=0.2,id=01234567"))
    job.observers.append(Peek(observer.directory))
    record = train_prepared(job)
    assert job.observers[1].seen == {5: list(range(5)), 25: list(range(25))}
    # written piece by piece at the read-backs, the EMA continues across pieces: the record's curve
    ema = read_run(observer.directory)[0]["train/loss_ema"]
    np.testing.assert_array_equal(f32([ema[s] for s in range(record["steps"])]), f32(record["train_curve"]))


def test_experiment_summary_merges_with_an_earlier_sweeps(tmp_path):
    tb.write_experiment(str(tmp_path), [{"WIDTH": 16.0, "OPTIMIZER": "SGD"}, {"WIDTH": 32.0, "OPTIMIZER": "SGD"}],
                        [0.5])
    tb.write_experiment(str(tmp_path), [{"WIDTH": 64.0, "OPTIMIZER": "Adam", "GAMMA": 2.0}], [0.1])
    assert len(glob.glob(os.path.join(str(tmp_path), "events.out.tfevents.*"))) == 1  # replaced, not added
    experiment = tb.read_experiment(str(tmp_path))
    infos = {i.name: [v.number_value or v.string_value for v in i.domain_discrete.values]
             for i in experiment.hparam_infos}
    assert infos == {"WIDTH": [16.0, 32.0, 64.0], "OPTIMIZER": ["Adam", "SGD"], "GAMMA": [2.0]}
    assert {"timekey/0.5", "timekey/0.1", "final/train_loss"} <= {m.name.tag for m in experiment.metric_infos}


def test_run_names_are_paths_and_unique():
    name = tb.run_name({"MODEL": "a/b c", "LR": np.float64(0.01), "trial": 0}, "f" * 64)
    assert name == "MODEL=a_b_c,LR=0.01,trial=0,id=ffffffff"
    assert tb.run_name({}, "") != tb.run_name({}, "")


def test_missing_tensorboard_is_one_config_error_before_any_job(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now raises ImportError
    cfg = config(tmp_path)
    with pytest.raises(ConfigError, match=r"TENSORBOARD=True needs the package 'tensorboard'.*"
                                          r"pip install -e '\.\[tensorboard\]'"):
        main([[0.1, 0.2]], ["LR"], cfg, BFN, executor="inprocess", progress=False)
    assert not os.path.exists(os.path.join(str(tmp_path), "tb"))  # no store, no run: nothing ran
    with pytest.raises(ConfigError, match="modelscape"):
        run_config(cfg, BFN)
    main([[0.1]], ["LR"], dict(cfg, TENSORBOARD=False, MAX_ITER=2), BFN, executor="inprocess", progress=False)


def test_long_jobs_write_every_kth_step_and_the_last(tmp_path, one_torch_thread, monkeypatch):
    monkeypatch.setattr(tb, "MAX_POINTS", 10)
    cfg = config(tmp_path, MAX_ITER=35, EVAL_EVERY=0, LOSS_CHECKPOINTS=[-1.0], otherreturns={})
    record = run_config(cfg, BFN, axes={"trial": 0})
    (directory,) = glob.glob(os.path.join(str(tmp_path), "tb", "tensorboard", "trial=0,id=*"))
    ema = read_run(directory)[0]["train/loss_ema"]
    assert sorted(ema) == list(range(0, 35, 4)) + [34]  # every ceil(35 / 10)-th step, and the last
    np.testing.assert_array_equal(f32([ema[s] for s in sorted(ema)]), f32(record["train_curve"][sorted(ema)]))


def test_runs_and_summary_go_beside_a_store_given_by_path(tmp_path, one_torch_thread):
    store = tmp_path / "elsewhere" / "results.db"
    main([[0.1, 0.2]], ["LR"], config(tmp_path, MAX_ITER=5), BFN, executor="inprocess", progress=False,
         store=str(store))
    runs = sorted(os.path.basename(d) for d in glob.glob(str(tmp_path / "elsewhere" / "tensorboard" / "LR=*")))
    assert [r.split(",id=")[0] for r in runs] == ["LR=0.1", "LR=0.2"]
    assert glob.glob(str(tmp_path / "elsewhere" / "tensorboard" / "events.out.tfevents*"))  # the sweep's summary
    assert not os.path.exists(tmp_path / "tb")  # not under RESULTS_DIR/EXPT_NAME
