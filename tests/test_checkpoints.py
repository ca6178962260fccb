"""CHECKPOINTS: the saved weights are exactly the model at their step, load back as the job's model (in this
process and in a fresh one), carry the optimizer's state, and are listed by `modelscape show`."""
import json
import subprocess
import sys

import numpy as np
import pytest
from deadlines import scaled  # noqa: E402  (deadlines stretched on a busy machine)
import torch

import modelscape
from modelscape.backend import checkpoints, fused
from modelscape.backend.job import prepare_job, run_config, train_prepared
from modelscape.backend.job_iterator import main
from modelscape.backend.trainloop import LoopObserver
from modelscape.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAINED = []  # one entry per job a batch function was built for (prepare_job calls the base bfn)
PROBE = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))


def linear_bfn(bsz, gen, X=None, y=None):
    TRAINED.append(bsz)
    w = torch.tensor([1.0, -0.5, 0.25, 0.5], device=gen.device)

    def batch(step):
        if X is not None:
            return X, y
        x = torch.randn(bsz, 4, generator=gen, device=gen.device)
        return x, x @ w
    return batch


BFN = dict(base_bfn=linear_bfn)
TINY = dict(WIDTH=16, DEPTH=2, N_SAMPLES=32, N_TEST=64, MAX_ITER=40, LOSS_CHECKPOINTS=[0.5, 0.2], LR=0.05,
            SYNC_EVERY=4, EVAL_EVERY=0)


def sweep(tmp_path, lrs=(0.05,), **cfg):
    return main([list(lrs), [0]], ["LR", "trial"], dict(TINY, **cfg), BFN, executor="inprocess",
                store=tmp_path / "expt", progress=False)


class Recorder(LoopObserver):
    """The reference: the trained function's outputs on PROBE before every step and at the end."""

    def __init__(self, net):
        self.net, self.outputs = net, {}

    def before_step(self, step, model, opt):
        self.outputs[step] = out(self.net)

    def at_end(self, record, model, opt):
        self.outputs["final"] = out(self.net)


def reference(device, lr=0.05, **cfg):
    """The same job trained by itself on ``device`` (the sweep's: the same data, the same arithmetic), with its
    outputs recorded at every step."""
    job = prepare_job(dict(TINY, LR=lr, trial=0, **cfg), BFN, device, axes={"LR": lr, "trial": 0})
    rec = Recorder(job.net)
    job.observers.append(rec)
    return train_prepared(job), rec.outputs, job


def out(model):
    """The model's outputs on PROBE, computed on the model's device, brought to the CPU."""
    with torch.no_grad():
        return model(PROBE.to(next(model.parameters()).device)).cpu()


def test_step_and_threshold_checkpoints_are_the_model_at_that_step(tmp_path, job_device):
    res = sweep(tmp_path, CHECKPOINTS=[0, 5, 9, "thresholds", "final"])
    record = res.records[0]
    ref, outputs, _ = reference(job_device)
    assert record["timekeys"].tolist() == ref["timekeys"].tolist()
    timekeys = [int(t) for t in record["timekeys"]]
    # a crossing read back after the loop had moved on (SYNC_EVERY=4): only the ring of states can save it
    assert any((t + 1) % 4 for t in timekeys)
    for step in (0, 5, 9):
        assert torch.equal(out(res.checkpoint(LR=0.05, trial=0, step=step, device=job_device)), outputs[step])
    for thr, t in zip(TINY["LOSS_CHECKPOINTS"], timekeys):
        assert torch.equal(out(res.checkpoint(LR=0.05, threshold=thr, device=job_device)), outputs[t])
    final = res.checkpoint(LR=0.05, step="final", device=job_device)
    assert torch.equal(out(final), outputs["final"])
    assert type(final).__name__ == "Centered"  # CENTER: what was trained, f - f0, with f0 the model at init
    assert torch.equal(out(final.baseline), out(res.checkpoint(LR=0.05, step=0, device=job_device).model))
    labels = [e["label"] for e in record["checkpoints"]]
    assert labels == ["step 0", "step 5", "step 9", "threshold 0.5", "threshold 0.2", "final"]
    assert all(e["bytes"] > 0 for e in record["checkpoints"])


def test_without_center_the_users_model_comes_back_with_its_muP_multipliers(tmp_path, job_device):
    res = sweep(tmp_path, CHECKPOINTS=[3], CENTER=False, GAMMA=2.0)
    _, outputs, job = reference(job_device, CENTER=False, GAMMA=2.0)
    model = res.checkpoint(LR=0.05, step=3, device=job_device)
    assert type(model) is type(job.model)
    assert torch.equal(out(model), outputs[3])
    assert [getattr(m, "_mup_gamma", 1.0) for m in model.modules()] == \
        [getattr(m, "_mup_gamma", 1.0) for m in job.model.modules()]


@pytest.mark.parametrize("optimizer", [dict(OPTIMIZER="SGD", MOMENTUM=0.9), dict(OPTIMIZER="Adam", LR=0.01)])
def test_the_optimizer_state_lets_training_continue_as_it_went(tmp_path, optimizer, job_device):
    cfg = dict(ONLINE=False, ONLYTHRESHOLDS=False, LOSS_CHECKPOINTS=[1e-9], MAX_ITER=12, **optimizer)
    lr = cfg.pop("LR", 0.05)
    res = sweep(tmp_path, lrs=(lr,), CHECKPOINTS=[6], CHECKPOINT_OPTIMIZER=True, **cfg)
    raw = res.records[0]["train_raw"]
    job = prepare_job(dict(TINY, LR=lr, trial=0, **cfg), BFN, job_device)  # only for the fixed training set
    net, opt = res.checkpoint(LR=lr, step=6, optimizer=True, device=job_device)
    assert opt.state  # momentum buffers / Adam moments came back
    losses = []
    for _ in range(4):
        loss = torch.nn.functional.mse_loss(net(job.X_tr).reshape(job.y_tr.shape), job.y_tr)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    np.testing.assert_allclose(losses, raw[6:10], rtol=1e-6)


MODEL_SOURCE = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self, d_in, d_out, WIDTH):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, WIDTH), nn.Tanh(), nn.Linear(WIDTH, d_out))

    def forward(self, x):
        return self.body(x)
"""


def test_a_fresh_process_loads_a_checkpoint_from_the_store(tmp_path):
    res = sweep(tmp_path, lrs=(0.05, 0.1), CHECKPOINTS=["final"])
    # a class from MODEL_FILE: a store does not make a process run a file it names; the reader loads it itself
    (tmp_path / "net.py").write_text(MODEL_SOURCE)
    from_file = main([[0.05], [0]], ["LR", "trial"], dict(TINY, CHECKPOINTS=[4], MODEL_FILE=str(tmp_path / "net.py"),
                                                          MODEL_NAME="Net"),
                     BFN, executor="inprocess", store=tmp_path / "expt2", progress=False)
    code = f"""
import json, sys, torch
import modelscape
from modelscape.backend.checkpoints import CheckpointError
from modelscape.utils import load_from_file
probe = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
try:
    modelscape.load({str(tmp_path / 'expt2')!r}).checkpoint(step=4)
except CheckpointError as e:
    assert "MODEL_FILE" in str(e) and "model_class=" in str(e), e
else:
    raise AssertionError("loaded a class from a file the store names")
with torch.no_grad():
    a = modelscape.load({str(tmp_path / 'expt')!r}).checkpoint(LR=0.1, trial=0, step='final')(probe)
    Net = load_from_file({str(tmp_path / 'net.py')!r}, "Net")
    b = modelscape.load({str(tmp_path / 'expt2')!r}).checkpoint(step=4, model_class=Net)(probe)
print(json.dumps([a.tolist(), b.tolist()]))
"""
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=scaled(120),
                         cwd=tmp_path.parent)  # net.py is not importable from there
    assert got.returncode == 0, got.stderr
    a, b = json.loads(got.stdout)
    assert torch.equal(torch.tensor(a), out(res.checkpoint(LR=0.1, step="final")))
    model = from_file.checkpoint(step=4)
    assert type(model.model).__name__ == "Net"
    assert torch.equal(torch.tensor(b), out(model))


def test_show_lists_checkpoints_and_their_size_and_the_sweep_prints_the_total(tmp_path, capsys):
    main([[0.05], [0]], ["LR", "trial"], dict(TINY, CHECKPOINTS=[0, "final"]), BFN, executor="inprocess",
         store=tmp_path / "expt", progress=True)
    err = capsys.readouterr().err
    files, size = checkpoints.disk_use(tmp_path / "expt")
    assert files == 4  # step 0, final, the model's description and its baseline's weights
    assert f"checkpoints: 4 files, {checkpoints.human_bytes(size)} in {tmp_path / 'expt' / 'checkpoints'}" in err
    from modelscape.cli import main as cli
    assert cli(["show", str(tmp_path / "expt")]) == 0
    shown = capsys.readouterr().out
    record = modelscape.load(tmp_path / "expt").records[0]
    per_job = checkpoints.human_bytes(sum(e["bytes"] for e in record["checkpoints"]))
    assert "checkpoints" in shown.splitlines()[0]
    assert f"2: 0, final ({per_job})" in shown
    assert f"checkpoints: 4 files, {checkpoints.human_bytes(size)}" in shown


def test_final_alone_stays_fused_and_saves_each_members_model(tmp_path, monkeypatch, job_device):
    calls = []
    real = fused.train_fused
    monkeypatch.setattr(fused, "train_fused", lambda jobs: calls.append(len(jobs)) or real(jobs))
    res = sweep(tmp_path, lrs=(0.05, 0.1), CHECKPOINTS=["final"])
    assert calls == [2]
    for r in res.records:
        lr = r["axes"]["LR"]
        job = prepare_job(dict(TINY, LR=lr, trial=0), BFN, job_device)  # the sweep's test set
        with torch.no_grad():
            y = res.checkpoint(LR=lr, step="final", device=job_device)(job.X_te)
        assert float(torch.nn.functional.mse_loss(y.reshape(job.y_te.shape), job.y_te)) == r["test_loss"]
    # the optimizer's state lives in the fused trainer's stack: asking for it trains the job alone
    job = prepare_job(dict(TINY, CHECKPOINTS=["final"], CHECKPOINT_OPTIMIZER=True, JOB_ID="x",
                           RESULTS_DIR=str(tmp_path)), BFN)
    assert "optimizer state" in fused.why_not_fusable(job)


def test_a_stored_job_lacking_requested_checkpoints_trains_again(tmp_path):
    sweep(tmp_path)
    TRAINED.clear()
    res = sweep(tmp_path, CHECKPOINTS=["final"])
    assert TRAINED and res.records[0]["checkpoints"]
    TRAINED.clear()
    sweep(tmp_path, CHECKPOINTS=["final"])
    assert TRAINED == []  # all there: nothing trains
    (tmp_path / "expt" / res.records[0]["checkpoints"][0]["file"]).unlink()
    sweep(tmp_path, CHECKPOINTS=["final"])
    assert TRAINED  # a file went missing: trained and written again
    assert checkpoints.satisfied(modelscape.load(tmp_path / "expt").records[0], {"CHECKPOINTS": ["final"]},
                                 tmp_path / "expt")


def test_errors_name_the_key_the_job_and_what_exists(tmp_path):
    with pytest.raises(ConfigError, match=r"CHECKPOINTS: 'best'"):
        sweep(tmp_path, CHECKPOINTS=[10, "best"])
    with pytest.raises(ConfigError, match=r"CHECKPOINTS: -5"):
        sweep(tmp_path, CHECKPOINTS=[-5])
    assert not (tmp_path / "expt").exists()
    TRAINED.clear()
    with pytest.raises(ConfigError, match="CHECKPOINTS is set but the sweep keeps no store"):
        main([[0.05]], ["LR"], dict(TINY, CHECKPOINTS=["final"]), BFN, executor="inprocess", store=False,
             progress=False)
    with pytest.raises(ConfigError, match="CHECKPOINTS is set but this job has no store id"):
        run_config(dict(TINY, CHECKPOINTS=["final"]), BFN)

    res = sweep(tmp_path, lrs=(0.05, 0.1), CHECKPOINTS=[0, "final"])
    with pytest.raises(KeyError, match=r"no stored job with \{'LR': 0.2, 'trial': 0\}.*LR takes \[0.05, 0.1\]"):
        res.checkpoint(LR=0.2, step=0)
    with pytest.raises(KeyError, match="give a value for axis LR"):
        res.checkpoint(step=0)
    with pytest.raises(ValueError, match=r"no checkpoint at step 7 .*its checkpoints: step 0, final \(step \d+\)"):
        res.checkpoint(LR=0.05, step=7)
    with pytest.raises(ValueError, match="no checkpoint at threshold 0.3"):
        res.checkpoint(LR=0.05, threshold=0.3)
    with pytest.raises(ValueError, match="without CHECKPOINT_OPTIMIZER"):
        res.checkpoint(LR=0.05, step=0, optimizer=True)
    (tmp_path / "expt" / res.records[0]["checkpoints"][0]["file"]).unlink()
    with pytest.raises(FileNotFoundError, match="step-0.safetensors is missing"):
        res.checkpoint(LR=0.05, step=0)


def test_the_command_line_takes_steps_and_words():
    from modelscape.backend.cli import parse_args
    from modelscape.config import canonicalize
    args = parse_args(["--CHECKPOINTS", "0", "5e2", "thresholds", "final", "--CHECKPOINT_OPTIMIZER", "true"])
    cfg = canonicalize(vars(args))
    assert cfg["CHECKPOINTS"] == [0, 500, "thresholds", "final"] and cfg["CHECKPOINT_OPTIMIZER"] is True
    assert checkpoints.plan(cfg) == ([0, 500], True, True)


def test_a_record_from_a_shard_file_finds_its_checkpoints(tmp_path):
    """A Slurm array task writes its records to shard-*.db beside results.db, and its checkpoints beside both."""
    from modelscape.backend.store import Store, shard_path
    expt = tmp_path / "expt"
    res = main([[0.05], [0]], ["LR", "trial"], dict(TINY, CHECKPOINTS=["final"]), BFN, executor="inprocess",
               store=shard_path(expt, "task0"), progress=False)
    assert not (expt / "results.db").exists() and (expt / "checkpoints").is_dir()
    with Store(expt) as st:  # the driver's file records the sweep; the job's row lives in the shard file
        st.begin_sweep(["LR", "trial"], [[0.05], [0]], [res.records[0]["job_id"]])
    loaded = modelscape.load(expt)
    assert torch.equal(out(loaded.checkpoint(LR=0.05, step="final")), out(res.checkpoint(LR=0.05, step="final")))


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(5, 3)
            self.out = torch.nn.Linear(3, 5, bias=False)
            self.out.weight = self.emb.weight

    model = Tied()
    tensors, meta = checkpoints.flatten_model(model.state_dict())
    assert list(tensors) == ["emb.weight"] and meta["aliases"] == {"out.weight": "emb.weight"}
    checkpoints.write_tensors(tmp_path / "t.safetensors", tensors, meta, {"step": 0})
    back, meta = checkpoints.read_tensors(tmp_path / "t.safetensors")
    assert meta["step"] == 0 and torch.equal(back["emb.weight"], model.emb.weight)


def test_jobs_with_step_or_threshold_checkpoints_are_planned_as_units_of_their_own():
    from modelscape.config import canonicalize
    base = dict(WIDTH=8, DEPTH=2, MAX_ITER=5)
    configs = [dict(base, LR=0.1), dict(base, LR=0.2), dict(base, LR=0.3, CHECKPOINTS=[2]),
               dict(base, LR=0.4, CHECKPOINTS=["thresholds"]), dict(base, LR=0.5, CHECKPOINTS=["final"]),
               dict(base, LR=0.6, CHECKPOINTS=["final"]), dict(base, LR=0.7, CHECKPOINTS=[2]),
               dict(base, LR=0.8, CHECKPOINTS=["final"], CHECKPOINT_OPTIMIZER=True),
               dict(base, LR=0.9, CHECKPOINTS=["final"], CHECKPOINT_OPTIMIZER=True)]
    units = fused.plan_units([(i, canonicalize(c)) for i, c in enumerate(configs)])
    # final alone fuses (with the jobs that ask the same); steps, thresholds or the optimizer's state do not
    assert sorted(units) == [[0, 1], [2], [3], [4, 5], [6], [7], [8]]


def test_a_gpt_under_mup_and_depth_rules_loads_back_as_it_trained(tmp_path, job_device):
    """The attention's muP logit scale (1/d_head, which the constructor does not set) and the residual branches'
    depth multipliers come back with the weights: the loaded GPT computes what the trained one did."""
    from modelscape.data import markov_bfn

    cfg = dict(MODEL="GPT", WIDTH=32, DEPTH=2, n_heads=2, OPTIMIZER="Adam", LR=0.01, LOSS="cross_entropy",
               PARAMETERIZATION="mup", DEPTH_ALPHA=1.0, ONLINE=True, N_SAMPLES=4, N_TEST=16, MAX_ITER=5,
               LOSS_CHECKPOINTS=[1e-9], vocab_size=16, seq_len=8, CENTER=False)
    res = main([[0]], ["trial"], dict(cfg, CHECKPOINTS=["final"]), dict(base_bfn=markov_bfn), executor="inprocess",
               store=tmp_path / "gpt", progress=False)
    job = prepare_job(dict(cfg, trial=0), dict(base_bfn=markov_bfn), job_device, axes={"trial": 0})
    train_prepared(job)
    loaded = res.checkpoint(trial=0, step="final").to(job_device)
    tokens = torch.randint(0, 16, (4, 8), generator=torch.Generator().manual_seed(1)).to(job_device)
    assert loaded.blocks[0].attn.attn_scale == job.model.blocks[0].attn.attn_scale == 1 / 16  # 1/d_head
    assert loaded.blocks[1].fc2._mup_mult == job.model.blocks[1].fc2._mup_mult
    with torch.no_grad():
        assert torch.equal(loaded(tokens), job.model(tokens))
    # a checkpoint written before the scale was recorded says so when it loads
    folder = next((tmp_path / "gpt" / "checkpoints").rglob("model.json")).parent
    desc = json.loads((folder / "model.json").read_text())
    for attrs in desc["model"]["modules"].values():
        attrs.pop("attn_scale", None)
    (folder / "model.json").write_text(json.dumps(desc))
    unscaled = r"does not record the attention scale of \['blocks.0.attn', 'blocks.1.attn'\]"
    with pytest.warns(UserWarning, match=unscaled):
        res.checkpoint(trial=0, step="final")
