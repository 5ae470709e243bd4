"""Where an opd step's time goes: generate / score / train / sync, side by side, as shares of the step.

Runs a short specialise-then-unify pipeline (tests/assets/tiny_run.yaml by default, or any config)
and reads the opd stage's per-step timings back from its output.json. The machine is noisy, so
compare shares and ratios, not absolute seconds; the first step (model build, warm-up) is skipped.

    python bench/opd_step.py                                 # tiny config (6 opd steps)
    python bench/opd_step.py configs/local/demo.yaml --stage unify
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PHASES = ("generate", "score", "train", "sync")
ROOT = Path(__file__).resolve().parents[1]


def run(config: Path, stage: str, out: Path, overrides: list[str]) -> list[dict]:
    """Run the pipeline into ``out`` and return the opd stage's per-step history."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "mopd.cli", "run", str(config), f"output_dir={out}", "logging.progress_bar=false",
           "logging.wandb_mode=disabled", "checkpoint.save_every=0", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"mopd run failed:\n{proc.stderr[-3000:]}")
    name = next(out.iterdir()).name
    return json.loads((out / name / "stages" / stage / "output.json").read_text())["history"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(ROOT / "tests" / "assets" / "tiny_run.yaml"))
    parser.add_argument("--stage", default="unify", help="the opd stage to read")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. student.train.steps=20")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [r for r in run(Path(args.config), args.stage, Path(tmp), args.overrides) if "train/loss" in r][1:]
    if not rows:
        sys.exit("no opd steps after the first; raise student.train.steps")
    means = {p: statistics.fmean(r.get(f"timing/{p}", 0.0) for r in rows) for p in PHASES}
    total = sum(means.values())
    tokens = statistics.fmean(r["train/tokens"] for r in rows)
    print(f"{len(rows)} opd steps of {args.config} (first step excluded), {tokens:.0f} response tokens per step")
    print(f"{'phase':<10}{'mean s':>10}{'share':>9}{'x train':>9}")
    for p in PHASES:
        print(f"{p:<10}{means[p]:>10.4f}{means[p] / total:>9.1%}{means[p] / means['train']:>9.2f}")
    print(f"{'step':<10}{total:>10.4f}{1:>9.0%}{total / means['train']:>9.2f}   ({tokens / total:.0f} tokens/s end to end)")


if __name__ == "__main__":
    main()
