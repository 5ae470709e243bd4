#!/usr/bin/env bash
#SBATCH --job-name=mopd-70b
#SBATCH --nodes=14
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out
#
# Places the processes of a 70B MOPD run; every training knob lives in the config.
#   sbatch slurm/mopd_70b.sh                       # configs/recipes/llama3_70b_mopd.yaml
#   CONFIG=configs/x.yaml TRAIN_NODES=8 sbatch --nodes=16 slurm/mopd_70b.sh
# Node split (in SLURM_JOB_NODELIST order): TRAIN_NODES trainer nodes (torchrun, Megatron TP x PP x DP),
# ROLLOUT_NODES nodes of SGLang servers behind sglang_router for the student's rollouts, then one
# SGLang server node per teacher named in TEACHERS ("name=hf_path,...").
set -euo pipefail

CONFIG=${CONFIG:-configs/recipes/llama3_70b_mopd.yaml}
TRAIN_NODES=${TRAIN_NODES:-8}
ROLLOUT_NODES=${ROLLOUT_NODES:-3}
TEACHERS=${TEACHERS:-math=/ckpt/experts/math-70b-hf,code=/ckpt/experts/code-70b-hf,chat=/ckpt/experts/chat-70b-hf}
STUDENT_HF=${STUDENT_HF:-/ckpt/llama3-70b-sft-hf}
SGLANG_TP=${SGLANG_TP:-8}
PORT=${PORT:-30000}
ROUTER_PORT=${ROUTER_PORT:-30100}
VENV=${VENV:-$PWD/.venv}
source "$VENV/bin/activate"
mkdir -p logs
# Rollout servers report raw (temperature-1) logprobs of sampled tokens, as the trainer's importance
# ratios assume (mopd/rollout/sglang_launcher.py sets the same when mopd launches them).
export SGLANG_RETURN_ORIGINAL_LOGPROB=1

# The SGLang servers and the router run in the background; they stop with the job, however it ends.
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
IFS=',' read -ra TEACHER_SPECS <<< "$TEACHERS"
need=$((TRAIN_NODES + ROLLOUT_NODES + ${#TEACHER_SPECS[@]}))
if [ "${#NODES[@]}" -lt "$need" ]; then
  echo "mopd_70b.sh: need $need nodes ($TRAIN_NODES train + $ROLLOUT_NODES rollout + ${#TEACHER_SPECS[@]} teacher), got ${#NODES[@]}" >&2
  exit 1
fi
TRAIN=("${NODES[@]:0:TRAIN_NODES}")
ROLLOUT=("${NODES[@]:TRAIN_NODES:ROLLOUT_NODES}")
TEACHER_NODES=("${NODES[@]:TRAIN_NODES+ROLLOUT_NODES}")

# Fail before queueing GPUs on a layout that cannot work.
mopd plan "$CONFIG" --world-size $((TRAIN_NODES * 8))

sglang_server() {  # node model_path port
  srun --nodes=1 --ntasks=1 -w "$1" --output="logs/sglang-$1-%j.out" \
    python -m sglang.launch_server --model-path "$2" --tp-size "$SGLANG_TP" \
      --host 0.0.0.0 --port "$3" --mem-fraction-static 0.85 --skip-server-warmup &
}

workers=()
for node in "${ROLLOUT[@]}"; do
  sglang_server "$node" "$STUDENT_HF" "$PORT"
  workers+=("http://$node:$PORT")
done
srun --nodes=1 --ntasks=1 -w "${ROLLOUT[0]}" --overlap --output="logs/router-%j.out" \
  python -m sglang_router.launch_router --host 0.0.0.0 --port "$ROUTER_PORT" --worker-urls "${workers[@]}" &

overrides=("rollout.sglang.launch=false" "rollout.sglang.endpoints=[http://${ROLLOUT[0]}:$ROUTER_PORT]")
for i in "${!TEACHER_SPECS[@]}"; do
  name=${TEACHER_SPECS[$i]%%=*}; path=${TEACHER_SPECS[$i]#*=}
  sglang_server "${TEACHER_NODES[$i]}" "$path" "$PORT"
  # The config reads each teacher's URL with ${oc.env:MOPD_TEACHER_URL_<NAME>,null}.
  export "MOPD_TEACHER_URL_${name^^}=http://${TEACHER_NODES[$i]}:$PORT"
done

MASTER_ADDR=${TRAIN[0]}
srun --nodes="$TRAIN_NODES" --ntasks-per-node=1 -w "$(IFS=,; echo "${TRAIN[*]}")" \
  torchrun --nnodes="$TRAIN_NODES" --nproc-per-node=8 --rdzv-backend=c10d \
    --rdzv-endpoint="$MASTER_ADDR:29500" --rdzv-id="$SLURM_JOB_ID" \
    -m mopd.cli run "$CONFIG" "${overrides[@]}" --resume
