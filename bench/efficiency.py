"""Teacher-token efficiency: on-policy distillation vs SFT on expert samples, at equal teacher tokens.

Per seed, one pipeline on the demo's config (configs/local/demo.yaml): a base, one expert per domain
(trained once), then two branches from the base, each evaluated every ``--eval-every`` steps with the
teacher tokens it has consumed so far: ``unify`` (opd, 400 steps; the demo runs 300) and ``sft_baseline`` (SFT
on responses the experts write, stopped at unify's teacher tokens). Both branches run the demo's one
cosine schedule and are read at intermediate points, so "at budget b" means "the demo's run after b
teacher tokens" for both methods alike (a run planned for b tokens alone would anneal earlier).

Printed: held-out greedy accuracy, sampled pass@1 and pass@k per domain at 1/8, 1/4, 1/2, 1x of the
demo's budget (unify's total teacher tokens), every seed; and per domain the tokens each method needs
to reach 90% of its expert's greedy accuracy (linear between evaluations, none extrapolated), with
the ratio SFT / opd, or "not reached". Curves go to ``<out>/efficiency.png`` and numbers to
``<out>/efficiency.json``. An interrupted bench continues where it stopped (``mopd run --resume``).

    python bench/efficiency.py                       # seeds 7 and 8, evaluations every 25 steps
    python bench/efficiency.py --seeds 7 --eval-every 50
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

from mopd.efficiency import TARGET_FRACTION, Curve, ratio_line, stage_curve, value_at  # noqa: E402

METHODS = {"opd": "unify", "sft": "sft_baseline"}


def stages(eval_every: int, domains: list[str]) -> str:
    experts = [f"{{name: expert_{d}, kind: sft, role: teacher, init_from: base, "
               f"overrides: ['data.domains=[{d}]', eval.every_steps=0]}}" for d in domains]
    sources = ", ".join(f"expert_{d}" for d in domains)
    return "[" + ", ".join([
        "{name: base, kind: sft, role: base, overrides: [student.train.steps=150, eval.every_steps=0]}",
        *experts,
        f"{{name: unify, kind: opd, role: student, init_from: base, overrides: [student.train.steps=400, "
        f"eval.every_steps={eval_every}]}}",
        f"{{name: sft_baseline, kind: sft, role: sft_baseline, init_from: base, overrides: [student.train.steps=400, "
        f"eval.every_steps={eval_every}], sources: [{sources}], token_budget_from: unify}}",
    ]) + "]"


def run_seed(config: Path, out: Path, seed: int, eval_every: int, domains: list[str]) -> tuple[Path, float]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "WANDB_MODE": "disabled",
           "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    name = f"efficiency_seed{seed}"
    teachers = "[" + ", ".join(f"{{name: {d}_expert, checkpoint: expert_{d}, domains: [{d}], top_k: 8}}"
                               for d in domains) + "]"
    cmd = [sys.executable, "-m", "mopd.cli", "run", str(config), "--resume", f"output_dir={out}", f"name={name}",
           f"seed={seed}", "logging.progress_bar=false", "logging.wandb_mode=disabled",
           f"data.domains=[{', '.join(domains)}]", f"distill.teachers={teachers}", f"stages={stages(eval_every, domains)}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"seed {seed}: mopd run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return out / name, time.perf_counter() - start


def load(run_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in (run_dir / "stages").glob("*/output.json")}


def seed_result(outputs: dict[str, dict], domains: list[str], metrics: list[str],
                fractions: list[float]) -> dict:
    base, budget = outputs["base"]["eval"], outputs["unify"]["teacher_tokens"]
    result = {"budget_tokens": budget, "domains": {}}
    for d in domains:
        expert = outputs[f"expert_{d}"]["eval"][d]["greedy_accuracy"]
        target = TARGET_FRACTION * expert
        row: dict = {"expert_greedy": expert, "base_greedy": base[d]["greedy_accuracy"], "target": target,
                     "curves": {}, "at_budget": {}}
        for method, stage in METHODS.items():
            out = outputs[stage]
            for metric in metrics:
                start = base[d]["greedy_accuracy"] if metric == "greedy_accuracy" else base[d]["pass_at"].get(
                    metric.removeprefix("pass@"))
                curve = stage_curve(out["history"], out["eval"], d, metric, start=start)
                row["curves"][f"{method}/{metric}"] = {"tokens": curve.tokens, "values": curve.values}
                row["at_budget"][f"{method}/{metric}"] = [value_at(curve, f * budget) for f in fractions]
        line, ratio = ratio_line(d, _curve(row, "sft"), _curve(row, "opd"), target)
        row["ratio_line"], row["ratio_sft_over_opd"] = line, ratio
        result["domains"][d] = row
    return result


def _curve(row: dict, method: str) -> Curve:
    c = row["curves"][f"{method}/greedy_accuracy"]
    return Curve(tuple(c["tokens"]), tuple(c["values"]))


def print_report(results: dict[int, dict], metrics: list[str], fractions: list[float]) -> None:
    fmt = lambda v: "  -  " if v is None else f"{v:.3f}"  # noqa: E731
    for seed, res in results.items():
        print(f"\nseed {seed}: demo budget = {res['budget_tokens']:,} teacher tokens (unify, 400 opd steps; the demo runs 300)")
        for d, row in res["domains"].items():
            print(f"  {d}: base {row['base_greedy']:.3f}, expert {row['expert_greedy']:.3f}, "
                  f"90% target {row['target']:.3f}")
            print("    " + f"{'':18s}" + "".join(f"{f'{f:g}x':>8s}" for f in fractions))
            for metric in metrics:
                for method in METHODS:
                    values = row["at_budget"][f"{method}/{metric}"]
                    print(f"    {method + ' ' + metric:18s}" + "".join(f"{fmt(v):>8s}" for v in values))
            print(f"    to 90% of the expert: {row['ratio_line']}")


def plot(results: dict[int, dict], metrics: list[str], fractions: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(next(iter(results.values()))["domains"])
    fig, axes = plt.subplots(len(metrics), len(domains), figsize=(5.5 * len(domains), 3.6 * len(metrics)),
                             squeeze=False)
    colors = {"opd": "tab:blue", "sft": "tab:orange"}
    styles = ["-", "--", ":", "-."]
    for j, d in enumerate(domains):
        for i, metric in enumerate(metrics):
            ax = axes[i][j]
            for s, (seed, res) in enumerate(results.items()):
                row = res["domains"][d]
                for method in METHODS:
                    c = row["curves"][f"{method}/{metric}"]
                    ax.plot([t / 1000 for t in c["tokens"]], c["values"], styles[s % 4], color=colors[method],
                            marker=".", label=f"{method} seed {seed}")
                if metric == "greedy_accuracy":
                    ax.axhline(row["target"], color="gray", lw=0.8, ls=styles[s % 4])
                for f in fractions:
                    ax.axvline(f * res["budget_tokens"] / 1000, color="lightgray", lw=0.6)
            ax.set(title=f"{d}: {metric}", xlabel="teacher tokens (thousands)", ylim=(-0.02, 1.02))
            ax.legend(fontsize=7)
    fig.suptitle("opd vs SFT on expert samples at equal teacher tokens (gray: 90% of the expert)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "local" / "demo.yaml"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_efficiency"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[7, 8])
    parser.add_argument("--domains", nargs="+", default=["reverse", "caesar"])
    parser.add_argument("--eval-every", type=int, default=25, help="evaluate both branches every N steps")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.125, 0.25, 0.5, 1.0])
    args = parser.parse_args()
    out = Path(args.out)
    metrics = ["greedy_accuracy", "pass@1", "pass@4"]
    results = {}
    for seed in args.seeds:
        run_dir, wall = run_seed(Path(args.config), out, seed, args.eval_every, args.domains)
        load_avg = os.getloadavg()
        print(f"seed {seed}: {run_dir} ({wall:.0f} s wall this call; load average {load_avg[0]:.1f} "
              f"{load_avg[1]:.1f} {load_avg[2]:.1f})", flush=True)
        outputs = load(run_dir)
        results[seed] = seed_result(outputs, args.domains, metrics, args.fractions)
        results[seed]["wall_s"] = {name: o["wall_s"] for name, o in outputs.items()}
    print_report(results, metrics, args.fractions)
    print("\nratio = teacher tokens SFT needs / teacher tokens opd needs to reach 90% of the expert's greedy "
          "accuracy (linear between evaluations every", args.eval_every, "steps; 0 tokens = the base)")
    for seed, res in results.items():
        for d, row in res["domains"].items():
            print(f"  seed {seed} {row['ratio_line']}")
    (out / "efficiency.json").write_text(json.dumps({str(s): r for s, r in results.items()}, indent=1))
    plot(results, metrics, args.fractions, out / "efficiency.png")
    print(f"\ncurves: {out / 'efficiency.png'}; numbers: {out / 'efficiency.json'}")


if __name__ == "__main__":
    main()
