"""Fixtures shared by several test modules, and how the suite is split for parallel runs.

``bash tests/run_all_tests.sh`` runs the suite in two parts: every test not marked ``serial`` on two pytest-xdist
workers (``--parts parallel``), then the ``serial`` ones alone (``--parts serial``). A module's tests stay on one
worker (they share module fixtures: a sweep, a Ray), except in the modules of ``SPLIT``, whose tests are
independent and long; every test that starts a Ray shares one worker (two local Rays on one machine would
compete for its ports and cores: tests that start one are marked ``ray``).
"""
import os
import shutil
import signal
import tempfile

import pytest

SPLIT = {"test_examples.py"}  # modules whose tests may run on different workers


def pytest_addoption(parser):
    parser.addoption("--parts", choices=("all", "parallel", "serial"), default="all",
                     help="run every test (all), those not marked serial (parallel), or only those (serial)")


def pytest_configure(config):
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
