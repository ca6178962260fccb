"""The README, checked: every code block in it runs in a test here, and the keys and fields it documents are the
code's.

A block is found by a marker, a piece of its text (``RUNS`` maps each marker to the test that runs that block),
not by its position, so sections added elsewhere change nothing here. A block no marker finds fails
``test_every_readme_code_block_is_run_by_a_test``: a new block needs a test and its marker in ``RUNS``.
Python blocks run as written (a fragment runs in a namespace holding the names it uses from the text around it,
made small enough to train in seconds); a shell line runs as written where it can run here (``modelscape ...``,
``python sweep.py`` with small flags), and otherwise its flags are parsed by the program that takes them (a
Slurm or Ray cluster, a TensorBoard server); a block of program output is compared with what the program prints.
"""
import csv
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from deadlines import scaled  # noqa: E402  (deadlines stretched on a busy machine)

import modelscape
from modelscape.backend.cli import base_args, parse_args
from modelscape.backend.job_iterator import main as run_job_iterator

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# a piece of each block's text -> the test that runs the block
RUNS = {
    "pip install -r requirements-test.txt": "test_quick_start",
    "def weight_norm(model": "test_one_screen_sweep_runs_as_a_script_and_resumes",
    "def warm_restart(model": "test_step_hooks_block",
    "base_bfn=markov_bfn": "test_gpt_block",
    "steps [00:29<00:24, 479/s": "test_the_bars_line_is_what_the_bar_prints",
    'load("results/widths", running=False)': "test_load_mid_sweep_block",
    "train (ema)": "test_watch_block_is_what_watch_prints",
    "--EXECUTOR slurm": "test_slurm_block",
    "ray start --head": "test_ray_block",
    "# the latest sweep; works while": "test_cli_and_load_blocks",
    "modelscape export results/default --csv": "test_cli_and_load_blocks",
    "tensorboard --logdir results/default": "test_tensorboard_block",
    "--CHECKPOINTS 0 500 thresholds final": "test_checkpoint_blocks",
    "res.checkpoint(WIDTH=256, trial=0, step=500)": "test_checkpoint_blocks",
    "LayerDiagnostics()}": "test_diagnostics_block",
    'residual_branches = ("attn.proj", "fc2")': "test_residual_block_declaration_block",
}


def readme_blocks() -> list[str]:
    """The text of every fenced code block of the README, in order."""
    return re.findall(r"^```[\w-]*\n(.*?)^```\s*$", README.read_text(), flags=re.S | re.M)


def block(marker: str) -> str:
    """The one README block holding ``marker``."""
    found = [b for b in readme_blocks() if marker in b]
    assert len(found) == 1, f"{len(found)} README code blocks hold {marker!r}"
    return found[0]


def lines_of(shell: str) -> list[str]:
    """The commands of a shell block: comments dropped, continued lines joined."""
    text = shell.replace("\\\n", " ")
    return [ln.split(" #")[0].strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def test_every_readme_code_block_is_run_by_a_test():
    blocks = readme_blocks()
    assert len(blocks) >= len(set(RUNS.values()))
    for text in blocks:
        markers = [m for m in RUNS if m in text]
        assert markers, f"no test runs this README block (give it a test and a marker in RUNS):\n{text}"
    for marker, test in RUNS.items():
        assert sum(marker in b for b in blocks) == 1, f"{marker!r} must find one README block"
        assert callable(globals().get(test)), test


def env():
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONWARNINGS="ignore")


# --- Quick start ----------------------------------------------------------------------------------------------

def requirements(name: str) -> list[str]:
    return [ln.split("#")[0].strip() for ln in (ROOT / name).read_text().splitlines() if ln.split("#")[0].strip()]


def test_quick_start():
    """Two lines: the first installs the core and runs the main example, the second installs the tests' packages
    and runs the tests, as CI does. (pip is not run here: .ci/run installs from scratch, and test_examples runs
    the example with small flags.)"""
    first, second = lines_of(block(next(m for m, t in RUNS.items() if t == "test_quick_start")))
    assert first == "pip install -r requirements.txt && python examples/example_synthetic_run.py"
    assert second == "pip install -r requirements-test.txt && bash tests/run_all_tests.sh"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert second in ci, ".ci/run must run the README's test line as written"
    assert ci.index("python -m pip install -q torch==2.13.0") < ci.index(second), "the CPU torch first"

    core = requirements("requirements.txt")
    assert core[0] == "torch==2.13.0" and core[-1] == "-e ."
    import tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = {re.split(r"[<>=]", d)[0] for d in project["dependencies"]}
    pinned = {ln.split("==")[0] for ln in core[:-1]}
    assert pinned == floors, "requirements.txt pins exactly the core dependencies, nothing optional"
    test = requirements("requirements-test.txt")
    assert test[0] == "-r requirements.txt" and all("==" in ln for ln in test[1:]), "every test package pinned"
    names = {ln.split("==")[0].lower() for ln in test[1:]}
    wanted = {re.split(r"[<>=\[]", d)[0].lower() for d in project["optional-dependencies"]["test"]}
    assert wanted <= names, wanted - names
    assert (ROOT / "examples" / "example_synthetic_run.py").exists()


# --- A sweep in one screen, and what runs on its store -------------------------------------------------------

def run_script(path, *args, cwd):
    proc = subprocess.run([sys.executable, str(path), *map(str, args)], cwd=cwd, env=env(), capture_output=True,
                          text=True, timeout=scaled(240))
    assert proc.returncode == 0, f"STDOUT\n{proc.stdout[-3000:]}\nSTDERR\n{proc.stderr[-3000:]}"
    return proc


SMALL = ["--MAX_ITER", 30, "--N_SAMPLES", 64, "--N_TEST", 64]  # the one-screen sweep, made quick


@pytest.fixture(scope="module")
def one_screen(tmp_path_factory):
    """A folder in which the one-screen sweep was saved as sweep.py and run (results/default), and a copy of its
    store as the experiment widths that the later blocks name."""
    d = tmp_path_factory.mktemp("readme")
    script = d / "sweep.py"
    script.write_text(block("def weight_norm(model"))
    proc = run_script(script, *SMALL, cwd=d)
    shutil.copytree(d / "results" / "default", d / "results" / "widths")
    return d, script, proc


def test_one_screen_sweep_runs_as_a_script_and_resumes(one_screen):
    d, script, first = one_screen
    assert "__main__" not in script.read_text(), "the README says a script needs no guard: its example has none"
    res = modelscape.load(d / "results" / "default")
    assert len(res.records) == 12 and not res.failed()
    ds = res.to_xarray()
    assert list(ds["timekeys"].dims[:3]) == ["WIDTH", "LR", "trial"] and "grab_weight_norm" in ds
    assert "timekeys" in first.stdout  # its two prints
    # "Run it again and it does nothing"
    wall = {r["job_id"]: r["wall_time"] for r in res.records}
    run_script(script, *SMALL, cwd=d)
    assert {r["job_id"]: r["wall_time"] for r in modelscape.load(d / "results" / "default").records} == wall
    # the Results section's names, on these results
    documented = re.search(r"`res.to_xarray\(\)`: an `xarray.Dataset` with one dimension per sweep axis: (.*?), "
                           r"and with curves", README.read_text(), re.S).group(1)
    assert set(re.findall(r"`(\w+)`", documented)) <= set(ds.data_vars) | set(ds.dims)
    assert res.get("test_loss", WIDTH=256).shape == (2, 2)
    assert np.shape(res.get("timekeys", WIDTH=256, threshold=0.1)) == (2, 2)
    assert sum(res.status_counts().values()) == 12 and res.failed() == []
    assert res.record(WIDTH=256, LR=0.1, trial=0)["status"] in ("done", "not_reached")
    trace = res["timekeys"]
    assert trace.get_axis("WIDTH") == [64, 256, 1024] and np.shape(trace.get(WIDTH=256))[:2] == (2, 2)


def test_cli_and_load_blocks(one_screen, monkeypatch, capsys):
    from modelscape import cli
    d, _, _ = one_screen
    monkeypatch.chdir(d)
    ns = {}
    exec(block("# the latest sweep; works while"), ns)
    assert len(ns["res"].records) == 12
    commands = lines_of(block("modelscape export results/default --csv"))
    commands.append(commands[-1].replace("--csv jobs.csv", "--netcdf sweep.nc"))  # its comment's variant
    for line in commands:
        argv = shlex.split(line)
        assert argv[0] == "modelscape"
        assert cli.main(argv[1:]) == 0, line
    out = capsys.readouterr().out
    assert "default" in out and "widths" in out  # ls
    with open(d / "jobs.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12
    # the columns the README names, in its order: the axes where it says so, the timekey columns by threshold
    said = re.search(r"`export --csv` writes one row per stored job,\s+with the columns (.*?)\n\n", README.read_text(),
                     re.S).group(1)
    named = [c for c in re.findall(r"`(\w+)`", said) if not c.startswith("timekey")]
    axes = ["WIDTH", "LR", "trial"]
    expected = [*named[:1], *axes, *[c for c in named[1:-1] if c not in axes], "timekey_0.15", "timekey_0.1",
                named[-1]]
    assert list(rows[0]) == expected
    import xarray as xr
    with xr.open_dataset(d / "sweep.nc") as nc:
        assert nc.sizes["WIDTH"] == 3


def test_load_mid_sweep_block(one_screen, monkeypatch):
    d, _, _ = one_screen
    monkeypatch.chdir(d)
    ns = {"modelscape": modelscape}
    exec(block('load("results/widths", running=False)'), ns)
    assert ns["running"] == [] and len(ns["finished_only"].records) == 12  # nothing runs now (test_live: mid-run)


def sweep_flags(line: str) -> dict:
    """The hyperparameters a ``python sweep.py ...`` line gives, as the one-screen script's parse_args reads them."""
    argv = shlex.split(line)
    assert argv[:2] == ["python", "sweep.py"], line
    return vars(parse_args(argv[2:]))


def test_slurm_block(one_screen, monkeypatch, capsys):
    from modelscape import cli
    sweep, ls, show = lines_of(block("--EXECUTOR slurm"))
    args = sweep_flags(sweep)
    assert args["EXECUTOR"] == "slurm" and args["DETACH"] is True and args["EXPT_NAME"] == "widths"
    assert args["SLURM_EXTRA"] == ["--constraint=a100"] and args["SLURM_MEM"] == "64G"
    assert (args["SLURM_SHARDS"], args["SLURM_ARRAY_PARALLELISM"], args["SLURM_GPUS_PER_NODE"]) == (4, 2, 4)
    d, _, _ = one_screen
    monkeypatch.chdir(d)
    for line in (ls, show):
        assert cli.main(shlex.split(line)[1:]) == 0, line
    assert "widths" in capsys.readouterr().out


def test_ray_block():
    start, sweep = lines_of(block("ray start --head"))
    argv = shlex.split(start)
    ray = Path(sys.executable).parent / "ray"
    helptext = subprocess.run([str(ray), *argv[1:2], "--help"], capture_output=True, text=True,
                              timeout=scaled(60)).stdout
    assert all(flag in helptext for flag in argv[2:] if flag.startswith("--"))
    args = sweep_flags(sweep)
    assert (args["EXECUTOR"], args["RAY_ADDRESS"], args["WORKERS_PER_DEVICE"]) == ("ray", "auto", 4)


# --- fragments, run in the namespace the text around them gives --------------------------------------------

def small_config(tmp_path, **kw):
    cfg = dict(vars(base_args()), WIDTH=16, MAX_ITER=20, N_SAMPLES=16, N_TEST=32, THREADS=1, EXECUTOR="inprocess",
               RESULTS_DIR=str(tmp_path / "results"))
    cfg.update(kw)
    return cfg


def recording(results):
    def run(*args, **kw):
        kw.setdefault("progress", False)
        results.append(run_job_iterator(*args, **kw))
        return results[-1]
    return run


def test_step_hooks_block(tmp_path):
    from modelscape.data import powerlaw_bfn
    got = []
    ns = {"global_config": small_config(tmp_path, EVAL_EVERY=0), "run_job_iterator": recording(got),
          "bfn_config": dict(base_bfn=powerlaw_bfn, dim=8)}
    exec(block("def warm_restart(model"), ns)
    (res,) = got
    assert len(res.records) == 15 and not res.failed(), [r.get("error") for r in res.failed()]
    loss = res.to_xarray()["train_loss"]
    assert (loss.sel(eps=0.01) != loss.sel(eps=0.0)).all()  # the perturbation reached every trial's model


def test_diagnostics_block(tmp_path):
    from modelscape.data import powerlaw_bfn
    got = []
    ns = {"global_config": small_config(tmp_path, EVAL_EVERY=5, MAX_ITER=10), "run_job_iterator": recording(got),
          "bfn_config": dict(base_bfn=powerlaw_bfn, dim=8)}
    exec(block("LayerDiagnostics()}"), ns)
    (res,) = got
    da = res.get("grab_layers", measure="delta_ratio")
    assert da.dims == ("WIDTH", "LR", "eval_step", "layer") and (da.sel(eval_step=10) > 0).all()


def test_gpt_block(tmp_path):
    ns = {"global_config": small_config(tmp_path, MAX_ITER=3)}
    exec(block("base_bfn=markov_bfn"), ns)
    run_job_iterator([[16]], ["WIDTH"], ns["global_config"], ns["bfn_config"], store=str(tmp_path / "gpt"),
                     progress=False)
    (rec,) = modelscape.load(tmp_path / "gpt").records
    assert rec["status"] in ("done", "not_reached") and rec["config"]["MODEL"] == "GPT"


def test_checkpoint_blocks(tmp_path, monkeypatch):
    (line,) = lines_of(block("--CHECKPOINTS 0 500 thresholds final"))
    args = sweep_flags(line)
    assert args["CHECKPOINTS"] == ["0", "500", "thresholds", "final"] and args["CHECKPOINT_OPTIMIZER"] is True
    from modelscape.data import powerlaw_bfn
    monkeypatch.chdir(tmp_path)  # results/default, as the block reads it back
    # 500 steps, a threshold crossed early and one never: the job runs to its end, step 500
    cfg = small_config(tmp_path, WIDTH=256, MAX_ITER=500, N_SAMPLES=64, LR=0.1, LOSS_CHECKPOINTS=[0.1, 1e-9],
                       CHECKPOINT_OPTIMIZER=True, RESULTS_DIR="results")
    ns = {"run_job_iterator": recording([]), "global_config": cfg, "iterators": [[256], [0]],
          "iterator_names": ["WIDTH", "trial"], "bfn_config": dict(base_bfn=powerlaw_bfn, dim=8),
          "modelscape": modelscape}
    exec(block("res.checkpoint(WIDTH=256, trial=0, step=500)"), ns)
    import torch
    model, opt = ns["model"], ns["opt"]
    assert isinstance(model, torch.nn.Module) and isinstance(opt, torch.optim.Optimizer)
    rec = ns["res"].record(WIDTH=256, trial=0)
    assert {e["label"] for e in rec["checkpoints"]} == {"step 0", "step 500", "threshold 0.1", "final"}
    # the fields the Checkpoints section documents, and no other
    text = re.search(r'`record\["checkpoints"\]`, one dict each: (.*?), so records', README.read_text(), re.S)
    documented = set(re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", text.group(1))))
    assert documented == set().union(*(e.keys() for e in rec["checkpoints"]))


def test_tensorboard_block(tmp_path):
    from modelscape.data import powerlaw_bfn
    (line,) = lines_of(block("tensorboard --logdir results/default"))
    run_job_iterator([[8]], ["WIDTH"], small_config(tmp_path, TENSORBOARD=True, RESULTS_DIR="results"),
                     dict(base_bfn=powerlaw_bfn, dim=4), store=str(tmp_path / "results" / "default"),
                     progress=False)
    argv = shlex.split(line)
    tensorboard = Path(sys.executable).parent / argv[0]
    # --inspect: what the server would show, printed instead of served
    out = subprocess.run([str(tensorboard), *argv[1:], "--inspect"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=scaled(120)).stdout
    assert "train/loss_ema" in out and "final/test_loss" in out, out


# --- blocks of program output --------------------------------------------------------------------------------

def test_the_bars_line_is_what_the_bar_prints():
    from modelscape.backend.board import LiveBoard
    (line,) = lines_of(block("steps [00:29<00:24, 479/s"))
    m = re.search(r"(\d+)/(\d+) steps \[00:(\d\d)<.*?, (\d+)/s, (\d+) running, (\d+) queued, (\d+) done, (\d+) fai",
                  line)
    n, total, elapsed, rate, running, queued, done, failed = map(int, m.groups())
    jobs = [((), (), {"MAX_ITER": 1000})] * (total // 1000)
    board = LiveBoard(jobs, list(range(len(jobs))), range(len(jobs)))
    board.rate = lambda: rate
    board.counts = lambda: dict(running=running, queued=queued, done=done, failed=failed)
    bar = board._make_bar()
    try:
        bar.n, bar.start_t, bar.ncols = n, bar._time() - elapsed, len(line)
        drawn = str(bar)
    finally:
        bar.close()
    glyphs = re.compile(r"\|[^|]*\|")  # the bar itself: its width follows the terminal's
    assert glyphs.sub("|BAR|", drawn.strip()) == glyphs.sub("|BAR|", line.strip())


def test_watch_block_is_what_watch_prints(monkeypatch):
    from modelscape import cli
    text = block("train (ema)")
    head, _, table = text.strip("\n").partition("\n\n")
    m = re.match(r"(\w+) sweep (\d+): (\d+) jobs \| (\d+) running, (\d+) queued, (\d+) done", head)
    name, sweep, n, running, queued, done = m.group(1), *map(int, m.groups()[1:])
    header, *rows = [r.split() for r in table.splitlines()]
    names = header[:header.index("steps")]
    listed = []
    for r in rows:
        steps, top = map(int, r[len(names)].split("/"))
        m_, s_ = map(int, r[-1].split(":"))
        listed.append(({k: float(v) if "." in v else int(v) for k, v in zip(names, r)},
                       dict(status="running", steps=steps, max_iter=top, train_loss=float(r[-3]),
                            test_loss=float(r[-2]), wall_time=60 * m_ + s_ + 0.4)))
    assert len(listed) == running
    axes = listed[0][0]
    rows_ = listed + [(axes, None)] * queued + [(axes, {"status": "done"})] * done
    assert len(rows_) == n
    monkeypatch.setattr(cli, "sweep_rows", lambda store, s: (sweep, names, rows_))
    drawn, _ = cli.watch_view(None, None, name)
    clock = re.compile(r"\d\d:\d\d:\d\d$", re.M)
    assert clock.sub("TIME", drawn) == clock.sub("TIME", text.strip("\n"))


# --- lists of names the README gives ---------------------------------------------------------------------------

def test_the_keys_outside_a_jobs_identity_are_the_codes():
    from modelscape.backend.store import NON_RESULT_KEYS
    from modelscape.config import SCHEMA
    text = re.search(r"the resolved hyperparameters \(all\s+but\s+(.*?),\s+which\s+change\s+no\s+number\)", README.read_text(),
                     re.S).group(1)
    names = set(re.findall(r"`(\w+)`", text))
    names |= {hp.name for hp in SCHEMA if hp.name.startswith("SLURM_")} if "`SLURM_*`" in text else set()
    assert names == set(NON_RESULT_KEYS)


def test_the_examples_table_lists_every_example():
    listed = set(re.findall(r"^\| `examples/([\w.]+)` \|", README.read_text(), re.M))
    assert listed == {p.name for p in (ROOT / "examples").iterdir() if p.suffix in (".py", ".ipynb")}


def test_residual_block_declaration_block():
    """The README's residual block: declared, found, and given the depth rules inside a model of one's own."""
    import torch
    from torch import nn

    from modelscape import mup

    ns = {}
    exec(block('residual_branches = ("attn.proj", "fc2")'), ns)

    class Model(nn.Module):
        def __init__(self, depth, width=32):
            super().__init__()
            self.width = width
            self.input_layer = nn.Linear(3, width)
            self.blocks = nn.ModuleList([ns["Block"](width) for _ in range(depth)])
            self.output_layer = nn.Linear(width, 2)

        def forward(self, x):
            h = self.input_layer(x)
            for b in self.blocks:
                h = b(h)
            return self.output_layer(h)

    model = Model(depth=4)
    assert [b for _, _, b in mup.residual_blocks(model)][3] == ["blocks.3.attn.proj", "blocks.3.fc2"]
    mup.parameterize(model, "mup", torch.optim.Adam, 0.01, depth_alpha=1.0, example_input=torch.randn(2, 5, 3))
    # the width rule's multiplier sqrt(width / fan_in) (1/2 for fc2, 1 for a width -> width layer) times 1/4
    assert model.blocks[3].fc2._mup_mult == pytest.approx(0.5 / 4)
    assert model.blocks[3].attn.proj._mup_mult == pytest.approx(model.blocks[3].fc1._mup_mult / 4)
    assert model(torch.randn(2, 5, 3)).shape == (2, 5, 2)
