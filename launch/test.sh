#!/usr/bin/env bash
# Set up the environment (see launch/setup.sh) and run the whole test suite on the CPU.
# Extra arguments go to one plain pytest run, e.g. `bash launch/test.sh -k objectives -x`.
#
# Without arguments the suite runs in two lanes at once. Serially it keeps only 1.1 of the 2 cores busy
# on average: most of its tests are one process at OMP_NUM_THREADS=1. The long one-process runs (marker
# `one_process`: the demo, ~10 min, and the end-to-end `mopd run`s) take the second core, beside the
# rest. The second lane's output is printed after the first's; either lane failing fails the run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/setup.sh"
cd "$ROOT"
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline PYTHONWARNINGS=ignore

if [ "$#" -gt 0 ]; then
  exec python -m pytest -q --durations=15 tests "$@"
fi

lane_log="$(mktemp "${TMPDIR:-/tmp}/mopd-one-process-tests.XXXXXX.log")"
# Its own process group (set -m), so that Ctrl-C or a failure here stops its training runs too.
set -m
python -m pytest -q -p no:cacheprovider --durations=8 -m one_process tests >"$lane_log" 2>&1 &
lane_pid=$!
set +m
trap 'kill -- "-$lane_pid" 2>/dev/null || true' EXIT INT TERM

rest_status=0
python -m pytest -q --durations=15 -m "not one_process" tests || rest_status=$?

lane_status=0
echo "== tests marked one_process (ran beside the rest) =="
wait "$lane_pid" || lane_status=$?
trap - EXIT INT TERM
cat "$lane_log"
rm -f "$lane_log"
if [ "$rest_status" -ne 0 ] || [ "$lane_status" -ne 0 ]; then
  echo "suite failed: the rest exited $rest_status, the one_process lane $lane_status" >&2
  exit 1
fi
