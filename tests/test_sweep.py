"""The sweep engine: the product and per-job configs, early errors, executors (in-process and a 2-worker pool)
giving identical numbers, notebook functions in the pool, failure isolation, OOM retry, shared data per trial.

Pool start-up costs seconds per worker, so one 2-worker pool (a module fixture) serves every pool sweep here.
Functions that the pool runs are defined by ``exec`` in a fresh namespace (as a notebook defines them): they
cannot be imported by the workers and must travel by value (cloudpickle).
"""
import copy
import json
import os
import textwrap

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from modelscape.backend.cli import base_args
from modelscape.backend.executors import InProcessExecutor, PoolExecutor
from modelscape.backend.job_iterator import main, summary
from modelscape.config import ConfigError
from modelscape.data import powerlaw_bfn

# What a researcher would type into notebook cells. ``exec`` below gives these functions no importable module.
NOTEBOOK = textwrap.dedent(r'''
    import json, os
    import torch

    def log(path, **entry):
        with open(path, "a") as f:
            f.write(json.dumps(dict(pid=os.getpid(), **entry)) + "\n")

    def nb_bfn(bsz, gen, X, y, WIDTH, logfile, dim=8, shift=0.0, trial=-1, crash_width=None):
        """Online linear teacher; logs the first batch it hands out; dies (os._exit) for WIDTH == crash_width."""
        if WIDTH == crash_width:
            os._exit(1)
        w = torch.linspace(-1.0, 1.0, dim, device=gen.device)

        def batch_fn(step):
            Xb = torch.randn(bsz, dim, generator=gen, device=gen.device)
            if step == 0:
                log(logfile, kind="batch0", bsz=bsz, WIDTH=WIDTH, shift=shift, trial=trial, xsum=float(Xb.sum()))
            return Xb, (Xb @ w).unsqueeze(1) + shift
        return batch_fn

    def nb_grab(model, X_tr, y_tr, X_te, y_te, opt, WIDTH, LR, N_SAMPLES, logfile, trial=-1, raise_width=None, **kw):
        """Logs the config it received; raises for WIDTH == raise_width."""
        if WIDTH == raise_width:
            raise ValueError(f"grab refuses WIDTH={WIDTH}")
        log(logfile, kind="grab", WIDTH=WIDTH, LR=LR, N_SAMPLES=N_SAMPLES, trial=trial, shift=kw.get("shift"),
            model_width=model.width, opt_lr=opt.param_groups[0]["lr"], n_tr=X_tr.shape[0])
        return [float(X_te.sum()), float(X_te[0, 0]), float(model.output_layer.weight.detach().sum())]

    def oom_bfn(bsz, gen, X, y, WIDTH, oom_dir, dim=8):
        """Raises a CUDA out-of-memory error for WIDTH 32 the first time only, for WIDTH 48 every time."""
        if WIDTH in (32, 48):
            marker = os.path.join(oom_dir, f"marker{WIDTH}")
            if WIDTH == 48 or not os.path.exists(marker):
                open(marker, "a").close()
                log(os.path.join(oom_dir, "attempts"), WIDTH=WIDTH)
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        w = torch.linspace(-1.0, 1.0, dim, device=gen.device)

        def batch_fn(step):
            Xb = torch.randn(bsz, dim, generator=gen, device=gen.device)
            return Xb, (Xb @ w).unsqueeze(1)
        return batch_fn
''')


def notebook():
    ns = {}  # a fresh namespace: no __name__, no module to import the functions from
    exec(compile(NOTEBOOK, "<notebook cell>", "exec"), ns)
    return ns


def config(**kw):
    g = vars(base_args())
    g.update(PARAMETERIZATION="sp", MAX_ITER=200, N_TEST=128, N_SAMPLES=64, LOSS_CHECKPOINTS=[0.5],
             RELATIVE_THRESHOLDS=True, WIDTH=16, EVAL_EVERY=0, THREADS=1)
    g.update(kw)
    return g


def read_log(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def drop_wall(res):
    return res.to_xarray().drop_vars("wall_time")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Jobs use one thread (THREADS=1 in ``config``; this fixture covers code run here outside a sweep), as each
    of the two pool workers does on a 2-core machine, so in-process and pool numbers compare bit for bit. Tiny
    models gain nothing from more, and on a busy machine OpenMP threads waiting on each other make them many
    times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pool(job_device):
    # on the device "inprocess" picks (DEVICES=[0]): the tests below compare the two bit for bit
    ex = PoolExecutor([str(job_device)] * 2)
    ex.wait_ready()  # so that both workers take part from the first job, however busy the machine
    yield ex
    ex.shutdown()


# --- one sweep, run in-process and in the pool -------------------------------------------------------------

AXES = dict(WIDTH=[16, 32], LR=[0.05, 0.1], shift=[0.0, 0.5], trial=[0, 1])


def run_main_sweep(executor, logfile, axes=AXES):
    ns = notebook()
    g = config(otherreturns={"nb": ns["nb_grab"]}, logfile=str(logfile))
    before = copy.deepcopy({k: v for k, v in g.items() if k != "otherreturns"})
    res = main(list(axes.values()), list(axes), g, dict(base_bfn=ns["nb_bfn"], dim=8), executor=executor,
               store=False, progress=False)
    assert {k: v for k, v in g.items() if k != "otherreturns"} == before, "main mutated the user's config"
    return res


@pytest.fixture(scope="module")
def sweeps(pool, tmp_path_factory):
    d = tmp_path_factory.mktemp("main_sweep")
    out = {}
    for name, ex in (("inprocess", "inprocess"), ("pool", pool)):
        log = d / f"{name}.log"
        out[name] = (run_main_sweep(ex, log), read_log(log))
    return out


def combos(axes=AXES):
    import itertools
    return [dict(zip(axes, c)) for c in itertools.product(*axes.values())]


@pytest.mark.parametrize("name", ["inprocess", "pool"])
def test_each_job_got_its_own_axis_values_and_nothing_else(sweeps, name):
    res, log = sweeps[name]
    assert len(res.records) == 16 and res.status_counts().get("failed", 0) == 0
    grabs = [e for e in log if e["kind"] == "grab"]
    # two grab calls per job (the check on the initial model, the final value), each seeing exactly its own
    # combination (no value leaks between jobs)
    seen = sorted((e["WIDTH"], e["LR"], e["shift"], e["trial"]) for e in grabs)
    assert seen == sorted((c["WIDTH"], c["LR"], c["shift"], c["trial"]) for c in combos() * 2)
    for e in grabs:
        assert e["model_width"] == e["WIDTH"]      # a hyperparameter axis reached the model
        assert e["opt_lr"] == e["LR"]              # ... and the optimizer
        assert e["N_SAMPLES"] == e["n_tr"] == 64   # untouched global value
    # the batch function got the user-key axis (shift) and the trial by name
    train0 = [e for e in log if e["kind"] == "batch0" and e["bsz"] == 64]
    assert sorted((e["WIDTH"], e["shift"], e["trial"]) for e in train0) == \
        sorted((c["WIDTH"], c["shift"], c["trial"]) for c in combos())
    # records carry their axes, in the product's order
    assert [r["axes"] for r in res.records] == combos()
    assert res["jobs"] == [tuple(c.values()) for c in combos()]
    assert res["var_axes"] == list(AXES)


def test_pool_ran_in_two_other_processes_and_inprocess_in_this_one(sweeps):
    in_pids = {e["pid"] for e in sweeps["inprocess"][1]}
    pool_pids = {e["pid"] for e in sweeps["pool"][1] if e["kind"] == "grab"}
    assert in_pids == {os.getpid()}
    assert len(pool_pids) == 2 and os.getpid() not in pool_pids


def test_inprocess_and_pool_results_are_bitwise_identical(sweeps):
    a, b = sweeps["inprocess"][0], sweeps["pool"][0]
    xr.testing.assert_identical(drop_wall(a), drop_wall(b))
    assert set(drop_wall(a).data_vars) >= {"status", "test_loss", "train_loss", "timekeys", "grab_nb"}
    for ra, rb in zip(a.records, b.records):
        assert ra["axes"] == rb["axes"] and ra["test_loss"] == rb["test_loss"]


def test_results_do_not_depend_on_job_order(sweeps, tmp_path, job_device):
    reversed_axes = {k: v[::-1] for k, v in AXES.items()}
    res = run_main_sweep(InProcessExecutor(str(job_device)), tmp_path / "rev.log", reversed_axes)
    ds = drop_wall(res)
    ref = drop_wall(sweeps["pool"][0])
    xr.testing.assert_identical(ds.sortby(list(AXES)), ref.sortby(list(AXES)))


def test_trials_differ_and_same_trial_jobs_share_their_data(sweeps):
    res, log = sweeps["pool"]
    ds = res.to_xarray()
    xte_sum = ds["grab_nb"].isel(nb_dim0=0)
    for trial in (0, 1):
        vals = np.unique(xte_sum.sel(trial=trial).values)
        assert len(vals) == 1, "the test set differs across width / lr / shift within a trial"
    assert xte_sum.sel(trial=0).values.flat[0] != xte_sum.sel(trial=1).values.flat[0]
    # the first training batch, too (logged by the batch function)
    train0 = [e for e in log if e["kind"] == "batch0" and e["bsz"] == 64]
    by_trial = {t: {e["xsum"] for e in train0 if e["trial"] == t} for t in (0, 1)}
    assert len(by_trial[0]) == 1 and len(by_trial[1]) == 1 and by_trial[0] != by_trial[1]
    # the thresholds, relative to the initial loss (the model is centered: output 0 at init), depend on the
    # data only; and the final losses differ across trials
    thr = ds["thresholds"].isel(threshold=0)
    assert np.unique(thr.sel(trial=0, shift=0.0).values).size == 1
    assert (ds["test_loss"].sel(trial=0).values != ds["test_loss"].sel(trial=1).values).all()


def test_xarray_and_get_return_each_records_numbers_at_its_coordinates(sweeps):
    res, _ = sweeps["pool"]
    ds = res.to_xarray()
    assert dict(ds.sizes) == {"WIDTH": 2, "LR": 2, "shift": 2, "trial": 2, "threshold": 1, "nb_dim0": 3}
    tk = res["timekeys"]
    for r in res.records:
        at = r["axes"]
        assert ds["test_loss"].sel(**at).item() == r["test_loss"]
        assert ds["steps"].sel(**at).item() == r["steps"]
        assert str(ds["status"].sel(**at).item()) == r["status"]
        np.testing.assert_array_equal(ds["timekeys"].sel(**at).values, r["timekeys"])
        np.testing.assert_array_equal(ds["grab_nb"].sel(**at).values, r["grabs"]["nb"])
        assert res.get("test_loss", **at).item() == r["test_loss"]
        np.testing.assert_array_equal(tk.get(**at), r["timekeys"])
        np.testing.assert_array_equal(res["extras"]["nb"].get(**at), r["grabs"]["nb"])
        assert res["losses"].get(**at) == r["test_loss"]
    # a partial selection: the array over the other axes, in axis order, values sorted
    by_width = tk.get(WIDTH=32)
    assert by_width.shape == (2, 2, 2, 1)
    for r in res.records:
        if r["axes"]["WIDTH"] == 32:
            a = r["axes"]
            idx = (AXES["LR"].index(a["LR"]), AXES["shift"].index(a["shift"]), AXES["trial"].index(a["trial"]))
            np.testing.assert_array_equal(by_width[idx], r["timekeys"])
    sel = res.get("timekeys", WIDTH=32, trial=1)
    assert sel.dims == ("LR", "shift", "threshold")
    np.testing.assert_array_equal(sel.values, ds["timekeys"].values[1, :, :, 1])


# --- notebook functions, failures, OOM retry (pool and in-process) ----------------------------------------

def test_notebook_functions_are_not_importable_but_run_in_the_pool(sweeps):
    ns = notebook()
    assert ns["nb_bfn"].__module__ is None and "__name__" not in ns
    assert sweeps["pool"][0].status_counts().get("failed", 0) == 0
    assert {e["kind"] for e in sweeps["pool"][1]} == {"grab", "batch0"}


@pytest.fixture(scope="module")
def faulty(pool, tmp_path_factory):
    """A pool sweep where the grab raises for WIDTH 24 and the batch function kills its worker for WIDTH 32."""
    log = tmp_path_factory.mktemp("faulty") / "log"
    ns = notebook()
    # FUSE=off: one job per unit (as fused, 16, 24 and 32 would be one group, which the crash takes down whole)
    g = config(otherreturns={"nb": ns["nb_grab"]}, logfile=str(log), raise_width=24, FUSE="off")
    res = main([[16, 24, 32, 48]], ["WIDTH"], g, dict(base_bfn=ns["nb_bfn"], crash_width=32), executor=pool,
               store=False, progress=False)
    return res, read_log(log)


def test_a_raising_job_and_a_dead_worker_fail_alone(faulty, pool):
    res, log = faulty
    by_width = {r["axes"]["WIDTH"]: r for r in res.records}
    assert sorted(by_width) == [16, 24, 32, 48]
    assert by_width[16]["status"] == by_width[48]["status"] == "done"
    # a job that raises fails; one that kills its worker is retried once on a fresh worker, then crashed
    assert by_width[24]["status"] == "failed" and by_width[32]["status"] == "crashed"
    err24 = by_width[24]["error"]
    assert "Traceback" in err24 and "grab refuses WIDTH=24" in err24 and "ValueError" in err24
    err32 = by_width[32]["error"]
    assert "killed its worker" in err32 and err32.count("exit code 1") == 2
    assert {e["WIDTH"] for e in log if e["kind"] == "grab"} == {16, 48}
    text = summary(res)
    assert "2 done" in text and "1 failed" in text and "1 crashed" in text
    lines = [ln for ln in text.splitlines() if "failed {" in ln or "crashed {" in ln]
    assert len(lines) == 2
    assert any("failed {" in ln and "24" in ln and "grab refuses WIDTH=24" in ln for ln in lines)
    assert any("crashed {" in ln and "32" in ln and "exit code 1" in ln for ln in lines)
    # failed jobs are NaN / masked in the labelled views
    ds = res.to_xarray()
    assert np.isnan(ds["test_loss"].sel(WIDTH=24)) and np.isnan(ds["test_loss"].sel(WIDTH=32))
    assert np.isnan(ds["steps"].sel(WIDTH=32)) and np.isnan(ds["grab_nb"].sel(WIDTH=24)).all()
    assert not np.isnan(ds["test_loss"].sel(WIDTH=48))
    assert list(ds["status"].values) == ["done", "failed", "crashed", "done"]
    losses = res["losses"].get()
    assert list(np.ma.getmaskarray(losses)) == [False, True, True, False]


def test_the_pool_keeps_working_after_a_worker_died(faulty, pool, tmp_path):
    assert pool.replaced >= 1
    ns = notebook()
    g = config(otherreturns={"nb": ns["nb_grab"]}, logfile=str(tmp_path / "log"))
    res = main([[16, 32]], ["WIDTH"], g, dict(base_bfn=ns["nb_bfn"]), executor=pool, store=False, progress=False)
    assert res.status_counts() == {"done": 2}


def test_a_reused_pool_runs_each_sweep_with_its_own_config(pool, tmp_path, monkeypatch):
    """Workers cache a sweep's context by its id: a later sweep must never run with an earlier sweep's config,
    even where CPython gives the later context the address (``id``) of the earlier one, freed by then; the
    patch below makes that certain instead of occasional."""
    import modelscape.backend.sweep as sweep
    monkeypatch.setattr(sweep, "id", lambda obj: 1, raising=False)
    ns = notebook()
    got = []
    for seed in range(4):
        g = config(otherreturns={"nb": ns["nb_grab"]}, logfile=str(tmp_path / "log"), SEED=seed, MAX_ITER=5)
        res = main([[16]], ["WIDTH"], g, dict(base_bfn=ns["nb_bfn"]), executor=pool, store=False, progress=False)
        got.append(res.records[0]["test_loss"])
    assert len(set(got)) == 4


@pytest.mark.parametrize("where", ["inprocess", "pool"])
def test_cuda_out_of_memory_is_retried_once(pool, tmp_path, where):
    ns = notebook()
    bfn = dict(base_bfn=ns["oom_bfn"], oom_dir=str(tmp_path))
    res = main([[16, 32, 48]], ["WIDTH"], config(MAX_ITER=50), bfn, executor=pool if where == "pool" else "inprocess",
               store=False, progress=False)
    by_width = {r["axes"]["WIDTH"]: r for r in res.records}
    attempts = read_log(tmp_path / "attempts")
    assert by_width[16]["status"] != "failed"
    # WIDTH 32 ran out of memory once: retried, and the retry succeeded
    assert [a["WIDTH"] for a in attempts].count(32) == 1
    assert by_width[32]["status"] != "failed" and np.isfinite(by_width[32]["test_loss"])
    # WIDTH 48 runs out of memory every time: the first try and exactly one retry, then recorded as failed
    tries48 = [a for a in attempts if a["WIDTH"] == 48]
    assert len(tries48) == 2
    assert by_width[48]["status"] == "failed" and "OutOfMemoryError" in by_width[48]["error"]
    if where == "pool":  # the retry ran in another process: a fresh worker (or the other one), never the same
        assert tries48[0]["pid"] != tries48[1]["pid"]
    assert all("oom" not in r for r in res.records)


# --- configs and axis names, checked before anything runs -------------------------------------------------

class Act:
    """A non-numeric axis value whose label is its str (as a user's activation object would be)."""

    def __init__(self, name):
        self.name = name

    def __str__(self):
        return self.name


class RecordingMLP(nn.Module):
    """A user model class whose constructor names a user key (``act``) and records what it received."""

    def __init__(self, d_in, width, d_out, act, init_scale=1.0):
        super().__init__()
        self.received = dict(width=width, act=act, init_scale=init_scale)
        self.width = width
        self.input_layer = nn.Linear(d_in, width)
        self.nonlin = nn.Tanh() if str(act) == "tanh" else nn.ReLU()
        self.output_layer = nn.Linear(width, d_out)
        with torch.no_grad():
            self.output_layer.weight.mul_(init_scale)

    def forward(self, x):
        return self.output_layer(self.nonlin(self.input_layer(x)))


def received(model, **kw):
    r = model.received
    return [r["width"], 1.0 if str(r["act"]) == "tanh" else 0.0, r["init_scale"], float(isinstance(r["act"], Act))]


def test_axis_values_reach_a_model_constructor_argument_and_get_labels():
    acts = [Act("relu"), Act("tanh")]
    g = config(MODEL=RecordingMLP, MAX_ITER=20, otherreturns={"received": received})
    res = main([[16, 24], acts, [0.5, 2.0]], ["WIDTH", "act", "init_scale"], g, dict(base_bfn=powerlaw_bfn, dim=8),
               executor="inprocess", store=False, progress=False)
    ds = res.to_xarray()
    assert list(ds["act"].values) == ["relu", "tanh"]
    assert res["extras"]["received"].get_axis("act") == ["relu", "tanh"]
    for r in res.records:
        a = r["axes"]
        assert a["act"] in acts  # the record keeps the object itself
        want = [a["WIDTH"], 1.0 if a["act"] is acts[1] else 0.0, a["init_scale"], 1.0]
        assert list(r["grabs"]["received"]) == want
        np.testing.assert_array_equal(ds["grab_received"].sel(WIDTH=a["WIDTH"], act=str(a["act"]),
                                                              init_scale=a["init_scale"]).values, want)
        np.testing.assert_array_equal(res.get("grab_received", WIDTH=a["WIDTH"], act=a["act"],
                                              init_scale=a["init_scale"]).values, want)


def n_samples_grab(X_tr, N_SAMPLES, **kw):
    return [N_SAMPLES, X_tr.shape[0]]


@pytest.mark.parametrize("name", ["ntrain", "bsz", "N_SAMPLES"])
def test_sample_size_axis_names_set_n_samples(name):
    g = config(MAX_ITER=5, otherreturns={"n": n_samples_grab})
    res = main([[24, 40]], [name], g, dict(base_bfn=powerlaw_bfn, dim=8), executor="inprocess", store=False,
               progress=False)
    assert [list(r["grabs"]["n"]) for r in res.records] == [[24, 24], [40, 40]]
    assert list(res.to_xarray()[name].values) == [24, 40]


def touch_grab(touch, **kw):
    with open(touch, "a") as f:
        f.write("ran\n")
    return 0.0


def touch_bfn(bsz, gen, X, y, touch, dim=8):
    with open(touch, "a") as f:
        f.write("bfn\n")
    return powerlaw_bfn(bsz, gen, X, y, dim=dim)


@pytest.mark.parametrize("iterators, names, exc, words", [
    ([[16, 32], [0.1]], ["WIDTH"], ValueError, ["2 iterators", "1 iterator_names"]),
    ([[16, 32]], ["WIDTH", "LR"], ValueError, ["1 iterators", "2 iterator_names"]),
    ([[16, 32], []], ["WIDTH", "LR"], ValueError, ["'LR'", "empty"]),
    ([[16, 32], (x for x in [])], ["WIDTH", "LR"], ValueError, ["'LR'", "empty"]),
    (["16", [0.1]], ["WIDTH", "LR"], TypeError, ["'WIDTH'", "'16'", "not a list"]),
    ([16, [0.1]], ["WIDTH", "LR"], TypeError, ["'WIDTH'", "not a list"]),
    ([[16, 32]], ["WIDHT"], ConfigError, ["'WIDHT'", "did you mean 'WIDTH'"]),
    ([[0.1]], ["Lr"], ConfigError, ["'Lr'", "did you mean 'LR'"]),
    ([[1, 2]], ["banana"], ConfigError, ["'banana'", "unknown axis"]),
    ([[16, 32], [0.1]], ["WIDTH", "WIDTH"], ValueError, ["repeat"]),
    ([[16, 32]], None, TypeError, ["iterator_names", "one name per iterator"]),
    ([[16, 32]], "WIDTH", TypeError, ["iterator_names", "one name per iterator"]),
    ([[16, 32], [0, "b"]], ["WIDTH", "trial"], TypeError, ["trial", "integers"]),
    ([[16, 16]], ["WIDTH"], ValueError, ["'WIDTH'", "repeat"]),
    ([[2, 0]], ["DEPTH"], ConfigError, ["DEPTH", "0", "[1, inf)"]),
    ([[16, "wide"]], ["WIDTH"], ConfigError, ["WIDTH", "'wide'"]),
])
def test_bad_sweeps_fail_clearly_before_any_job_runs(tmp_path, iterators, names, exc, words):
    touch = tmp_path / "ran"
    g = config(MAX_ITER=5, otherreturns={"touch": touch_grab}, touch=str(touch))
    with pytest.raises(exc) as info:
        main(iterators, names, g, dict(base_bfn=touch_bfn), store=False, progress=False)
    for w in words:
        assert w in str(info.value)
    assert not touch.exists(), "a job ran before the error"


def test_a_good_sweep_with_the_same_functions_does_run(tmp_path):
    touch = tmp_path / "ran"
    g = config(MAX_ITER=5, otherreturns={"touch": touch_grab}, touch=str(touch))
    main([[16, 32]], ["WIDTH"], g, dict(base_bfn=touch_bfn), store=False, progress=False)
    assert touch.read_text().count("ran") == 4  # per job: the check on the initial model, the final value


def trial_grab(trial, WIDTH, **kw):
    return [trial, WIDTH]


def test_trial_axis_reaches_a_grab_by_name_and_iterators_may_be_ranges_and_generators():
    g = config(MAX_ITER=5, otherreturns={"t": trial_grab})
    res = main([(w for w in [16, 32]), range(3)], ["WIDTH", "trial"], g, dict(base_bfn=powerlaw_bfn, dim=8),
               executor="inprocess", store=False, progress=False)
    assert res.status_counts().get("failed", 0) == 0, res.failed()[0]["error"] if res.failed() else ""
    assert [list(r["grabs"]["t"]) for r in res.records] == [[t, w] for w in (16, 32) for t in range(3)]
    assert list(res.to_xarray()["trial"].values) == [0, 1, 2]


def broken_grab(WIDTH, **kw):
    if WIDTH == 32:
        raise RuntimeError("boom at 32")
    return 1.0


def test_progress_bar_and_summary_with_a_failed_job(capsys):
    g = config(MAX_ITER=5, otherreturns={"b": broken_grab})
    res = main([[16, 32]], ["WIDTH"], g, dict(base_bfn=powerlaw_bfn, dim=8), executor="inprocess", store=False,
               progress=True)
    err = capsys.readouterr().err
    assert res.status_counts()["failed"] == 1
    assert "sweep:" in err and "1 failed" in err and "boom at 32" in err


def test_a_pool_that_was_shut_down_refuses_a_sweep_instead_of_waiting_forever():
    ex = PoolExecutor(["cpu"])
    ex.shutdown()  # its worker is still starting: it is ended at once
    g = config(MAX_ITER=5)
    with pytest.raises(RuntimeError, match="shut down"):
        main([[16]], ["WIDTH"], g, dict(base_bfn=powerlaw_bfn, dim=8), executor=ex, store=False, progress=False)


def dim_grab(X_te, **kw):
    return X_te.shape[1]


def test_an_axis_reaches_the_batch_function_and_wins_over_bfn_config():
    g = config(MAX_ITER=3, otherreturns={"d": dim_grab})
    res = main([[4, 16]], ["dim"], g, dict(base_bfn=powerlaw_bfn), executor="inprocess", store=False, progress=False)
    assert [float(r["grabs"]["d"]) for r in res.records] == [4.0, 16.0]
    # bfn_config's dim=8 is the default the axis overrides, as an axis overrides global_config
    res = main([[4, 16]], ["dim"], g, dict(base_bfn=powerlaw_bfn, dim=8), executor="inprocess", store=False,
               progress=False)
    assert [float(r["grabs"]["d"]) for r in res.records] == [4.0, 16.0]
