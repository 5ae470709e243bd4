#!/usr/bin/env bash
# Set up the environment (see launch/setup.sh) and run the whole test suite on the CPU.
# Extra arguments go to one plain pytest run, e.g. `bash launch/test.sh -k objectives -x`.
#
# Without arguments the demo test (tests/test_demo.py: one process, ~9 min on one core) runs beside
# the rest of the suite. Measured serially, the rest keeps 1.1 of the 2 cores busy on average (most of
# its tests are one process with OMP_NUM_THREADS=1), so the demo takes the idle core instead of adding
# its 9 minutes at the end. Its output is printed after the rest's; either one failing fails the run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/launch/setup.sh"
cd "$ROOT"
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline PYTHONWARNINGS=ignore

if [ "$#" -gt 0 ]; then
  exec python -m pytest -q --durations=15 tests "$@"
fi

DEMO_TEST=tests/test_demo.py
demo_log="$(mktemp "${TMPDIR:-/tmp}/mopd-demo-test.XXXXXX.log")"
# Its own process group (set -m), so that Ctrl-C or a failure here stops its training run too.
set -m
python -m pytest -q -p no:cacheprovider --durations=1 "$DEMO_TEST" >"$demo_log" 2>&1 &
demo_pid=$!
set +m
trap 'kill -- "-$demo_pid" 2>/dev/null || true' EXIT INT TERM

rest_status=0
python -m pytest -q --durations=15 --ignore "$DEMO_TEST" tests || rest_status=$?

demo_status=0
echo "== $DEMO_TEST (ran beside the rest) =="
wait "$demo_pid" || demo_status=$?
trap - EXIT INT TERM
cat "$demo_log"
rm -f "$demo_log"
if [ "$rest_status" -ne 0 ] || [ "$demo_status" -ne 0 ]; then
  echo "suite failed: rest of the suite exit $rest_status, $DEMO_TEST exit $demo_status" >&2
  exit 1
fi
