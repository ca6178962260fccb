"""Fixtures shared by several test modules, and how the suite is split for parallel runs.

``bash tests/run_all_tests.sh`` runs the suite in two parts: every test not marked ``serial`` on two pytest-xdist
workers (``--parts parallel``), then the ``serial`` ones alone (``--parts serial``). A module's tests stay on one
worker (they share module fixtures: a sweep, a Ray), except in the modules of ``SPLIT``, whose tests are
independent and long; every test that starts a Ray shares one worker (two local Rays on one machine would
compete for its ports and cores: tests that start one are marked ``ray``).

Where the jobs run: ``MODELSCAPE_TEST_DEVICE=cpu`` or ``cuda`` (default ``cuda`` where torch sees a GPU, else
``cpu``). ``cpu`` hides the GPUs from this run (``CUDA_VISIBLE_DEVICES=""``, set before anything initialises CUDA,
and inherited by the xdist workers, the job workers and every subprocess), so a GPU machine runs the suite as the
CPU CI does; ``cuda`` without a GPU stops the run at its start. Tests that build a job's data in this process take
the ``job_device`` fixture; tests that need several GPUs are skipped on a machine with one.
"""
import os
import shutil
import signal
import tempfile

import pytest

SPLIT = {"test_examples.py"}  # modules whose tests may run on different workers
DEVICE_VAR = "MODELSCAPE_TEST_DEVICE"


def pytest_addoption(parser):
    parser.addoption("--parts", choices=("all", "parallel", "serial"), default="all",
                     help="run every test (all), those not marked serial (parallel), or only those (serial)")


def chosen_device() -> str:
    """``cpu`` or ``cuda``: where this run's jobs go, from $MODELSCAPE_TEST_DEVICE (see the module docstring).
    ``cpu`` hides the GPUs from this process and every process it starts."""
    choice = os.environ.get(DEVICE_VAR, "").strip().lower()
    if choice not in ("", "cpu", "cuda"):
        raise pytest.UsageError(f"{DEVICE_VAR}={os.environ[DEVICE_VAR]!r}: choose cpu or cuda (or leave it unset)")
    if choice == "cpu":
        # CUDA reads CUDA_VISIBLE_DEVICES once, when a process first initialises it; torch does that lazily (its
        # import does not), so this is in time for this process too, not only for the ones it starts.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch
    if choice == "cpu":
        if torch.cuda.is_available():  # a plugin initialised CUDA first: jobs in this process would use the GPU
            raise pytest.UsageError(f"{DEVICE_VAR}=cpu, but CUDA was initialised before tests/conftest.py could "
                                    "hide the GPUs; run with CUDA_VISIBLE_DEVICES= (empty) as well")
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if choice == "cuda":
        raise pytest.UsageError(f"{DEVICE_VAR}=cuda but torch {torch.__version__} sees no CUDA device "
                                f"(torch.cuda.is_available() is False); unset {DEVICE_VAR} or set it to cpu")
    return "cpu"


def pytest_configure(config):
    # Before any test module is imported (they import torch and may ask about CUDA); the choice is written back so
    # that xdist workers and the tests' subprocesses make the same one without asking CUDA.
    config._modelscape_saved_env = {k: os.environ.get(k) for k in (DEVICE_VAR, "CUDA_VISIBLE_DEVICES")}
    os.environ[DEVICE_VAR] = chosen_device()
    # A process started in the background by a non-interactive shell, under nohup or GNU time, inherits SIGINT
    # ignored, and Python then raises no KeyboardInterrupt: the tests that press Ctrl-C (on this process, or on
    # a driver they start, which inherits the disposition) would wait for ever. Set, not ignored, it is reset
    # to the default in every program started from here, as after a Ctrl-C from a terminal.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    # Ray keeps a session folder per start: in a folder of this run's own, removed at its end, instead of the
    # system's temp folder. A short path: Ray's socket paths must fit in 107 characters.
    if "RAY_TMPDIR" not in os.environ:
        config._modelscape_ray_tmp = tempfile.mkdtemp(prefix="msray-")
        os.environ["RAY_TMPDIR"] = config._modelscape_ray_tmp


def pytest_unconfigure(config):
    tmp = getattr(config, "_modelscape_ray_tmp", None)
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        os.environ.pop("RAY_TMPDIR", None)
    for key, value in getattr(config, "_modelscape_saved_env", {}).items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def pytest_itemcollected(item):
    # as each test is collected, before pytest-xdist reads the groups (in its pytest_collection_modifyitems)
    if item.get_closest_marker("xdist_group") is None:
        module = item.path.name
        group = "ray" if item.get_closest_marker("ray") else None if module in SPLIT else module
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))


def pytest_collection_modifyitems(config, items):
    parts = config.getoption("--parts")
    keep, drop = [], []
    for item in items:
        serial = item.get_closest_marker("serial") is not None
        (keep if parts == "all" or serial == (parts == "serial") else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def one_torch_thread():
    """Run the test with one torch thread (small matrices: extra threads only add overhead, and the suite runs
    on 2 cores), then put the caller's thread count back."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def job_device():
    """The torch.device a job of this run trains on (``cuda:0`` under MODELSCAPE_TEST_DEVICE=cuda, as
    ``DEVICES=[0]`` gives, else ``cpu``): for data a test builds itself, or a reference it trains in this process
    to compare with a sweep's jobs."""
    import torch
    return torch.device("cuda:0" if os.environ[DEVICE_VAR] == "cuda" else "cpu")
