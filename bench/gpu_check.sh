#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py): on one H100/H200, in at most 8 minutes, the `gpu` tests,
# an opd step of the real SmolLM2-135M student (bf16; TE spec and FP8 where Transformer Engine is
# installed) and the objective kernels at V=152k, written to one JSON report.
#   bash bench/gpu_check.sh [REPORT.json]     # default: $OUT/gpu_check.json, else ./gpu_check.json
# Offline: the machine needs this repository and a Python environment with the project installed
# (MOPD_PYTHON, default .venv/bin/python; see bench/gpu_check.py for the list). On a machine without
# CUDA it prints what it needs and exits 2; a failing part exits 1.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${MOPD_PYTHON:-$ROOT/.venv/bin/python}"
if [[ ! -x "$PY" ]]; then
  echo "bench/gpu_check: no Python environment at $PY; run launch/setup.sh on the GPU node or set MOPD_PYTHON" >&2
  exit 2
fi
REPORT="${1:-${OUT:-.}/gpu_check.json}"
cd "$ROOT"
exec timeout 480 "$PY" bench/gpu_check.py --report "$REPORT"
