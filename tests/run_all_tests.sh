#!/usr/bin/env bash
# Runs every test. Usage: bash tests/run_all_tests.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m pytest -q "$@"
