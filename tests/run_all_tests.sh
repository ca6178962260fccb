#!/usr/bin/env bash
# Runs every test: those not marked serial on 2 pytest-xdist workers, then the serial ones (they measure time)
# alone. Extra pytest arguments go to both parts, e.g.
#   bash tests/run_all_tests.sh -m "not slow"      # without the Ray, Slurm and notebook tests
#   bash tests/run_all_tests.sh tests/test_store.py
# MODELSCAPE_TEST_WORKERS sets the number of xdist workers (default 2; 0 runs the first part in this process).
set -uo pipefail
cd "$(dirname "$0")/.."
workers="${MODELSCAPE_TEST_WORKERS:-2}"
status=0
# pytest exits 5 when a part selects no test (say, a file without serial tests): not a failure
python -m pytest -q -n "$workers" --dist loadgroup --parts parallel "$@" || { rc=$?; [ $rc -eq 5 ] || status=$rc; }
python -m pytest -q --parts serial "$@" || { rc=$?; [ $rc -eq 5 ] || status=$rc; }
exit $status
