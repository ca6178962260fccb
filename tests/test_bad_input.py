"""Bad input is named before anything trains: identity that ignores docstrings, axis names that collide with
result fields or engine keys, path names (EXPT_NAME, JOB_ID), batch and model outputs checked at step 0."""
import numpy as np
import pytest
import torch

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
