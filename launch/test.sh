#!/usr/bin/env bash
# Set up the environment (see launch/setup.sh) and run the whole test suite on the CPU.
# Extra arguments go to pytest, e.g. `bash launch/test.sh -k objectives -x`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/setup.sh"
cd "$ROOT"
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline PYTHONWARNINGS=ignore
exec python -m pytest -q --durations=15 tests "$@"
