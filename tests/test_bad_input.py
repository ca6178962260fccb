"""Bad input is named before anything trains: identity that ignores docstrings, axis names that collide with
result fields or engine keys, path names (EXPT_NAME, JOB_ID), batch and model outputs checked at step 0."""
import numpy as np
import pytest

from modelscape.backend.identity import code_fingerprint

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# --- identity: a docstring is not code ---------------------------------------------------------------------

def _compile(src, name):
    space = {}
    exec(compile(src, f"<{name}>", "exec"), space)
    return space[name]


GRAB = "def grab(model, **kw):\n{doc}    def inner(x):\n{idoc}        return x + 1\n    return inner(2.5)\n"


@pytest.mark.parametrize("doc, idoc", [('    """What it measures."""\n', ""), ("", '        """Inner."""\n'),
                                       ('    """A."""\n', '        """B."""\n')])
def test_adding_a_docstring_to_a_grab_keeps_its_identity(doc, idoc):
    bare = _compile(GRAB.format(doc="", idoc=""), "grab")
    documented = _compile(GRAB.format(doc=doc, idoc=idoc), "grab")
    assert code_fingerprint(bare) == code_fingerprint(documented)


def test_a_string_the_code_uses_still_counts():
    first = _compile('def grab(model, **kw):\n    return len("abc")\n', "grab")
    second = _compile('def grab(model, **kw):\n    return len("abcd")\n', "grab")
    documented = _compile('def grab(model, **kw):\n    """Counts."""\n    return len("abc")\n', "grab")
    assert code_fingerprint(first) != code_fingerprint(second)
    assert code_fingerprint(first) == code_fingerprint(documented)


# --- axis names that collide with result fields or engine keys ----------------------------------------------

from modelscape.backend.job_iterator import main  # noqa: E402
from modelscape.config import ConfigError  # noqa: E402
from modelscape.data import powerlaw_bfn  # noqa: E402

TINY = dict(PARAMETERIZATION="sp", N_TEST=16, N_SAMPLES=8, MAX_ITER=5, LOSS_CHECKPOINTS=[1e-9], WIDTH=8)


def bfn_taking(name):
    """A batch function with a parameter ``name``, so an axis of that name reaches something."""
    ns = {"powerlaw_bfn": powerlaw_bfn}
    exec(f"def bfn(bsz, gen=None, X=None, y=None, {name}=None, **kw):\n"
         f"    return powerlaw_bfn(bsz, gen, X, y, dim=4)\n", ns)
    return ns["bfn"]


@pytest.mark.parametrize("name, said", [("status", "field of every job"), ("steps", "field of every job"),
                                        ("threshold", "field of every job"), ("JOB_ID", "engine's to set"),
                                        ("RESULTS_DIR", "engine's to set"), ("EXPT_NAME", "engine's to set"),
                                        ("CHECKPOINTS", "engine's to set")])
def test_an_axis_named_like_a_result_field_or_engine_key_is_refused_before_training(tmp_path, name, said):
    store = tmp_path / "expt"
    values = [["final"], [0]] if name == "CHECKPOINTS" else ["a", "b"]
    with pytest.raises(ConfigError, match=f"axis {name!r} cannot be a sweep axis: .*{said}"):
        main([values], [name], dict(TINY), dict(base_bfn=bfn_taking(name)), executor="inprocess", store=store,
             progress=False)
    assert not store.exists()  # refused before the store was opened or a job ran


def test_an_axis_named_like_a_grab_variable_is_refused():
    grabs = {"norm": lambda model, **kw: 1.0}
    with pytest.raises(ConfigError, match="'grab_norm' cannot be a sweep axis"):
        main([[1, 2]], ["grab_norm"], dict(TINY, otherreturns=grabs), dict(base_bfn=bfn_taking("grab_norm")),
             executor="inprocess", store=False, progress=False)


def test_an_axis_with_a_free_name_still_runs(tmp_path):
    res = main([[1, 2]], ["status_"], dict(TINY), dict(base_bfn=bfn_taking("status_")), executor="inprocess",
               store=False, progress=False)
    assert sorted(res.to_xarray().coords["status_"].values.tolist()) == [1, 2]


# --- a rerun says what it skipped and what it trains ----------------------------------------------------------

def test_a_rerun_says_how_many_jobs_are_stored_and_how_many_train(tmp_path, capsys):
    bfn = dict(base_bfn=bfn_taking("unused"))
    store = tmp_path / "expt"

    def sweep(lrs):
        main([lrs], ["LR"], dict(TINY), bfn, executor="inprocess", store=store, progress=True)
        return [line for line in capsys.readouterr().err.splitlines() if "to train" in line]

    assert sweep([0.1, 0.2]) == [f"sweep: 0 of 2 jobs already stored in {store}, 2 to train"]
    assert sweep([0.1, 0.2]) == [f"sweep: 2 of 2 jobs already stored in {store} (2 not_reached), 0 to train"]
    assert sweep([0.1, 0.2, 0.3]) == [f"sweep: 2 of 3 jobs already stored in {store} (2 not_reached), 1 to train"]


# --- the batch and the model's output, checked at step 0 ------------------------------------------------------

from torch import nn  # noqa: E402

from modelscape.backend.inputs import BadBatch, BadModel  # noqa: E402
from modelscape.backend.job import run_config  # noqa: E402

JOB = dict(PARAMETERIZATION="sp", N_TEST=16, N_SAMPLES=8, MAX_ITER=4, LOSS_CHECKPOINTS=[1e-9], WIDTH=8,
           ONLYTHRESHOLDS=False, EVAL_EVERY=2)


def returning(change, sizes=(8,)):
    """A batch function whose batches of the ``sizes`` asked for (8: training, 16: the test set) are
    ``change(X, y)`` of powerlaw_bfn's."""
    def base(bsz, gen=None, X=None, y=None, **kw):
        inner = powerlaw_bfn(bsz, gen, X, y, dim=4)

        def bad_batch(step):
            return change(*inner(step)) if bsz in sizes else inner(step)
        return bad_batch
    return dict(base_bfn=base)


def train(change, sizes=(8,), **cfg):
    return run_config({**JOB, "ONLINE": True, **cfg}, returning(change, sizes))


def test_numpy_batches_are_converted_and_train_as_tensors_would():
    as_torch = train(lambda X, y: (X, y))
    as_numpy = train(lambda X, y: (X.cpu().numpy().astype(np.float64), y.cpu().numpy().astype(np.float64)))
    assert as_numpy["status"] == as_torch["status"] != "failed"
    np.testing.assert_array_equal(as_numpy["train_raw"], as_torch["train_raw"])


@pytest.mark.parametrize("change, error, said", [
    (lambda X, y: None, BadBatch, r"returned None at step 0; it must return a pair \(X, y\)"),
    (lambda X, y: (X, y, y), BadBatch, r"returned tuple of 3 \(tensor \(8, 4\) float32 on cpu"),
    (lambda X, y: (X.tolist(), y), BadBatch, r"returned X = list of 8 .* at step 0; expected a tensor"),
    (lambda X, y: (X, None), BadBatch, r"returned y = None at step 0"),
    (lambda X, y: (X.to("meta"), y), BadBatch, r"X = tensor \(8, 4\) float32 on meta at step 0: .*meta device"),
    (lambda X, y: (X[:0], y[:0]), BadBatch, r"returned an empty batch at step 0: X = tensor \(0, 4\)"),
    (lambda X, y: (X, y[:5]), BadModel, r"loss torch.nn.modules.loss.MSELoss failed at step 0 on the model's output "
                                        r"tensor \(8, 1\) float32 on cpu and y = tensor \(5, 1\)"),
    (lambda X, y: (X * float("nan"), y), BadBatch, r"X = tensor \(8, 4\) float32 on cpu holding 32 NaN and 0 inf"),
    (lambda X, y: (X, y / 0.0), BadBatch, r"y = tensor \(8, 1\) float32 on cpu holding 0 NaN and 8 inf .* the "
                                          r"data is at fault"),
    (lambda X, y: (X.double(), y.double()), BadModel, r"model MLP failed on the batch of step 0 \(X = tensor "
                                                      r"\(8, 4\) float64 .*the model has float32 parameters on cpu"),
    (lambda X, y: (X.long(), y), BadModel, r"model MLP failed on the batch of step 0 \(X = tensor \(8, 4\) int64"),
])
def test_a_bad_batch_is_named_at_step_0(change, error, said):
    calls = []

    def counting(X, y):
        calls.append(1)
        return change(X, y)

    with pytest.raises(error, match=said) as caught:
        train(counting)
    assert "test_bad_input.returning.<locals>.base.<locals>.bad_batch" in str(caught.value)  # the batch function
    assert len(calls) == 1  # step 0's batch: nothing trained


@pytest.mark.parametrize("online, sizes, said", [(True, (16,), "the test set"), (False, (8,), "the training set")])
def test_a_bad_test_set_or_offline_training_set_is_named_before_the_model_is_built(online, sizes, said):
    with pytest.raises(BadBatch, match=rf"bad_batch returned X = tensor \({sizes[0]}, 4\) float32 on cpu holding "
                                       rf"{sizes[0] * 4} NaN .* at step 0 \({said}\)"):
        train(lambda X, y: (X * float("nan"), y), sizes=sizes, ONLINE=online)


class TupleNet(nn.Module):
    """A model whose forward returns its prediction and its hidden layer."""

    def __init__(self, d_in=4, width=8, d_out=1):
        super().__init__()
        self.input_layer, self.output_layer = nn.Linear(d_in, width), nn.Linear(width, d_out)

    def forward(self, x):
        h = self.input_layer(x)
        return self.output_layer(h), h


@pytest.mark.parametrize("center", [True, False])
def test_a_model_returning_a_tuple_is_named(center):
    with pytest.raises(BadModel, match=r"model TupleNet's forward returned tuple of 2 \(tensor \(8, 1\) float32 "
                                        r"on cpu, tensor \(8, 8\).*not a tensor"):
        train(lambda X, y: (X, y), MODEL=TupleNet, CENTER=center)


def test_a_loss_that_is_not_one_number_is_named():
    with pytest.raises(BadModel, match=r"loss torch.nn.modules.loss.MSELoss returned tensor \(8, 1\) .* not one "
                                       r"number: reduce it"):
        train(lambda X, y: (X, y), reduction="none", ONLYTHRESHOLDS=True)


def test_in_a_sweep_the_bad_job_fails_with_its_reason_and_the_others_train():
    def base(bsz, gen=None, X=None, y=None, WIDTH=None, **kw):
        inner = powerlaw_bfn(bsz, gen, X, y, dim=4)
        return (lambda step: (inner(step)[0] * float("nan"), inner(step)[1])) if WIDTH == 16 else inner

    res = main([[8, 16]], ["WIDTH"], dict(TINY, FUSE="off"), dict(base_bfn=base), executor="inprocess",
               store=False, progress=False)
    by_width = {r["axes"]["WIDTH"]: r for r in res.records}
    assert by_width[8]["status"] == "not_reached"
    assert by_width[16]["status"] == "failed" and "holding 64 NaN and 0 inf of 64 values at step 0 (the test set)" \
        in by_width[16]["error"]


def test_data_turning_nan_later_is_still_diverged_and_said_so():
    def later(X, y, seen=[]):
        seen.append(1)
        return (X, y * float("nan")) if len(seen) == 3 else (X, y)

    with pytest.warns(UserWarning, match=r"diverged with its data: .* holding 8 NaN .* at step 2"):
        rec = train(later)
    assert rec["status"] == "diverged" and rec["steps"] == 3


def test_a_sweep_rerun_with_a_documented_grab_trains_nothing(tmp_path, capsys):
    store = tmp_path / "expt"
    for doc in ("", '    """The output layer\'s norm."""\n'):
        grab = _compile(f"def norm(model, **kw):\n{doc}    return float(model.output_layer.weight.norm())\n", "norm")
        main([[0.1, 0.2]], ["LR"], dict(TINY, otherreturns={"norm": grab}), dict(base_bfn=bfn_taking("unused")),
             executor="inprocess", store=store, progress=True)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "to train" in ln]
    assert lines[-1].endswith("(2 not_reached), 0 to train")
