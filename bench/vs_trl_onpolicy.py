"""mopd's whole opd step against TRL's on-policy distillation step, on the real SmolLM2-135M-Instruct, CPU.

The same model, prompts, batch and response length on both sides; the runs alternate (mopd, TRL, mopd,
TRL, ...) so machine load hits both alike, and only the RATIO of median step times is meant to be read:

* mopd: ``mopd run configs/local/smollm2_opsd.yaml``, the real loop (DESIGN.md §1): the embedded engine
  generates 8 rollouts of 16 tokens, the self-PI teacher (the frozen initial weights reading the rule as
  a system message) scores them top-16, the Megatron-Core student trains with ``forward_kl_topk`` (DDP,
  distributed optimizer, gloo, one rank) and its weights are synced into the engine. Step time:
  ``timing/step`` from the stage's history (everything but checkpoints and evaluations, both off here).
* TRL: ``trl.DistillationTrainer``, TRL's on-policy trainer (its GKDTrainer with ``lmbda=1`` tells users to
  move to it): student and teacher SmolLM2 in fp32 from the same HF folder, ``beta=0`` (forward KL), the
  same training questions as chat prompts rendered by the same template, batch 8, 16 new tokens,
  temperature 1, lr 5e-5 constant, clip 1.0, no weight decay. Step time: between consecutive
  ``on_step_end`` callbacks (the whole optimizer step, generation included).

Where the work differs: mopd's teacher reads the PI system message (about 15 more tokens per row) and
mopd's objective keeps the teacher's top-16 plus a tail bucket where TRL's takes the full vocabulary;
mopd also syncs weights into a separate engine, which TRL (generating with the training model) does not.
The first ``--skip`` steps of each run (allocation, warm-up) are left out.

    nice -n 5 env OMP_NUM_THREADS=1 .venv/bin/python bench/vs_trl_onpolicy.py [--rounds 2 --steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "configs" / "local" / "smollm2_opsd.yaml"
BATCH, NEW_TOKENS, LR = 8, 16, 5e-5  # as in configs/local/smollm2_opsd.yaml


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "WANDB_MODE": "disabled",
            "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}


def run_mopd(steps: int, hf_dir: Path, megatron_dir: Path) -> list[dict]:
    """One `mopd run` of the opd stage; its per-step history rows."""
    with tempfile.TemporaryDirectory() as out:
        env = {**_env(), "MOPD_SMOLLM2_HF": str(hf_dir), "MOPD_SMOLLM2_MEGATRON": str(megatron_dir)}
        cmd = [sys.executable, "-m", "mopd.cli", "run", str(CONFIG), f"output_dir={out}", f"student.train.steps={steps}",
               "eval.at_start=false", "eval.num_prompts=2", "eval.max_new_tokens=4", "checkpoint.save_every=0",
               "logging.progress_bar=false", "logging.wandb_mode=disabled"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            sys.exit(f"mopd run failed:\n{proc.stderr[-4000:]}")
        output = Path(out) / "smollm2_opsd" / "stages" / "opsd" / "output.json"
        return [r for r in json.loads(output.read_text())["history"] if "timing/step" in r]


def run_trl(steps: int, hf_dir: Path) -> list[dict]:
    """One TRL run in a child process (`--trl-worker`); its per-step rows."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, __file__, "--trl-worker", "--steps", str(steps), "--hf-dir", str(hf_dir),
               "--out", out]
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            sys.exit(f"the TRL run failed:\n{proc.stderr[-4000:]}")
        return json.loads((Path(out) / "steps.json").read_text())


def trl_worker(steps: int, hf_dir: Path, out: Path) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    questions = [json.loads(line)["prompt"] for line in
                 (ROOT / "configs" / "local" / "data" / "zorblax_train.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": q}]} for q in questions])
    rows: list[dict] = []

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            rows.append({"step": state.global_step, "timing/step": now - self.last})
            self.last = now

        def on_log(self, args, state, control, logs=None, **kwargs):
            if rows and logs and "completions/mean_length" in logs:
                rows[-1]["response_len"] = float(logs["completions/mean_length"])

    config = DistillationConfig(
        output_dir=str(out / "trl"), per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
        max_steps=steps, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, max_completion_length=NEW_TOKENS, temperature=1.0, top_p=1.0, top_k=0, beta=0.0,
        use_cpu=True, bf16=False, report_to=[], save_strategy="no", logging_steps=1, seed=11,
        dataloader_num_workers=0, disable_tqdm=True)
    student = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                                  processing_class=tokenizer, callbacks=[StepTimes()])
    trainer.train()
    (out / "steps.json").write_text(json.dumps(rows))


def _median_step(rows: list[dict], skip: int) -> float:
    return statistics.median(r["timing/step"] for r in rows[skip:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="runs per side, alternating")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    parser.add_argument("--skip", type=int, default=2, help="first steps of each run left out")
    parser.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trl_worker:
        return trl_worker(args.steps, args.hf_dir, args.out)
    if args.steps <= args.skip:
        sys.exit(f"--steps {args.steps} must exceed --skip {args.skip}")
    try:
        import trl
    except ImportError:
        sys.exit("bench/vs_trl_onpolicy.py needs TRL (not a mopd dependency): `.venv/bin/pip install trl`")
    from tests.real_models import smollm2_hf_dir, smollm2_megatron_dir

    hf_dir, megatron_dir = smollm2_hf_dir(), smollm2_megatron_dir(1)
    print(f"start: {os.getloadavg()[0]:.2f} load; TRL {trl.__version__}; SmolLM2-135M-Instruct fp32, "
          f"{os.environ.get('OMP_NUM_THREADS', '1')} thread(s); batch {BATCH} x {NEW_TOKENS} new tokens")
    mopd_runs, trl_runs = [], []
    for r in range(args.rounds):
        for side in ((0, 1) if r % 2 == 0 else (1, 0)):
            started = time.perf_counter()
            rows = run_mopd(args.steps, hf_dir, megatron_dir) if side == 0 else run_trl(args.steps, hf_dir)
            (mopd_runs if side == 0 else trl_runs).append(rows)
            print(f"  round {r + 1} {'mopd' if side == 0 else 'TRL '}: median step {_median_step(rows, args.skip):6.2f} s "
                  f"(run {time.perf_counter() - started:.0f} s)", flush=True)
    m = statistics.median(_median_step(rows, args.skip) for rows in mopd_runs)
    t = statistics.median(_median_step(rows, args.skip) for rows in trl_runs)
    phases = {p: statistics.median(row[f"timing/{p}"] for rows in mopd_runs for row in rows[args.skip:])
              for p in ("generate", "score", "train", "sync")}
    lengths = [row["response_len"] for rows in trl_runs for row in rows if "response_len" in row]
    mopd_lengths = [row["teacher/self/response_len"] for rows in mopd_runs for row in rows]
    print(f"mopd opd step   {m:6.2f} s  (generate {phases['generate']:.2f}, score {phases['score']:.2f}, "
          f"train {phases['train']:.2f}, sync {phases['sync']:.2f}; mean response "
          f"{statistics.fmean(mopd_lengths):.1f} tokens)")
    print(f"TRL  step       {t:6.2f} s  (DistillationTrainer, mean response "
          f"{statistics.fmean(lengths) if lengths else float('nan'):.1f} tokens)")
    print(f"speed mopd/TRL  {t / m:.2f}x  (TRL step time / mopd step time; >= 1.0 means mopd is as fast or faster)")
    print(f"end: {os.getloadavg()[0]:.2f} load")


if __name__ == "__main__":
    main()
