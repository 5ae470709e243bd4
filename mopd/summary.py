"""The run summary (`runs/<name>/summary.json`) and its plot (`runs/<name>/summary.png`).

Per domain: greedy exact-match accuracy of each stage by role — `base`, `teacher` (the expert whose
teacher entry covers the domain), `student` (the unified model), `sft_baseline`, `weight_average` —
and plain verdicts: does the student reach 90% of its expert, does it beat each baseline. An opd
stage evaluated before its first step (``eval.at_start``) also gets ``before_after``: per domain, its
greedy accuracy (with the domain's verifier: a rule-following rate for a rule verifier) and each
``eval.teacher_kl`` teacher's reverse KL, before the first step and at the end.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mopd.config import RunConfig
from mopd.stages.context import StageOutput

TARGET_FRACTION = 0.9
BASELINES = ("sft_baseline", "weight_average")


def build_summary(config: RunConfig, outputs: dict[str, StageOutput], warnings: list[str]) -> dict[str, Any]:
    domains = sorted({d for o in outputs.values() for d in o.eval})
    per_domain = {d: _domain_row(config, outputs, d) for d in domains}
    verdicts = _verdicts(per_domain)
    before_after = {name: rows for name, o in outputs.items() if (rows := _before_after(o))}
    verdicts["plainly"] += _before_after_lines(before_after)
    verdicts["plainly"] += _efficiency_lines(outputs, per_domain)
    return {
        "run": config.name,
        "metric": "greedy exact-match accuracy on held-out prompts",
        "domains": per_domain,
        "stages": {name: {"kind": o.kind, "role": o.role, "wall_s": round(o.wall_s, 2),
                          "teacher_tokens": o.teacher_tokens, "eval": o.eval}
                   for name, o in outputs.items()},
        "total_wall_s": round(sum(o.wall_s for o in outputs.values()), 2),
        "verdicts": verdicts,
        "before_after": before_after,
        "warnings": warnings,
    }


def _before_after(output: StageOutput) -> dict[str, Any]:
    """domain -> {greedy_accuracy: {before, after}, teacher_kl: {teacher: {before, after}}} of an opd
    stage whose history starts with an evaluation at step 0; {} otherwise."""
    start = next((row for row in output.history if row.get("step") == 0.0), None)
    if output.kind != "opd" or not output.eval or start is None:
        return {}
    rows = {}
    for domain, final in output.eval.items():
        row = {"greedy_accuracy": {"before": start.get(f"eval/{domain}/greedy_accuracy"),
                                   "after": final.get("greedy_accuracy")}}
        kl = final.get("teacher_kl") or {}
        if kl:
            row["teacher_kl"] = {t: {"before": start.get(f"eval/{domain}/teacher_kl/{t}"), "after": v}
                                 for t, v in kl.items()}
        rows[domain] = row
    return rows


def _before_after_lines(before_after: dict[str, Any]) -> list[str]:
    def pair(x: dict[str, float | None]) -> str:
        return " -> ".join("n/a" if v is None else f"{v:.3f}" for v in (x["before"], x["after"]))

    lines = []
    for stage, rows in before_after.items():
        for domain, row in rows.items():
            kl = "".join(f"; KL to {t} {pair(v)} nats/token" for t, v in row.get("teacher_kl", {}).items())
            lines.append(f"{domain} ({stage}, before -> after): greedy accuracy {pair(row['greedy_accuracy'])}{kl}")
    return lines


def _accuracy(output: StageOutput | None, domain: str) -> float | None:
    if output is None or domain not in output.eval:
        return None
    return output.eval[domain].get("greedy_accuracy")


def _domain_row(config: RunConfig, outputs: dict[str, StageOutput], domain: str) -> dict[str, Any]:
    by_role: dict[str, StageOutput] = {}
    for o in outputs.values():
        if o.role in ("base", "student", *BASELINES) and o.eval:
            by_role[o.role] = o  # the last stage of a role wins
    row: dict[str, Any] = {role: _accuracy(o, domain) for role, o in by_role.items()}
    expert = _expert_for(config, outputs, domain)
    row["teacher"] = _accuracy(expert, domain)
    # Sampled pass@1 (temperature eval.temperature) separates models that tie on greedy accuracy.
    row["pass@1"] = {role: _pass1(o, domain) for role, o in [*by_role.items(), ("teacher", expert)]}
    row["teacher_stage"] = expert.name if expert else None
    return row


def _pass1(output: StageOutput | None, domain: str) -> float | None:
    if output is None or domain not in output.eval:
        return None
    return output.eval[domain].get("pass_at", {}).get("1")


def _expert_for(config: RunConfig, outputs: dict[str, StageOutput], domain: str) -> StageOutput | None:
    for teacher in config.distill.teachers:
        if domain in teacher.domains and teacher.checkpoint in outputs:
            return outputs[teacher.checkpoint]
    experts = [o for o in outputs.values() if o.role == "teacher" and domain in o.eval]
    return max(experts, key=lambda o: _accuracy(o, domain) or 0.0, default=None)


def _verdicts(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    reaches, beats = [], {b: [] for b in BASELINES}
    for domain, row in rows.items():
        student, teacher = row.get("student"), row.get("teacher")
        if student is None:
            continue
        if teacher:
            ratio = student / teacher
            row["student_over_teacher"] = round(ratio, 4)
            row[f"reaches_{int(TARGET_FRACTION * 100)}pct_of_teacher"] = ratio >= TARGET_FRACTION
            reaches.append(ratio >= TARGET_FRACTION)
        for b in BASELINES:
            if row.get(b) is not None:
                row[f"beats_{b}"] = student > row[b]
                row[f"vs_{b}"] = _compare(student, row[b])
                beats[b].append(student > row[b])
    if reaches:
        out["student_reaches_90pct_of_teacher_on_every_domain"] = all(reaches)
    for b, results in beats.items():
        if results:
            out[f"student_beats_{b}_on_every_domain"] = all(results)
    lines = []
    for domain, row in rows.items():
        if row.get("base") is not None and row.get("student") is not None:
            lines.append(f"{domain}: base {row['base']:.3f} -> student {row['student']:.3f} "
                         f"({row['student'] - row['base']:+.3f} greedy accuracy)")
        if "student_over_teacher" in row:
            lines.append(f"{domain}: student {row['student']:.3f} = {100 * row['student_over_teacher']:.0f}% of its "
                         f"expert ({row['teacher']:.3f})"
                         + "".join(f"; {row[f'vs_{b}']} {b} ({row[b]:.3f})"
                                   for b in BASELINES if row.get(b) is not None))
    out["plainly"] = lines
    return out


def _compare(student: float, baseline: float) -> str:
    if student > baseline:
        return "beats"
    return "ties with" if student == baseline else "does not beat"


def write_summary(run_dir: Path, summary: dict[str, Any], outputs: dict[str, StageOutput]) -> Path:
    path = run_dir / "summary.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.rename(path)
    plot_summary(run_dir / "summary.png", summary, outputs)
    return path


def plot_summary(path: Path, summary: dict[str, Any], outputs: dict[str, StageOutput]) -> None:
    """Final accuracy per domain and role; per-domain accuracy and KL over the opd stages' steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    _bars(axes[0], summary["domains"])
    opd = [o for o in outputs.values() if o.kind == "opd"]
    for o in opd:
        _curves(axes[1], o, "/greedy_accuracy", prefix="eval/", label=o.name)
        _curves(axes[2], o, "/kl_sample", prefix="teacher/", label=o.name)
    axes[1].set(title="accuracy during opd", xlabel="step", ylabel="greedy accuracy")
    axes[2].set(title="reverse KL estimate per teacher", xlabel="step", ylabel="nats/token")
    for ax in axes[1:]:
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(ax, rows: dict[str, dict[str, Any]]) -> None:
    roles = ["base", "teacher", "student", *BASELINES]
    domains = list(rows)
    width = 0.8 / len(roles)
    for i, role in enumerate(roles):
        values = [rows[d].get(role) or 0.0 for d in domains]
        ax.bar([j + i * width for j in range(len(domains))], values, width, label=role)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(domains))], domains)
    ax.set(title="final greedy accuracy", ylim=(0, 1.05))
    ax.legend(fontsize=7)


def _curves(ax, output: StageOutput, suffix: str, prefix: str, label: str) -> None:
    keys = sorted({k for row in output.history for k in row if k.startswith(prefix) and k.endswith(suffix)
                   and "/mean/" not in k})
    for key in keys:
        points = [(row["step"], row[key]) for row in output.history if key in row]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=f"{label}: {key.split('/')[1]}")


def _efficiency_lines(outputs: dict[str, StageOutput], rows: dict[str, dict[str, Any]]) -> list[str]:
    """Teacher tokens the SFT baseline and the student need to reach 90% of the expert, from this run's
    own periodic evaluations (one seed, coarse); the grid over seeds is bench/efficiency.py."""
    from mopd.efficiency import ratio_line, stage_curve

    by_role = {o.role: o for o in outputs.values() if o.role in ("base", "student", "sft_baseline")}
    if "student" not in by_role or "sft_baseline" not in by_role:
        return []
    student, sft, base = by_role["student"], by_role["sft_baseline"], by_role.get("base")
    periodic = all(any(k.startswith("eval/") for r in o.history for k in r) for o in (student, sft))
    if not periodic or base is None:
        return ["efficiency at equal teacher tokens: not measured in this run (needs eval.every_steps on the "
                "student and sft_baseline stages); see python bench/efficiency.py"]
    lines = []
    for domain, row in rows.items():
        if not row.get("teacher") or domain not in base.eval:
            continue
        start = base.eval[domain].get("greedy_accuracy")
        curves = [stage_curve(o.history, o.eval, domain, start=start) for o in (sft, student)]
        line, _ = ratio_line(domain, *curves, TARGET_FRACTION * row["teacher"])
        lines.append(f"teacher tokens to 90% of the expert, {line} (this run: one seed, evaluated every "
                     f"{_eval_interval(student)} steps, linear between; coarse: over seeds and a finer grid, "
                     "python bench/efficiency.py)")
    return lines


def _eval_interval(output: StageOutput) -> int:
    steps = sorted({int(r["step"]) for r in output.history if any(k.startswith("eval/") for k in r)})
    return min((b - a for a, b in zip(steps, steps[1:])), default=steps[0] if steps else 0)
