#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py): kernels per attention shape, step times as the
# context grows, cost surfaces, 16k-token prefill memory, the CUDA tests and trace replay at
# 7B scale, on one CUDA GPU, offline, in under 8 minutes. The report goes to
# results/gpu-check-<device>-<time>/ (or --out-dir); the last stdout line is JSON.
#
#     bash scripts/gpu_check.sh                  # on a machine with a CUDA GPU
#     bash scripts/gpu_check.sh --device cpu     # the small version (seconds; CI runs it)
#
# PYTHON picks the interpreter (default: python3, which must have torch and transformers).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" scripts/gpu_check.py "$@"
