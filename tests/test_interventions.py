"""step_hooks: user functions called inside the step loop at chosen steps, part of a job's identity."""
import logging

import numpy as np
import pytest
import torch

from modelscape.backend.fused import plan_units, why_not_fusable
from modelscape.backend.interventions import StepHooks, check_step_hooks, on_next_grads
from modelscape.backend.job import prepare_job, run_config, train_prepared
from modelscape.backend.job_iterator import main as run_job_iterator
from modelscape.backend.store import job_identity
from modelscape.backend.trainloop import LoopObserver
from modelscape.config import ConfigError, canonicalize
from modelscape.data import powerlaw_bfn

BFN = dict(base_bfn=powerlaw_bfn, dim=8)
# Offline (one fixed training set), curves kept, thresholds out of reach: every job runs MAX_ITER steps.
CFG = dict(WIDTH=16, DEPTH=2, MAX_ITER=12, N_SAMPLES=16, N_TEST=16, LOSS_CHECKPOINTS=[1e-9], ONLYTHRESHOLDS=False,
           EVAL_EVERY=4, ONLINE=False, FUSE="off")


def losses(**extra):
    return run_config({**CFG, **extra}, BFN, quiet=True)["train_raw"]


def kick(model, opt, step):
    """Move every weight by 0.1: a perturbation the loss sees."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)


def test_a_hook_changes_training_exactly_from_its_step():
    plain, hooked = losses(), losses(step_hooks={5: kick})
    np.testing.assert_array_equal(plain[:5], hooked[:5])  # the same numbers before the step
    assert np.all(plain[5:] != hooked[5:])  # step 5's loss is the first to see the perturbed model


def test_a_hook_at_step_0_changes_the_initial_loss():
    plain, hooked = losses(), losses(step_hooks={0: kick})
    assert plain[0] != hooked[0]


class Weights(LoopObserver):
    """Copies of the first weight matrix before each step (the model after ``step`` updates)."""

    def __init__(self):
        self.at = {}

    def before_step(self, step, model, opt):
        self.at[step] = next(model.parameters()).detach().clone()


def test_a_range_hook_is_called_at_each_step_of_the_half_open_range_with_the_model_of_that_step():
    seen = {}

    def look(model, opt, step, trial, WIDTH):
        seen[step] = (next(model.parameters()).detach().clone(), trial, WIDTH)

    hooked = prepare_job({**CFG, "step_hooks": {(3, 6): look}}, BFN, quiet=True, axes={"trial": 2})
    train_prepared(hooked)
    assert sorted(seen) == [3, 4, 5]
    assert all(trial == 2 and width == 16 for _, trial, width in seen.values())  # the job's config, by name
    # the same job without the hook, watched before every step: the hook saw the model after `step` updates
    ref = prepare_job(CFG, BFN, quiet=True, axes={"trial": 2})
    ref.observers.append(Weights())
    train_prepared(ref)
    for step, (w, _, _) in seen.items():
        torch.testing.assert_close(w, ref.observers[-1].at[step], rtol=0, atol=0)


def test_a_hook_that_rescales_the_learning_rate_takes_effect_at_its_step():
    def stop(model, opt, step):
        for g in opt.param_groups:
            g["lr"] = 0.0

    plain, frozen = losses(), losses(step_hooks={4: stop})
    np.testing.assert_array_equal(plain[:5], frozen[:5])  # step 4's loss is computed before its update
    # from step 4 on nothing moves, and the training set is fixed: the loss stays put
    np.testing.assert_allclose(frozen[4:], frozen[4], rtol=1e-6)
    assert plain[5] != frozen[5]


def test_freezing_a_layer_and_changing_one_steps_gradients():
    def freeze_first(model, opt, step):
        next(model.parameters()).requires_grad_(False)

    seen = {}

    def watch(model, opt, step):
        seen[step] = [p.detach().clone() for p in model.parameters()]

    run_config({**CFG, "step_hooks": {3: freeze_first, (3, 12): watch}}, BFN, quiet=True)
    first = [seen[s][0] for s in range(3, 12)]
    assert all(torch.equal(first[0], w) for w in first)  # frozen from step 3 on
    assert not torch.equal(seen[3][-1], seen[11][-1])  # the others still train

    def zero_grads(model, opt, step):
        on_next_grads(model, lambda name, grad: torch.zeros_like(grad))

    plain, hooked = losses(), losses(step_hooks={6: zero_grads})
    np.testing.assert_array_equal(plain[:7], hooked[:7])
    assert hooked[7] == hooked[6] and plain[7] != hooked[7]  # no update at step 6 (plain SGD): same model
    assert hooked[8] != hooked[7]  # the next step's gradients are untouched


def test_a_hook_that_returns_something_or_raises_fails_the_job_naming_it():
    def returns(model, opt, step):
        return model

    with pytest.raises(TypeError, match=r"step hook 2 \(.*returns\) returned a MLP"):
        losses(step_hooks={2: returns})

    def breaks(model, opt, step):
        raise ValueError("boom")

    with pytest.raises(RuntimeError, match=r"step hook \(1, 3\) \(.*breaks\) raised at step 1: ValueError: boom"):
        losses(step_hooks={(1, 3): breaks})


@pytest.mark.parametrize("hooks, message", [
    ([kick], "must be a dict"),
    ({1.5: kick}, r"entry 1.5: a key is a step \(int\)"),
    ({"3": kick}, "entry '3'"),
    ({True: kick}, "entry True"),
    ({-1: kick}, "step -1 is negative"),
    ({(4, 4): kick}, r"start 4 >= end 4"),
    ({(5, 2): kick}, r"start 5 >= end 2"),
    ({(-2, 3): kick}, "start -2 is negative"),
    ({(1, 2, 3): kick}, r"pair of ints \(start, end\)"),
    ({3: "kick"}, "entry 3: the hook is a str, not a function"),
    ({3: lambda model, opt: None}, r"cannot take the arguments \(model, opt, step\)"),
    ({3: lambda model, opt, step, eps: None}, r"requires \['eps'\], which the config does not hold"),
])
def test_bad_step_hooks_are_named_errors_before_any_training(hooks, message):
    trained = []

    def bfn(bsz, gen, X=None, y=None, dim=8):
        trained.append(bsz)
        return powerlaw_bfn(bsz, gen, X, y, dim=dim)

    with pytest.raises(ConfigError, match=message):
        run_job_iterator([[16], [0]], ["WIDTH", "trial"], {**CFG, "step_hooks": hooks}, dict(base_bfn=bfn),
                         executor="inprocess", store=False, progress=False)
    assert not trained


def test_hooks_may_name_config_keys_and_sweep_axes():
    got = []

    def scaled(model, opt, step, eps, trial):
        got.append((eps, trial))

    res = run_job_iterator([[0.0, 0.5], [0, 1]], ["eps", "trial"], {**CFG, "MAX_ITER": 2, "step_hooks": {0: scaled}},
                           BFN, executor="inprocess", store=False, progress=False)
    assert sorted(got) == [(0.0, 0), (0.0, 1), (0.5, 0), (0.5, 1)]
    assert res.status_counts() == {"not_reached": 4}
    with pytest.raises(ConfigError, match="step_hooks is in bfn_config"):
        run_config(CFG, {**BFN, "step_hooks": {0: kick}}, quiet=True)


def test_an_idle_step_costs_one_comparison():
    calls = []
    obs = StepHooks(check_step_hooks({10: kick, (20, 23): kick}), {})
    plan = obs._plan
    obs._plan = lambda step: (calls.append(step), plan(step))[1]
    model, opt = torch.nn.Linear(2, 1), None
    for step in range(100):
        obs.before_step(step, model, opt)
    assert calls == [0, 10, 11, 20, 23]  # replanned only where the hooks due change


def test_jobs_with_hooks_are_not_fused_and_the_reason_is_logged(caplog):
    cfgs = [canonicalize({**CFG, "FUSE": "auto", "LR": lr, "step_hooks": {0: kick}}) for lr in (0.1, 0.2)]
    with caplog.at_level(logging.WARNING):
        assert plan_units(list(enumerate(cfgs))) == [[0], [1]]
    assert "step_hooks act on the model between steps" in caplog.text
    job = prepare_job({**CFG, "step_hooks": {0: kick}}, BFN, quiet=True)
    assert "StepHooks acts on the model before steps" in why_not_fusable(job)


# --- identity: a changed hook trains anew, an unchanged one resumes -------------------------------------

HOOK = '''
import torch

def perturb(model, opt, step):
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
'''


def make_hook(source):
    ns = {"__name__": "user_hooks"}
    exec(compile(source, "user_hooks.py", "exec"), ns)
    return ns["perturb"]


def test_hooks_are_part_of_a_jobs_identity():
    cfg = canonicalize({**CFG, "step_hooks": {(0, 3): make_hook(HOOK)}})
    same = canonicalize({**CFG, "step_hooks": {(np.int64(0), 3): make_hook("# a comment\n" + HOOK)}})
    other_range = canonicalize({**CFG, "step_hooks": {(0, 4): make_hook(HOOK)}})
    other_body = canonicalize({**CFG, "step_hooks": {(0, 3): make_hook(HOOK.replace("1.1", "1.2"))}})
    ids = [job_identity(c, BFN, {}) for c in (cfg, same, other_range, other_body)]
    assert ids[0] == ids[1] and len(set(ids)) == 3


def test_a_changed_hook_trains_anew_on_resume_and_an_unchanged_one_resumes(tmp_path):
    def sweep(source):
        cfg = {**CFG, "MAX_ITER": 4, "step_hooks": {1: make_hook(source)}}
        res = run_job_iterator([[0]], ["trial"], cfg, BFN, executor="inprocess", store=tmp_path / "s",
                               progress=False)
        return res.records[0]

    first = sweep(HOOK)
    again = sweep(HOOK.replace("for p in", "for p in  ").replace("import torch", "import torch  # comment"))
    assert again["job_id"] == first["job_id"] and again["wall_time"] == first["wall_time"]  # read back
    changed = sweep(HOOK.replace("1.1", "0.9"))
    assert changed["job_id"] != first["job_id"]
    assert changed["train_loss"] != first["train_loss"]  # trained anew, with the new hook


def test_a_hooked_jobs_identity_is_the_same_in_another_process():
    import subprocess
    import sys
    from pathlib import Path

    here = job_identity(canonicalize({**CFG, "step_hooks": {(0, 3): kick, 7: kick}}), BFN, {"trial": 0})
    tests = Path(__file__).resolve().parent
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import test_interventions as t; "
            "print(t.job_identity(t.canonicalize({**t.CFG, 'step_hooks': {(0, 3): t.kick, 7: t.kick}}), t.BFN, "
            "{'trial': 0}))")
    out = subprocess.run([sys.executable, "-c", code, str(tests)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == here  # tuple keys and hook code hash the same in every process
