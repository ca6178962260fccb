"""A pool worker watches its driver from its first moment: the module a spawned worker imports to find its entry
point imports neither torch nor the engine, so a driver killed while its workers start up leaves none behind for
the seconds torch takes to import."""
import os
import signal
import subprocess
import sys
import time

from modelscape.backend import spawned
from modelscape.backend.executors import pool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT)


def test_the_workers_entry_point_imports_neither_torch_nor_the_engine():
    assert pool.worker_main is spawned.worker_main  # what a spawned worker unpickles, by its module's name
    code = ("import sys, modelscape.backend.spawned; heavy = sorted(m for m in sys.modules if m.split('.')[0] == "
            "'torch' or m.startswith(('modelscape.backend.executors', 'modelscape.backend.runner'))); print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


DRIVER = r'''
import time
from modelscape.backend.executors.pool import PoolExecutor
pool = PoolExecutor(["cpu", "cpu"], 1)
print(" ".join(str(w.proc.pid) for w in pool._workers), flush=True)
time.sleep(600)
'''


def _alive(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()
    except FileNotFoundError:
        return False


def test_workers_end_soon_after_their_driver_is_killed_while_they_start():
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True, env=ENV)
    pids = [int(p) for p in driver.stdout.readline().split()]
    time.sleep(0.3)  # the workers are importing torch now (a second or more)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    t0 = time.monotonic()
    while any(_alive(p) for p in pids) and time.monotonic() - t0 < 10:
        time.sleep(0.02)
    left = [p for p in pids if _alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    # 0.04-0.24 s measured on 2 busy cores (5.9-7.9 s before the watchdog ran first)
    assert not left and time.monotonic() - t0 < 2.0
