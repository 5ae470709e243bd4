"""Accuracy against teacher tokens consumed: the curves that say whether on-policy distillation needs
fewer teacher tokens than SFT on teacher samples (``bench/efficiency.py``, the run summary's line).

A training stage's history holds one row per optimizer step (``train/tokens``: the teacher tokens of
that step, scored by teachers in opd, written by them for SFT on expert samples) and one row per
periodic evaluation (``eval.every_steps``); its output's ``eval`` is the final evaluation. A curve is
(cumulative teacher tokens, metric) at each evaluation, starting from the stage's initial model
(``start``: e.g. the base's own evaluation, at 0 tokens). Between evaluations it is linear in tokens;
that is the only interpolation used, both for "tokens needed to reach a target" and for "value at a
budget", and nothing is extrapolated past the last evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

TARGET_FRACTION = 0.9
"""Of the expert's greedy accuracy on its domain."""


@dataclass(frozen=True)
class Curve:
    tokens: tuple[float, ...]
    """Cumulative teacher tokens at each evaluation, increasing."""
    values: tuple[float, ...]


def stage_curve(history: Sequence[Mapping[str, float]], final_eval: Mapping[str, Any], domain: str,
                metric: str = "greedy_accuracy", start: float | None = None) -> Curve:
    """``metric`` (``greedy_accuracy`` or ``pass@k``) of ``domain`` over a stage's periodic evaluations and
    its final one (``final_eval``: the stage output's ``eval``), against cumulative teacher tokens."""
    key = f"eval/{domain}/{metric}"
    tokens, points = 0.0, [] if start is None else [(0.0, float(start))]
    for row in history:
        tokens += float(row.get("train/tokens", 0.0))
        if key in row and row[key] is not None:
            points.append((tokens, float(row[key])))
    final = _final_value(final_eval.get(domain, {}), metric)
    if final is not None and (not points or points[-1][0] < tokens):
        points.append((tokens, final))
    return Curve(tuple(t for t, _ in points), tuple(v for _, v in points))


def _final_value(row: Mapping[str, Any], metric: str) -> float | None:
    if metric.startswith("pass@"):
        return row.get("pass_at", {}).get(metric.removeprefix("pass@"))
    return row.get(metric)


def tokens_to_reach(curve: Curve, target: float) -> float | None:
    """Teacher tokens at which the curve first reaches ``target`` (linear between evaluations); None
    if no evaluation reached it."""
    for i, (t, v) in enumerate(zip(curve.tokens, curve.values)):
        if v >= target:
            if i == 0:
                return t
            t0, v0 = curve.tokens[i - 1], curve.values[i - 1]
            return t0 + (target - v0) / (v - v0) * (t - t0)
    return None


def value_at(curve: Curve, tokens: float) -> float | None:
    """The curve at ``tokens`` (linear between evaluations); None outside the evaluated range."""
    pts = list(zip(curve.tokens, curve.values))
    for (t0, v0), (t1, v1) in zip(pts, pts[1:]):
        if t0 <= tokens <= t1:
            return v0 if t1 == t0 else v0 + (tokens - t0) / (t1 - t0) * (v1 - v0)
    if pts and abs(tokens - pts[-1][0]) <= 1e-9 * max(1.0, tokens):
        return pts[-1][1]
    return None


def ratio_line(domain: str, sft: Curve, opd: Curve, target: float) -> tuple[str, float | None]:
    """"SFT needs X / opd needs Y = ratio" for one domain, saying plainly when one is not reached."""
    t_sft, t_opd = tokens_to_reach(sft, target), tokens_to_reach(opd, target)
    if t_opd is None and t_sft is None:
        return f"{domain}: neither reaches {target:.3f} within {opd.tokens[-1]:,.0f} / {sft.tokens[-1]:,.0f} tokens", None
    if t_opd is None:
        return (f"{domain}: opd does not reach {target:.3f} within {opd.tokens[-1]:,.0f} teacher tokens; "
                f"SFT needs {t_sft:,.0f}"), None
    if t_sft is None:
        bound = sft.tokens[-1] / t_opd if t_opd > 0 else float("inf")
        return (f"{domain}: SFT does not reach {target:.3f} within {sft.tokens[-1]:,.0f} teacher tokens; opd needs "
                f"{t_opd:,.0f} (ratio > {bound:.2f}x)"), None
    ratio = t_sft / t_opd if t_opd > 0 else float("inf")
    return f"{domain}: SFT needs {t_sft:,.0f} teacher tokens, opd {t_opd:,.0f} (ratio {ratio:.2f}x)", ratio
