#!/usr/bin/env bash
# Runs the test suite in the project's environment (created on first use).
# Extra arguments go to pytest, e.g. ./scripts/run_tests.sh -m "not slow" -x
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
python -m pytest -q "$@"
