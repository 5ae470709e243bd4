#!/usr/bin/env bash
# Set up the environment (see launch/setup.sh) and run the main job on the embedded default:
# tiny models on the CPU, Megatron-Core over gloo, the in-process HF engine in place of SGLang.
# Extra arguments are config overrides, e.g. `bash launch/demo.sh name=demo2 student.train.steps=5`.
# Re-running continues an interrupted demo, or reprints a finished one's summary; delete runs/demo
# (or pass another name=) to start over.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/setup.sh"
cd "$ROOT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false WANDB_MODE=${WANDB_MODE:-offline}
exec python -m mopd.cli run configs/local/demo.yaml --resume "$@"
