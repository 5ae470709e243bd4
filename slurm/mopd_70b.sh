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
# Places the processes of an MOPD run; every training and serving knob lives in the config.
#   sbatch slurm/mopd_70b.sh                       # configs/recipes/llama3_70b_mopd.yaml
#   CONFIG=configs/x.yaml TRAIN_NODES=8 sbatch --nodes=16 slurm/mopd_70b.sh
# Node split (in SLURM_JOB_NODELIST order): TRAIN_NODES trainer nodes (torchrun, Megatron TP x PP x DP),
# rollout.sglang.num_servers nodes of SGLang servers behind sgl-router for the student's rollouts, then
# one SGLang server node per SGLang teacher of the config (its checkpoint is the model it serves).
# SGLang and the router run from SGLang's own environment ($SGLANG_PYTHON), never the trainer's venv.
# Every server and the router require the job's keys (generated here unless already in the environment
# variables the config names); they bind their node's address, and weight updates go to each server
# directly, after every server and the router answer /health.
set -euo pipefail

CONFIG=${CONFIG:-configs/recipes/llama3_70b_mopd.yaml}
TRAIN_NODES=${TRAIN_NODES:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
PORT=${PORT:-30000}
ROUTER_PORT=${ROUTER_PORT:-30100}
RDZV_PORT=${RDZV_PORT:-29500}
READY_TIMEOUT_S=${READY_TIMEOUT_S:-1800}  # a 70B TP8 server loads 140 GB and captures CUDA graphs
VENV=${VENV:-$PWD/.venv}
SGLANG_PYTHON=${SGLANG_PYTHON:-$PWD/.venv-sglang/bin/python}
LOG_DIR=${LOG_DIR:-logs}
source "$VENV/bin/activate"
mkdir -p "$LOG_DIR"
# srun (Slurm >= 22.05) no longer inherits --cpus-per-task: without this each step is bound to one CPU.
export SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-1}}
# Rollout servers report raw (temperature-1) logprobs of sampled tokens, as the trainer's importance
# ratios assume (mopd/rollout/sglang_launcher.py sets the same when mopd launches them).
export SGLANG_RETURN_ORIGINAL_LOGPROB=1

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
# ROLLOUT_MODEL ROLLOUT_SERVERS SGLANG_TP SGLANG_MEM_FRACTION API_KEY_ENV ADMIN_API_KEY_ENV TEACHER_SPECS
eval "$(python -m mopd.rollout.sglang_launcher "$CONFIG")"
need=$((TRAIN_NODES + ROLLOUT_SERVERS + ${#TEACHER_SPECS[@]}))
if [ "${#NODES[@]}" -lt "$need" ]; then
  echo "mopd_70b.sh: need $need nodes ($TRAIN_NODES train + $ROLLOUT_SERVERS rollout + ${#TEACHER_SPECS[@]} teacher), got ${#NODES[@]}" >&2
  exit 1
fi
TRAIN=("${NODES[@]:0:TRAIN_NODES}")
ROLLOUT=("${NODES[@]:TRAIN_NODES:ROLLOUT_SERVERS}")
TEACHER_NODES=("${NODES[@]:TRAIN_NODES+ROLLOUT_SERVERS}")

# Fail before starting anything on a layout that cannot work, or an environment that cannot run SGLang.
mopd plan "$CONFIG" --world-size $((TRAIN_NODES * GPUS_PER_NODE))
if ! "$SGLANG_PYTHON" -c "import sglang.launch_server, sglang_router" 2>"$LOG_DIR/sglang-env-check.err"; then
  echo "mopd_70b.sh: SGLANG_PYTHON=$SGLANG_PYTHON cannot import SGLang's runtime ($(tail -n1 "$LOG_DIR/sglang-env-check.err")); " \
       "point it at an environment with SGLang's full dependencies and sglang-router (pip install 'mopd[sglang]'), " \
       "not the trainer's venv" >&2
  exit 1
fi

# The job's keys: the admin key guards the weight endpoints, the API key generation and scoring. The
# servers read both from a file only this user can read; nothing here prints them.
umask 077
for var in "$API_KEY_ENV" "$ADMIN_API_KEY_ENV"; do
  if [ -n "$var" ] && [ -z "${!var:-}" ]; then
    export "$var=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
  fi
done
KEY_FILE="$LOG_DIR/.sglang-keys-${SLURM_JOB_ID}.yaml"
: > "$KEY_FILE"
router_key=()
if [ -n "$API_KEY_ENV" ]; then
  printf 'api_key: "%s"\n' "${!API_KEY_ENV}" >> "$KEY_FILE"
  router_key=(--api-key "${!API_KEY_ENV}")
fi
if [ -n "$ADMIN_API_KEY_ENV" ]; then
  printf 'admin_api_key: "%s"\n' "${!ADMIN_API_KEY_ENV}" >> "$KEY_FILE"
fi
umask 022

# The servers and the router run in the background; they stop with the job, however it ends.
stop_background() {
  local pids; pids=$(jobs -p)
  if [ -n "$pids" ]; then
    kill $pids 2>/dev/null || true
    for _ in $(seq 50); do
      alive=0; for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive=1; done
      [ "$alive" = 0 ] && break; sleep 0.2
    done
    kill -9 $pids 2>/dev/null || true
    wait 2>/dev/null || true
  fi
  rm -f "$KEY_FILE"
}
trap stop_background EXIT

declare -A SERVER_PID
sglang_server() {  # node model_path port
  srun --nodes=1 --ntasks=1 -w "$1" --output="$LOG_DIR/sglang-$1-%j.out" \
    "$SGLANG_PYTHON" -m sglang.launch_server --config "$KEY_FILE" --model-path "$2" --tp-size "$SGLANG_TP" \
      --host "$1" --port "$3" --mem-fraction-static "$SGLANG_MEM_FRACTION" --skip-server-warmup &
  SERVER_PID["http://$1:$3"]=$!
}

workers=()
for node in "${ROLLOUT[@]}"; do
  sglang_server "$node" "$ROLLOUT_MODEL" "$PORT"
  workers+=("http://$node:$PORT")
done
teachers=()
for i in "${!TEACHER_SPECS[@]}"; do
  name=${TEACHER_SPECS[$i]%%=*}; path=${TEACHER_SPECS[$i]#*=}
  sglang_server "${TEACHER_NODES[$i]}" "$path" "$PORT"
  teachers+=("http://${TEACHER_NODES[$i]}:$PORT")
  # The config reads each teacher's URL with ${oc.env:MOPD_TEACHER_URL_<NAME>,null}.
  export "MOPD_TEACHER_URL_${name^^}=http://${TEACHER_NODES[$i]}:$PORT"
done
ROUTER="http://${ROLLOUT[0]}:$ROUTER_PORT"
# The router takes its key on the command line (0.3.2 reads it nowhere else); it requires the key of
# its clients and sends it to the workers. Its health threshold outlasts a paused weight sync.
srun --nodes=1 --ntasks=1 -w "${ROLLOUT[0]}" --overlap --output="$LOG_DIR/router-%j.out" \
  "$SGLANG_PYTHON" -m sglang_router.launch_router --host "${ROLLOUT[0]}" --port "$ROUTER_PORT" \
    --worker-urls "${workers[@]}" --policy cache_aware --health-failure-threshold 30 \
    "${router_key[@]}" &
SERVER_PID["$ROUTER"]=$!

# /health is open (no key). The trainer's first weight sync needs every server up.
deadline=$((SECONDS + READY_TIMEOUT_S))
for url in "${workers[@]}" "${teachers[@]}" "$ROUTER"; do
  until curl -sf -o /dev/null --max-time 10 "$url/health"; do
    if ! kill -0 "${SERVER_PID[$url]}" 2>/dev/null; then
      echo "mopd_70b.sh: the server at $url exited before it answered /health; see $LOG_DIR" >&2
      exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "mopd_70b.sh: $url did not answer /health within $READY_TIMEOUT_S s; see $LOG_DIR" >&2
      exit 1
    fi
    sleep 2
  done
done

list() { local IFS=,; echo "[$*]"; }
overrides=("rollout.sglang.launch=false" "rollout.sglang.endpoints=[$ROUTER]"
           "rollout.sglang.worker_urls=$(list "${workers[@]}")")
MASTER_ADDR=${TRAIN[0]}
set +e
srun --nodes="$TRAIN_NODES" --ntasks-per-node=1 -w "$(IFS=,; echo "${TRAIN[*]}")" \
  torchrun --nnodes="$TRAIN_NODES" --nproc-per-node="$GPUS_PER_NODE" --rdzv-backend=c10d \
    --rdzv-endpoint="$MASTER_ADDR:$RDZV_PORT" --rdzv-id="$SLURM_JOB_ID" \
    -m mopd.cli run "$CONFIG" "${overrides[@]}" --resume
status=$?
set -e
exit $status
