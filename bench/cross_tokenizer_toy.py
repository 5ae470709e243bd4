"""The cross-tokenizer toy: experts that read a byte-level BPE, a student that reads characters.

1. The demo's base and experts (``configs/local/demo.yaml``, char tokenizer) and its same-tokenizer
   unified student (stage ``unify``): ``OUT/demo``. An existing finished run there is reused.
2. A byte-level BPE learnt from the same domains, 64 tokens (``mopd.data.domain_bpe``): ``runs/cross_tokenizer_bpe``.
3. ``configs/local/cross_tokenizer.yaml``: BPE experts (their own base, then sft per domain) and the
   demo's char student, unified by opd through the cross-tokenizer path: ``OUT/cross_tokenizer``.

Prints per domain the greedy accuracy of both kinds of expert, of both unified students and the ratio
cross / same, the wall time of each run and the machine's load (``uptime``) before and after.

    .venv/bin/python bench/cross_tokenizer_toy.py [--out runs/toy]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BPE = ROOT / "runs" / "cross_tokenizer_bpe"  # where configs/local/cross_tokenizer.yaml's stages read it
SAME_STAGES = ("[{name: base, kind: sft, role: base, overrides: [student.train.steps=150, eval.every_steps=0]}, "
               "{name: expert_reverse, kind: sft, role: teacher, init_from: base, overrides: ['data.domains=[reverse]', "
               "eval.every_steps=0]}, "
               "{name: expert_caesar, kind: sft, role: teacher, init_from: base, overrides: ['data.domains=[caesar]', "
               "eval.every_steps=0]}, "
               "{name: unify, kind: opd, role: student, init_from: base, overrides: [student.train.steps=300]}]")


def mopd(*args: str) -> float:
    """Run ``mopd run ...`` (resuming a finished or interrupted run); its wall time in seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore",
           "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mopd.cli", "run", *args, "--resume", "logging.progress_bar=false",
                    "logging.wandb_mode=disabled"], env=env, check=True, cwd=ROOT)
    return time.perf_counter() - start


def greedy(run: Path, stage: str) -> dict[str, float]:
    out = json.loads((run / "stages" / stage / "output.json").read_text())
    return {d: float(r["greedy_accuracy"]) for d, r in out["eval"].items()}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "toy"))
    args = parser.parse_args()
    out = Path(args.out).resolve()
    from mopd.data.domain_bpe import save_domain_bpe

    print(f"[toy] before: {uptime()}", flush=True)
    same_s = mopd(str(ROOT / "configs/local/demo.yaml"), f"output_dir={out}", f"stages={SAME_STAGES}")
    demo = out / "demo"
    start = time.perf_counter()
    if not (BPE / "tokenizer.json").is_file():
        save_domain_bpe(BPE, ["reverse", "caesar"], vocab_size=64, byte_alphabet=False)
    mopd(str(ROOT / "configs/local/cross_tokenizer.yaml"), f"output_dir={out}")
    cross_s = time.perf_counter() - start  # the BPE's training and the run
    print(f"[toy] after: {uptime()}", flush=True)
    cross = out / "cross_tokenizer"
    experts = {d: greedy(demo, f"expert_{d}")[d] for d in ("reverse", "caesar")}
    bpe_experts = {d: greedy(cross, f"bpe_expert_{d}")[d] for d in ("reverse", "caesar")}
    same, other = greedy(demo, "unify"), greedy(cross, "unify")
    print(f"\n{'domain':<8} {'char expert':>11} {'same-tok student':>17} {'BPE expert':>11} {'cross-tok student':>18} "
          f"{'cross/same':>11}")
    for d in ("reverse", "caesar"):
        ratio = other[d] / same[d] if same[d] > 0 else float("nan")
        print(f"{d:<8} {experts[d]:11.3f} {same[d]:17.3f} {bpe_experts[d]:11.3f} {other[d]:18.3f} {ratio:11.3f}")
    print(f"\nwall: same-tokenizer run (base, 2 experts, unify) {same_s:.0f} s; cross-tokenizer run (BPE, its base "
          f"and experts, char base, unify) {cross_s:.0f} s")
    rows = [json.loads(line) for line in (cross / "stages" / "unify" / "metrics.jsonl").open()]
    last = next(r for r in reversed(rows) if any(k.endswith("/aligned_fraction") for k in r))
    for key in sorted(k for k in last if k.startswith("teacher/") and any(
            k.endswith(s) for s in ("aligned_fraction", "chunks/len", "aligned/mapped_topk_mass", "chunks/kl_est",
                                    "unscored_fraction"))):
        print(f"  last step {key} = {last[key]:.4f}")


if __name__ == "__main__":
    main()
