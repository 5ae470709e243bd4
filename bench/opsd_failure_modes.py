"""OPSD failure modes, measured: the per-step diagnostics of configs/local/opsd_failure_modes.yaml.

Runs (or, with ``--resume`` semantics, continues) that config — one base, then OPSD branches with the
answer as PI with and without per-entry clipping, and a shared rule as PI — and prints, per branch,
every ``--every`` steps: the top-1% share of |log p_s - log p_t| (pivot-token concentration), the
student's entropy estimate, response length, the reverse-KL estimate, the share of tokens with a
clipped entry, the rollouts' verifier reward (sampled accuracy at temperature 1); at each evaluation
greedy accuracy, pass@1 and pass@4 on held-out prompts; and the alarms that fired (step, metric).
The plot goes to ``<out>/<run>/failure_modes.png``.

    python bench/opsd_failure_modes.py
    python bench/opsd_failure_modes.py --config configs/local/opsd_failure_modes.yaml --every 10
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
STEP_KEYS = {"top1%": "top1pct_share", "entropy": "entropy", "len": "response_len", "kl": "kl_sample",
             "clipped": "clipped_fraction"}
EVAL_KEYS = ("greedy_accuracy", "pass@1", "pass@4")


def run(config: Path, out: Path) -> tuple[Path, float]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "WANDB_MODE": "disabled",
           "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "mopd.cli", "run", str(config), "--resume", f"output_dir={out}",
           "logging.progress_bar=false", "logging.wandb_mode=disabled"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"mopd run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    summary = next(out.glob("*/summary.json"))
    return summary.parent, time.perf_counter() - start


def branch_series(output: dict, domain: str) -> dict[str, list[tuple[float, float]]]:
    """metric -> [(step, value)] for the per-step diagnostics and the evaluations of one opd stage."""
    series: dict[str, list[tuple[float, float]]] = {}
    for row in output["history"]:
        for label, suffix in STEP_KEYS.items():
            for key, value in row.items():
                if key.startswith("teacher/") and key.endswith("/" + suffix) and value is not None:
                    series.setdefault(label, []).append((row["step"], value))
        if "rollout/reward" in row:
            series.setdefault("reward", []).append((row["step"], row["rollout/reward"]))
        for metric in EVAL_KEYS:
            key = f"eval/{domain}/{metric}"
            if row.get(key) is not None:
                series.setdefault(metric, []).append((row["step"], row[key]))
    final = output["eval"].get(domain)
    if final:
        last = max(s for s, _ in series.get("reward", [(0.0, 0.0)]))
        for metric, value in (("greedy_accuracy", final["greedy_accuracy"]), ("pass@1", final["pass_at"].get("1")),
                              ("pass@4", final["pass_at"].get("4"))):
            points = series.setdefault(metric, [])
            if value is not None and (not points or points[-1][0] < last):
                points.append((last, value))
    return series


def at(points: list[tuple[float, float]], step: float) -> float | None:
    return next((v for s, v in points if s == step), None)


def report(name: str, output: dict, series: dict, every: int, base_eval: dict, domain: str) -> None:
    print(f"\n== {name} ({output['wall_s']:.0f} s) ==")
    base = base_eval[domain]
    print(f"  base: greedy {base['greedy_accuracy']:.3f}, pass@1 {base['pass_at']['1']:.3f}, "
          f"pass@4 {base['pass_at']['4']:.3f}")
    labels = [*STEP_KEYS, "reward", *EVAL_KEYS]
    print("  step " + "".join(f"{label.removesuffix('_accuracy'):>10s}" for label in labels))
    steps = sorted({s for s, _ in series.get("reward", [])})
    evals = {s for m in EVAL_KEYS for s, _ in series.get(m, [])}
    for step in steps:
        if step == 1 or step % every == 0 or step in evals:
            cells = [at(series.get(label, []), step) for label in labels]
            print(f"  {int(step):4d} " + "".join(f"{'-':>10s}" if c is None else f"{c:10.3f}" for c in cells))
    alarms = output.get("warnings") or ["none"]
    print("  alarms during the run (entropy, response_len): " + "; ".join(alarms))
    print("  replayed with reward watched too: " + "; ".join(replay_alarm(output["history"]) or ["none"]))


def replay_alarm(history: list[dict], watched=("entropy", "response_len", "reward")) -> list[str]:
    """The run's own per-step diagnostics fed through the Alarm as if it had watched ``watched``."""
    from mopd.config import DiagnosticsConfig
    from mopd.diagnostics import Alarm

    alarm = Alarm(DiagnosticsConfig(alarm_on=list(watched), alarm_drop=0.5, alarm_window=5))
    fired = []
    for row in history:
        if "train/loss" in row:
            fired += [e.message for e in alarm.update(int(row["step"]), {k: v for k, v in row.items() if v is not None})]
    return fired


def plot(branches: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["top1%", "entropy", "len", "kl", "reward", "greedy_accuracy", "pass@1", "pass@4"]
    fig, axes = plt.subplots(2, 4, figsize=(18, 7.5))
    for ax, label in zip(axes.flat, panels):
        for name, series in branches.items():
            points = series.get(label, [])
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="." if label in EVAL_KEYS else None, label=name)
        ax.set(title=label, xlabel="opd step")
        ax.legend(fontsize=7)
    fig.suptitle("OPSD on caesar: answer PI without / with per-entry clipping, shared-rule PI")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "local" / "opsd_failure_modes.yaml"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_opsd"))
    parser.add_argument("--every", type=int, default=10, help="print every N steps (and every evaluation)")
    parser.add_argument("--domain", default="caesar")
    args = parser.parse_args()
    run_dir, wall = run(Path(args.config), Path(args.out))
    print(f"{run_dir}: {wall:.0f} s wall this call; load average {os.getloadavg()[0]:.1f}")
    done = sorted((run_dir / "stages").glob("*/output.json"), key=lambda p: p.stat().st_mtime)  # stage order
    outputs = {p.parent.name: json.loads(p.read_text()) for p in done}
    base_eval = outputs["base"]["eval"]
    branches = {}
    for name, output in outputs.items():
        if output["kind"] == "opd":
            branches[name] = branch_series(output, args.domain)
            report(name, output, branches[name], args.every, base_eval, args.domain)
    (run_dir / "failure_modes.json").write_text(json.dumps(branches))
    plot(branches, run_dir / "failure_modes.png")
    print(f"\nplot: {run_dir / 'failure_modes.png'}")


if __name__ == "__main__":
    main()
