"""The examples run, with small arguments, and leave behind what they claim: a results store and figures.

Each script runs in a subprocess (as a user runs it) with a temporary ``--out`` folder; the notebook is
executed headless by nbclient on a kernel that runs this interpreter (no ``ipykernel install`` needed).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from deadlines import scaled  # noqa: E402  (deadlines stretched on a busy machine)

import modelscape

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
STATUSES = {"done", "not_reached", "diverged", "failed"}


def env():
    e = dict(os.environ)
    # Tiny models: one thread each is fastest, and keeps a busy CI machine from thrashing.
    e.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONWARNINGS="ignore")
    return e


def run_example(name, out, *args, timeout=240):
    timeout = scaled(timeout)
    cmd = [sys.executable, str(EXAMPLES / name), "--out", str(out), *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} failed:\nSTDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-3000:]}"
    return proc.stdout


def check_png(path, min_bytes=15_000):
    assert path.exists(), f"{path} was not written"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert len(data) > min_bytes, f"{path} is only {len(data)} bytes: an empty figure?"


def check_store(out, axes, n_jobs):
    assert (out / "results.db").exists()
    res = modelscape.load(out)
    assert res.axis_names == list(axes)
    for name, values in axes.items():
        assert res.axis_values[res.axis_names.index(name)] == values
    assert len(res.records) == n_jobs
    statuses = {r["status"] for r in res.records}
    assert statuses <= STATUSES and "failed" not in statuses, [r.get("error") for r in res.failed()]
    return res


def test_synthetic_example(tmp_path):
    out = tmp_path / "synthetic"
    stdout = run_example("example_synthetic_run.py", out, "--N_SAMPLES", 4, 64, "--NUM_TRIALS", 2,
                         "--MAX_ITER", 150, "--WIDTH", 32, "--LOSS_CHECKPOINTS", 0.3, 0.1)
    res = check_store(out, {"N_SAMPLES": [4, 64], "trial": [0, 1]}, 4)
    ds = res.to_xarray()
    assert ds.sizes["threshold"] == 2
    assert np.isfinite(ds["timekeys"].isel(threshold=0).values).all()  # loss < 0.3 is easy
    # what it prints is what the store holds
    assert "steps to reach each train loss" in stdout
    mean_first = float(ds["timekeys"].sel(N_SAMPLES=64).isel(threshold=0).mean())
    row = next(line for line in stdout.splitlines() if line.strip().startswith("64 "))
    assert f"{mean_first:.0f} (2/2)" in row
    check_png(out / "timekeys.png")


def test_synthetic_example_rerun_resumes_from_its_store(tmp_path):
    out = tmp_path / "synthetic"
    args = ["--N_SAMPLES", 8, "--NUM_TRIALS", 1, "--MAX_ITER", 50, "--WIDTH", 16]
    run_example("example_synthetic_run.py", out, *args)
    first = {r["job_id"]: r["wall_time"] for r in modelscape.load(out).records}
    run_example("example_synthetic_run.py", out, *args)
    again = {r["job_id"]: r["wall_time"] for r in modelscape.load(out).records}
    assert again == first  # read back, not recomputed


def test_digits_example(tmp_path):
    out = tmp_path / "digits"
    stdout = run_example("example_digits_run.py", out, "--WIDTH", 16, 64, "--GAMMA", 1, 4, "--NUM_TRIALS", 1,
                         "--MAX_ITER", 60, "--N_SAMPLES", 300, "--EVAL_EVERY", 20)
    res = check_store(out, {"WIDTH": [16, 64], "GAMMA": [1.0, 4.0], "trial": [0]}, 4)
    ds = res.to_xarray()
    assert {"train_curve", "test_curve", "grab_acc"} <= set(ds.data_vars)
    acc = ds["grab_acc"].max("eval_step").values
    assert np.all(acc > 0.5), acc  # well above chance (0.1) after 60 full-batch steps
    assert "final test accuracy" in stdout and "10 classes" in stdout
    check_png(out / "loss_curves_train.png")
    check_png(out / "loss_curves_test.png")
    cfg = res.records[0]["config"]
    assert cfg["ONLINE"] is False and cfg["PARAMETERIZATION"] == "mup" and cfg["LOSS"] == "cross_entropy"


def test_digits_example_binary(tmp_path):
    out = tmp_path / "digits_binary"
    stdout = run_example("example_digits_run.py", out, "--binary", "--WIDTH", 16, "--GAMMA", 1,
                         "--NUM_TRIALS", 1, "--MAX_ITER", 40, "--N_SAMPLES", 200)
    res = check_store(out, {"WIDTH": [16], "GAMMA": [1.0], "trial": [0]}, 1)
    assert res.records[0]["config"]["LOSS"] == "mse"
    assert "even vs odd" in stdout
    assert float(np.nanmax(res.to_xarray()["grab_acc"].values)) > 0.6


def test_lr_transfer_example(tmp_path):
    from modelscape.backend.store import Store

    out = tmp_path / "transfer"
    stdout = run_example("example_lr_transfer.py", out, "--WIDTH", 16, 32, "--LR", 0.5, 4, "--MAX_ITER", 8,
                         "--N_SAMPLES", 32)
    for task in ("digits", "gpt"):
        store = out / task
        with Store(store, readonly=True) as st:
            sweeps = st.sweeps()
        assert [s["axis_values"][0] for s in sweeps] == [["sp"], ["mup"]]  # one sweep per parameterization
        for sweep in sweeps:
            res = modelscape.load(store, sweep=sweep["id"])
            assert res.axis_names == ["PARAMETERIZATION", "WIDTH", "LR", "trial"]
            assert len(res.records) == 4 and not res.failed(), [r.get("error") for r in res.failed()]
            model = {r["config"]["MODEL"] for r in res.records}
            assert model == ({"MLP"} if task == "digits" else {"GPT"})
        check_png(store / "lr_transfer.png")
        section = stdout.split(f"[{task}]")[1]
        for p in ("sp", "mup"):
            line = next(ln for ln in section.splitlines() if ln.strip().startswith(f"{p}: width"))
            assert "width 16 -> LR" in line and "width 32 -> LR" in line

    # --PARAMETERIZATION runs that parameterization alone, and its jobs are trained under it
    out = tmp_path / "only_ntp"
    run_example("example_lr_transfer.py", out, "--task", "digits", "--PARAMETERIZATION", "ntp", "--WIDTH", 16,
                "--LR", 1, "--MAX_ITER", 3)
    res = modelscape.load(out / "digits")
    assert res.axis_values[0] == ["ntp"] and len(res.records) == 1
    assert res.records[0]["config"]["PARAMETERIZATION"] == "ntp"


def test_mutransfer_example(tmp_path):
    out = tmp_path / "mutransfer"
    stdout = run_example("example_mutransfer.py", out, "--base-width", 16, "--widths", 32, "--lrs", -7, -5,
                         "--mults", 1, 2, "--MAX_ITER", 6, "--N_TEST", 16, "--N_SAMPLES", 4)
    numbers = json.loads((out / "mutransfer.json").read_text())
    assert numbers["tuned"]["LR"] in (2 ** -7, 2 ** -5) and numbers["full_width"] == 32
    # at the base width mup is sp, and the transferred run is one point of the full sweep at 32
    assert numbers["transferred"]["mup"]["16"] == numbers["transferred"]["sp"]["16"]
    tuned = f"{numbers['tuned']['LR']:g},{numbers['tuned']['OUTPUT_MULT']:g}"
    assert numbers["transferred"]["mup"]["32"] == numbers["full_grid"][tuned]
    assert numbers["gap_percent"] >= 0 and "gap of the transferred run" in stdout
    res = modelscape.load(out)
    assert {r["config"]["BASE_WIDTH"] for r in res.records} == {16}
    check_png(out / "mutransfer.png")


def test_depth_transfer_example(tmp_path):
    out = tmp_path / "depth"
    stdout = run_example("example_depth_transfer.py", out, "--depths", 2, 4, "--alphas", 0, 1, "--lrs", -4, -2,
                         "--MAX_ITER", 4,
                         "--NUM_TRIALS", 1, "--N_TEST", 16, "--WIDTH", 16)
    res = modelscape.load(out)
    assert {(r["config"]["DEPTH_ALPHA"], r["config"]["DEPTH"]) for r in res.records} == \
        {(a, d) for a in (0.0, 1.0) for d in (2, 4)}
    assert "octaves per doubling of depth" in stdout and "residual stream" in stdout
    check_png(out / "depth_transfer.png")
    check_png(out / "coord_check_depth.png")


def load_example(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("example_*.py")))
def test_every_example_lists_out_in_its_help(name, monkeypatch, capsys):
    module = load_example(name)
    monkeypatch.setattr(sys, "argv", [name, "--help"])
    with pytest.raises(SystemExit) as exit_:
        module.main()
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    assert "--out OUT" in help_text, help_text[:2000]


@pytest.mark.parametrize("name", ["example_synthetic_run.py", "example_digits_run.py", "example_lr_transfer.py",
                                  "example_perturb_init.py", "example_mutransfer.py", "example_depth_transfer.py"])
def test_examples_store_under_out_or_results_dir_and_expt_name(name):
    parse = load_example(name).parse  # each returns the output folder first
    assert parse([])[0] == os.path.join("results", name[:-3])
    assert parse(["--RESULTS_DIR", "runs", "--EXPT_NAME", "mine"])[0] == os.path.join("runs", "mine")
    assert parse(["--out", "here", "--EXPT_NAME", "mine"])[0] == "here"


def test_lr_transfer_sweeps_the_parameterization_given():
    module = load_example("example_lr_transfer.py")

    def planned(*flags):
        _, _, base, overrides = module.parse(["--task", "digits", "--WIDTH", "16", *flags])
        cfg, _, sweeps = module.plan_task("digits", base, overrides)
        return {iterators[0][0]: iterators[2] for iterators, names in sweeps}, cfg

    both, _ = planned()
    assert list(both) == ["sp", "mup"] and both["sp"] != both["mup"]
    ntp, cfg = planned("--PARAMETERIZATION", "ntp")
    assert list(ntp) == ["ntp"] and set(ntp["ntp"]) == set(both["sp"]) | set(both["mup"])
    assert planned("--PARAMETERIZATION", "auto")[0] == {"auto": both["mup"]}
    assert planned("--PARAMETERIZATION", "sp", "--LR", "0.5", "0.25")[0] == {"sp": [0.25, 0.5]}


def test_perturb_init_example(tmp_path):
    out = tmp_path / "perturb"
    stdout = run_example("example_perturb_init.py", out, "--eps", 0.1, "--NUM_TRIALS", 2, "--MAX_ITER", 20,
                         "--WIDTH", 16, "--N_TEST", 64, "--EVAL_EVERY", 5)
    res = check_store(out, {"eps": [0.0, 0.1], "trial": [0, 1]}, 4)  # the control is always run
    test = res.to_xarray()["test_curve"]
    assert list(test["eval_step"].values) == [0, 5, 10, 15, 20]
    # the hook perturbs the initialization: the very first evaluation already differs, in every trial
    assert np.all(test.sel(eps=0.1, eval_step=0).values != test.sel(eps=0.0, eval_step=0).values)
    assert res.records[0]["config"]["step_hooks"] == {"0": "__main__.perturb"}
    assert "relative distance from the control" in stdout
    check_png(out / "perturb_init.png")


def test_coord_check_example_on_the_gpt(tmp_path):
    out = tmp_path / "cc"
    stdout = run_example("example_coord_check.py", out, "--model", "gpt", "--optimizer", "Adam", "--widths", 16, 32,
                         "--steps", 1)
    for param in ("sp", "mup"):
        check_png(out / f"coord_check_gpt_adam_{param}.png")
    assert "mup: largest max/min ratio across widths" in stdout


def _kernel_manager(tmp_path):
    """A KernelManager whose kernel runs this interpreter, whatever kernels the machine has installed."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    kernels = tmp_path / "kernels"
    (kernels / "modelscape-test").mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "modelscape test kernel", "language": "python"}
    (kernels / "modelscape-test" / "kernel.json").write_text(json.dumps(spec))
    ksm = KernelSpecManager(kernel_dirs=[str(kernels)])
    return KernelManager(kernel_name="modelscape-test", kernel_spec_manager=ksm)


@pytest.mark.slow
def test_notebook_executes_every_cell(tmp_path, monkeypatch):
    import nbformat
    import nbclient
    import ipykernel  # noqa: F401
    out = tmp_path / "notebook"
    for k, v in env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MODELSCAPE_NOTEBOOK_OUT", str(out))
    nb = nbformat.read(EXAMPLES / "notebook_example.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    km = _kernel_manager(tmp_path)
    client = nbclient.NotebookClient(nb, km=km, kernel_name="modelscape-test", timeout=int(scaled(240)),
                                     resources={"metadata": {"path": str(ROOT)}})
    try:
        client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    finally:
        # nbclient shuts down only a kernel it made itself; this one is ours to end (it lingered for minutes)
        kernel = km.provisioner.process if km.has_kernel and km.provisioner is not None else None
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    assert kernel is not None and kernel.poll() is not None, "the notebook's kernel outlived its test"

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "a code cell did not run"
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert any("image/png" in o.get("data", {}) for o in code[-1].outputs), "the plot was not displayed"
    source = "\n".join(c.source for c in code)
    assert "base_args()" in source and 'EXECUTOR="pool"' in source and "WORKERS_PER_DEVICE=2" in source
    res = check_store(out, {"WIDTH": [32, 128, 512], "trial": [0, 1]}, 6)
    assert "grab_readout_norm" in res.to_xarray()
    check_png(out / "loss_curves.png")


# --- the digits batch function the examples use ----------------------------------------------------------

def _rows(X):
    return {r.tobytes() for r in X.cpu().numpy()}


def test_digits_split_is_fixed_stratified_and_disjoint():
    import torch
    from modelscape.data import digits_pools

    X_tr, y_tr, X_te, y_te = digits_pools()
    assert X_tr.shape == (1347, 64) and X_te.shape == (450, 64) and X_tr.dtype == torch.float32
    assert not _rows(X_tr) & _rows(X_te)
    assert torch.bincount(y_te).tolist() == [44, 46, 44, 46, 45, 46, 45, 45, 44, 45]  # a quarter of each digit
    assert abs(float(X_tr.mean())) < 1e-5 and abs(float(X_tr.var(0).mean()) - 1) < 0.01
    again = digits_pools()
    assert torch.equal(again[2], X_te)
    other = digits_pools(split_seed=1)
    assert not torch.equal(other[2], X_te)


def test_digits_bfn_draws_only_training_images(job_device):
    import torch
    from modelscape.data import digits_bfn, digits_pools, digits_test_set

    X_pool, _, X_held, _ = digits_pools()
    gen = torch.Generator(device=job_device).manual_seed(0)  # as a job's: its images come on its device
    bfn = digits_bfn(500, gen)
    Xa, ya = bfn(0)
    Xb, _ = bfn(1)
    assert Xa.device == ya.device == job_device
    assert Xa.shape == (500, 64) and ya.dtype == torch.int64 and len(_rows(Xa)) == 500
    assert _rows(Xa) <= _rows(X_pool) and not _rows(Xa) & _rows(X_held)
    assert not torch.equal(Xa, Xb)  # online: fresh images every step
    fixed = digits_bfn(500, gen, X=Xa, y=ya)
    assert fixed(0)[0] is Xa and fixed(7)[0] is Xa  # offline: the same set every step
    X_te, y_te = digits_test_set()
    assert torch.equal(X_te, X_held)
    assert torch.equal(digits_bfn(10_000, gen, split="test")(0)[0].cpu(), X_held)  # capped at the held-out pool

    X3, y3 = digits_bfn(50, gen, classes=[3, 8], binary=True)(0)
    assert y3.shape == (50, 1) and set(y3.view(-1).tolist()) == {1.0, -1.0}
    X4, y4 = digits_bfn(60, gen, classes=[1, 7, [0, 9]])(0)
    assert set(y4.tolist()) == {0, 1, 2}
    with pytest.raises(ValueError, match="training pool"):
        digits_bfn(2000, gen)
    with pytest.raises(ValueError, match="two classes"):
        digits_bfn(10, gen, classes=[1, 2, 3], binary=True)


def test_a_digits_job_without_a_held_out_test_set_is_an_error():
    from modelscape.backend.cli import base_args
    from modelscape.backend.job import run_config
    from modelscape.data import digits_bfn, digits_test_set

    cfg = vars(base_args())
    cfg.update(WIDTH=8, MAX_ITER=2, N_SAMPLES=50, ONLINE=False, LOSS="cross_entropy")
    with pytest.raises(ValueError, match="X_te"):
        run_config(dict(cfg), dict(base_bfn=digits_bfn))
    X_te, y_te = digits_test_set()
    rec = run_config(dict(cfg, X_te=X_te, y_te=y_te), dict(base_bfn=digits_bfn))
    assert rec["status"] in ("done", "not_reached") and np.isfinite(rec["test_loss"])
